"""Stage `dedup`: the global index (exact + MinHash near duplicates across shards) and the per-shard apply."""
import json
import random
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from fixtures_docs import word_salad, write_ingest_shard
from stages import common
from stages import dedup as D
from stages import filter as F

PARAMS = common.load_params()
# Filtering is not under test here: no heuristic rules, no language id, only the signatures.
FILTER = {**common.stage_params(PARAMS, "filter"), "rules": [], "languages": []}
DEDUP = common.stage_params(PARAMS, "dedup")


def near_variant(rng: random.Random, text: str, n_changes: int) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n_changes):
        words[i] = f"z{rng.randrange(10_000)}"
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three ingest shards; exact and near duplicates spread across them; a half-overlapping non-duplicate."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(7)
    exact = word_salad(rng, 120)
    near = word_salad(rng, 150)
    half = near[: len(near) // 2] + " " + word_salad(rng, 75)  # shares half its text with `near`: J ~ 0.3
    docs = {
        "s0": [word_salad(rng, 100), exact, near, word_salad(rng, 90)],
        "s1": [exact.upper().replace(".", " !"), near_variant(rng, near, 2), half, word_salad(rng, 110), "?!"],
        "s2": [exact, word_salad(rng, 80), near + "\n" + word_salad(rng, 20), "!?"],
    }
    for shard, texts in docs.items():
        write_ingest_shard(root / "ingest" / f"{shard}.parquet", texts)
    F.filter_shards(root / "ingest", root / "filter", FILTER)
    D.dedup_index(root / "filter" / "sigs", root / "index", DEDUP)
    D.dedup_shards(root / "filter" / "kept", root / "index" / "duplicates.parquet", root / "dedup", DEDUP)
    return {"root": root, "exact": exact, "near": near, "half": half, "docs": docs}


def texts_at(root, rows):
    """{(shard, row): text} of the filter-kept shards."""
    out = {}
    for shard in ("s0", "s1", "s2"):
        texts = pq.read_table(root / "filter" / "kept" / f"{shard}.parquet").column("text").to_pylist()
        out.update({(shard, row): text for row, text in enumerate(texts) if (shard, row) in rows})
    return out


def test_exact_and_near_duplicates_across_shards_keep_exactly_one(corpus):
    root, docs = corpus["root"], corpus["docs"]
    dups = pq.read_table(root / "index" / "duplicates.parquet").to_pylist()
    listed = texts_at(root, {(d["shard"], d["row"]) for d in dups})
    by_rule = {}
    for d in dups:
        by_rule.setdefault(d["rule"], set()).add(listed[(d["shard"], d["row"])])
    exact_variant = docs["s1"][0]
    near_longest = docs["s2"][2]
    # The exact cluster {exact in s0, its case/punctuation variant in s1, exact in s2} keeps the longest: the variant.
    assert by_rule["exact_dup"] == {corpus["exact"]}
    assert sum(d["rule"] == "exact_dup" for d in dups) == 2
    # The near cluster {near, a 2-word edit, near + an extra line} keeps the longest.
    assert by_rule["near_dup"] == {corpus["near"], docs["s1"][1]}
    kept_ids = {d["rule"]: d["kept_id"] for d in dups}
    assert kept_ids["exact_dup"] == common.content_id(exact_variant)
    assert kept_ids["near_dup"] == common.content_id(near_longest)
    assert len(dups) == 4  # the half-overlapping doc, the fillers and the punctuation-only docs are not clustered

    kept = [t for s in ("s0", "s1", "s2") for t in pq.read_table(root / "dedup" / "kept" / f"{s}.parquet")
            .column("text").to_pylist()]
    assert kept.count(exact_variant) == 1 and corpus["exact"] not in kept
    assert kept.count(near_longest) == 1 and corpus["near"] not in kept and docs["s1"][1] not in kept
    assert corpus["half"] in kept and "?!" in kept and "!?" in kept


def test_index_stats_and_manifest(corpus):
    manifest = json.loads((corpus["root"] / "index" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["docs"] == 13 and counts["clusters"] == 2 and counts["cluster_sizes"] == {"3": 2}
    assert (counts["exact_dup"], counts["near_dup"], counts["largest_cluster"]) == (2, 2, 3)
    assert manifest["stage"] == "dedup_index" and manifest["minhash"]["bands"] == FILTER["minhash"]["bands"]
    assert len(manifest["inputs"]) == 3


def test_apply_conserves_and_explains(corpus):
    root = corpus["root"]
    dups = {(d["shard"], d["row"]): d for d in pq.read_table(root / "index" / "duplicates.parquet").to_pylist()}
    for shard, texts in corpus["docs"].items():
        manifest = json.loads((root / "dedup" / f"{shard}.manifest.json").read_text())
        kept = pq.read_table(root / "dedup" / "kept" / f"{shard}.parquet")
        rejected = pq.read_table(root / "dedup" / "rejected" / f"{shard}.parquet")
        assert kept.num_rows + rejected.num_rows == len(texts) == manifest["counts"]["in"]
        assert rejected.schema.names == kept.schema.names + ["rule", "detail"]
        listed = [d for (s, _), d in sorted(dups.items()) if s == shard]
        assert rejected.column("id").to_pylist() == [d["id"] for d in listed]
        assert rejected.column("detail").to_pylist() == [f"duplicate of {d['kept_id']}" for d in listed]
        assert sum(manifest["counts"]["rejected"].values()) == rejected.num_rows
        assert manifest["counts"]["approx_tokens_kept"] == sum(kept.column("approx_tokens").to_pylist())


def test_index_and_apply_are_deterministic(corpus, tmp_path):
    root = corpus["root"]
    D.dedup_index(root / "filter" / "sigs", tmp_path / "index", DEDUP)
    assert common.sha256_file(tmp_path / "index" / "duplicates.parquet") == \
        common.sha256_file(root / "index" / "duplicates.parquet")
    D.dedup_shards(root / "filter" / "kept", tmp_path / "index" / "duplicates.parquet", tmp_path / "dedup", DEDUP)
    for shard in corpus["docs"]:
        for part in ("kept", "rejected"):
            assert common.sha256_file(tmp_path / "dedup" / part / f"{shard}.parquet") == \
                common.sha256_file(root / "dedup" / part / f"{shard}.parquet")


def test_resume_redoes_only_the_missing_shard(corpus, tmp_path):
    root = corpus["root"]
    index = root / "index" / "duplicates.parquet"
    out = tmp_path / "dedup"
    assert set(D.dedup_shards(root / "filter" / "kept", index, out, DEDUP).values()) == {"done"}
    (out / "rejected" / "s2.parquet").unlink()
    assert D.dedup_shards(root / "filter" / "kept", index, out, DEDUP) == {"s0": "skipped", "s1": "skipped",
                                                                          "s2": "done"}


def fake_signatures(minhash: np.ndarray, bands: np.ndarray) -> D.Signatures:
    sigs = D.Signatures.__new__(D.Signatures)
    n = len(minhash)
    sigs.ids, sigs.shards, sigs.exact = [f"d{i}" for i in range(n)], ["s"] * n, [f"h{i}" for i in range(n)]
    sigs.rows, sigs.tokens = np.arange(n), np.full(n, 10)
    sigs.bands, sigs.has_bands, sigs.minhash = bands, np.ones(n, bool), minhash
    return sigs


def test_verification_drops_band_collisions_below_the_jaccard_threshold():
    rng = np.random.default_rng(0)
    minhash = rng.integers(0, 1 << 31, size=(3, 100), dtype=np.uint64)
    minhash[1, :80] = minhash[0, :80]   # J^ = 0.8 with doc 0
    minhash[2, :30] = minhash[0, :30]   # J^ = 0.3 with doc 0 and with doc 1
    bands = np.array([[1, 2], [1, 3], [4, 2]], np.uint64)  # 0~1 share band 0, 0~2 share band 1
    uf, stats = D.duplicate_clusters(fake_signatures(minhash, bands), verify_min_jaccard=0.7)
    assert uf.find(1) == uf.find(0) != uf.find(2)
    assert stats == {"near_pairs_joined": 1, "near_pairs_below_jaccard": 1}
    uf, _ = D.duplicate_clusters(fake_signatures(minhash, bands), verify_min_jaccard=None)
    assert uf.find(0) == uf.find(1) == uf.find(2)


def test_sigs_with_other_minhash_params_are_refused(corpus, tmp_path):
    root = corpus["root"]
    other = {**FILTER, "minhash": {**FILTER["minhash"], "num_perm": 128, "bands": 16}}
    F.filter_shard(root / "ingest" / "s0.parquet", tmp_path / "filter", "s0", FILTER)
    F.filter_shard(root / "ingest" / "s1.parquet", tmp_path / "filter", "s1", other)
    with pytest.raises(common.StageError, match=r"s1\.parquet: MinHash params .* differ"):
        D.dedup_index(tmp_path / "filter" / "sigs", tmp_path / "index", DEDUP)


def test_index_from_other_filter_output_is_refused(corpus, tmp_path):
    root = corpus["root"]
    write_ingest_shard(tmp_path / "kept" / "s1.parquet", ["a different document"] * 5)
    with pytest.raises(common.StageError, match=r"s1\.parquet: row \d+ is .* lists"):
        D.dedup_shard(tmp_path / "kept" / "s1.parquet", root / "index" / "duplicates.parquet", tmp_path / "out",
                      "s1", DEDUP)


def test_cli_index_then_apply_one_shard(corpus, tmp_path):
    root = corpus["root"]
    cfg = json.dumps({"dedup": DEDUP})
    run = [sys.executable, "-m", "stages.dedup"]
    subprocess.run(run + ["index", "--params-json", cfg, "--sigs-dir", str(root / "filter" / "sigs"),
                          "--output-dir", str(tmp_path / "index")], check=True, cwd=common.REPO)
    subprocess.run(run + ["--params-json", cfg, "apply", "--input-dir", str(root / "filter" / "kept"),
                          "--index", str(tmp_path / "index" / "duplicates.parquet"),
                          "--output-dir", str(tmp_path / "dedup"), "--shard", "s1"], check=True, cwd=common.REPO)
    assert (tmp_path / "dedup" / "s1.manifest.json").is_file()
    assert not (tmp_path / "dedup" / "s0.manifest.json").exists()


def test_row_numbers_hold_across_batches_and_empty_shards_flow_through(tmp_path):
    rng = random.Random(1)
    texts = [word_salad(rng, 12) for _ in range(common.ROW_GROUP_ROWS + 60)]
    texts.append(texts[3])  # an exact copy, in the second Arrow batch of the shard
    write_ingest_shard(tmp_path / "ingest" / "big.parquet", texts)
    write_ingest_shard(tmp_path / "ingest" / "empty.parquet", ["Too short.", "Also too short."])
    only_long = {**FILTER, "rules": ["word_count"], "min_words": 10}
    F.filter_shards(tmp_path / "ingest", tmp_path / "filter", only_long)
    assert pq.read_table(tmp_path / "filter" / "sigs" / "empty.parquet").num_rows == 0
    D.dedup_index(tmp_path / "filter" / "sigs", tmp_path / "index", DEDUP)
    dups = pq.read_table(tmp_path / "index" / "duplicates.parquet").to_pylist()
    # Same text, same id, same length: the tie goes to the smaller (shard, row).
    assert dups == [{"id": common.content_id(texts[3]), "shard": "big", "row": len(texts) - 1, "rule": "exact_dup",
                     "kept_id": common.content_id(texts[3]), "kept_shard": "big"}]
    D.dedup_shards(tmp_path / "filter" / "kept", tmp_path / "index" / "duplicates.parquet", tmp_path / "dedup", DEDUP)
    kept = pq.read_table(tmp_path / "dedup" / "kept" / "big.parquet").column("text").to_pylist()
    assert kept == texts[:-1]
    assert pq.read_table(tmp_path / "dedup" / "kept" / "empty.parquet").num_rows == 0
