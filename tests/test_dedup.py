"""Stage `dedup`: the global index (exact + MinHash near duplicates across shards) and the per-shard apply."""
import json
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fixtures_docs import word_salad, write_ingest_shard
from stages import common
from stages import dedup as D
from stages import filter as F
from stages.filters import minhash as M

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
    assert counts["buckets_capped"] == 0 and counts["near_edges"] >= 2 and counts["exact_edges"] == 2
    # The sigs, and each band range's edges and their manifest.
    assert len(manifest["inputs"]) == 3 + 2 * DEDUP["band_shards"] == 2 * manifest["band_ranges"] + 3


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


P31 = (1 << 31) - 1  # MinHash values are < 2^31 - 1 (stored as uint32)
MP = M.minhash_params(FILTER)
ROWS = MP["rows"]


def band_positions(*bands: int) -> list[int]:
    return [band * ROWS + r for band in bands for r in range(ROWS)]


def mutate(rng: np.random.Generator, sig: np.ndarray, positions) -> np.ndarray:
    """`sig` with the minima at `positions` replaced by other values (each surely different from the old one)."""
    out = sig.copy()
    positions = np.asarray(list(positions))
    out[positions] = (out[positions] + rng.integers(1, P31, len(positions), dtype=np.uint64)) % np.uint64(P31)
    return out


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(x == y))


def write_sigs(path, minhash: np.ndarray, tokens=None) -> list[str]:
    """A sigs shard of synthetic signatures, band hashes as the filter computes them; returns texts whose content
    ids are the documents' ids (for a matching filter/kept shard). Every exact_hash differs."""
    n, shard = len(minhash), path.stem
    texts = [f"{shard} document {i}" for i in range(n)]
    table = pa.table({"id": [common.content_id(t) for t in texts], "shard": [shard] * n, "row": np.arange(n),
                      "approx_tokens": np.full(n, 10) if tokens is None else np.asarray(tokens),
                      "exact_hash": [f"{shard}-{i}" for i in range(n)],
                      "bands": M.band_hashes(minhash, MP["bands"], ROWS).tolist(), "minhash": minhash.tolist()},
                     schema=M.sigs_schema(MP, True))
    common.write_table(path, table)
    return texts


def fillers(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return list(rng.integers(0, P31, (n, MP["num_perm"]), dtype=np.uint64))


def duplicates(index_dir) -> list[dict]:
    return pq.read_table(index_dir / "duplicates.parquet").to_pylist()


def test_a_chain_through_a_shared_neighbour_is_one_component(tmp_path):
    """a ~ c and b ~ c (J^ 0.8), a !~ b (J^ 0.62): a, b and c collide only together (band 13), and c is last."""
    rng = np.random.default_rng(3)
    c = fillers(rng, 1)[0]
    a = mutate(rng, c, range(22))                                                  # bands 0-2
    b = mutate(rng, c, [7, 15] + [band * ROWS + 7 for band in range(2, 13)] + [band * ROWS for band in range(3, 12)])
    assert jaccard(a, c) > 0.8 and jaccard(b, c) > 0.8 and jaccard(a, b) < DEDUP["verify_min_jaccard"]
    sigs = [a, b, c] + fillers(rng, 5)
    texts = write_sigs(tmp_path / "sigs" / "s0.parquet", np.stack(sigs), tokens=[10, 10, 20] + [10] * 5)
    D.dedup_index(tmp_path / "sigs", tmp_path / "index", DEDUP)
    kept_id = common.content_id(texts[2])
    assert duplicates(tmp_path / "index") == [
        {"id": common.content_id(texts[row]), "shard": "s0", "row": row, "rule": "near_dup", "kept_id": kept_id,
         "kept_shard": "s0", "kept_row": 2, "component_size": 3} for row in (0, 1)]
    # Applied to the matching filter/kept shard: kept + rejected == input, c alone stands for its component.
    write_ingest_shard(tmp_path / "kept" / "s0.parquet", texts)
    D.dedup_shards(tmp_path / "kept", tmp_path / "index" / "duplicates.parquet", tmp_path / "dedup", DEDUP)
    kept = pq.read_table(tmp_path / "dedup" / "kept" / "s0.parquet").column("text").to_pylist()
    rejected = pq.read_table(tmp_path / "dedup" / "rejected" / "s0.parquet")
    assert len(kept) + rejected.num_rows == len(texts) and kept == texts[2:]
    assert rejected.column("detail").to_pylist() == [f"duplicate of {kept_id}"] * 2


def test_a_longer_chain_in_scrambled_order_is_one_component(tmp_path):
    """d0 ~ d1 ~ d2 ~ d3 ~ d4, step k rewriting rows 2k and 2k + 1 of bands 0-12 (J^ 0.77 to the next, 0.54 two steps
    away): the five collide only in band 13, stored d0 d2 d4 d1 d3, so d1 and d3 each have two earlier neighbours."""
    rng = np.random.default_rng(4)
    chain = [fillers(rng, 1)[0]]
    for step in range(4):
        chain.append(mutate(rng, chain[-1], [band * ROWS + r for band in range(13) for r in (2 * step, 2 * step + 1)]))
    threshold = DEDUP["verify_min_jaccard"]
    assert all(jaccard(x, y) >= threshold for x, y in zip(chain, chain[1:]))
    assert all(jaccard(x, y) < threshold for x, y in zip(chain, chain[2:]))
    stored = [0, 2, 4, 1, 3]
    texts = write_sigs(tmp_path / "sigs" / "s0.parquet", np.stack([chain[k] for k in stored] + fillers(rng, 3)),
                       tokens=[10, 10, 30, 10, 10, 10, 10, 10])  # d4 (row 2) is the longest
    manifest = D.dedup_index(tmp_path / "sigs", tmp_path / "index", DEDUP)
    dups = duplicates(tmp_path / "index")
    assert [d["row"] for d in dups] == [0, 1, 3, 4]
    assert {(d["kept_id"], d["kept_row"], d["component_size"]) for d in dups} == {(common.content_id(texts[2]), 2, 5)}
    assert manifest["counts"]["near_edges"] == 4 and manifest["counts"]["cluster_sizes"] == {"5": 1}


def test_bucket_window_caps_the_comparisons_and_is_counted(tmp_path):
    """x, y, z share only band 13; x ~ z, y like neither. A window of 1 compares (x, y), (y, z) only."""
    rng = np.random.default_rng(5)
    x = fillers(rng, 1)[0]
    y = mutate(rng, x, range(13 * ROWS))
    z = mutate(rng, x, [band * ROWS for band in range(13)])
    assert jaccard(x, z) > 0.8 and jaccard(x, y) < 0.2 and jaccard(y, z) < 0.2
    write_sigs(tmp_path / "sigs" / "s0.parquet", np.stack([x, y, z] + fillers(rng, 4)))
    narrow = D.dedup_index(tmp_path / "sigs", tmp_path / "narrow", {**DEDUP, "bucket_window": 1})
    assert duplicates(tmp_path / "narrow") == []
    assert (narrow["counts"]["buckets"], narrow["counts"]["buckets_capped"], narrow["counts"]["largest_bucket"]) == \
        (1, 1, 3)
    assert (narrow["counts"]["candidate_pairs"], narrow["counts"]["near_pairs_below_jaccard"]) == (2, 2)
    wide = D.dedup_index(tmp_path / "sigs", tmp_path / "wide", {**DEDUP, "bucket_window": 2})
    assert [d["row"] for d in duplicates(tmp_path / "wide")] == [2] and wide["counts"]["buckets_capped"] == 0


def test_verification_drops_band_collisions_below_the_jaccard_threshold(tmp_path):
    rng = np.random.default_rng(0)
    base = fillers(rng, 1)[0]
    close = mutate(rng, base, band_positions(0, 1))                 # J^ 0.86, shares bands 2-13
    far = mutate(rng, base, range(ROWS, MP["num_perm"] - 2))        # J^ 0.09, shares band 0 with base
    far[: ROWS] = base[: ROWS]
    write_sigs(tmp_path / "sigs" / "s0.parquet", np.stack([base, close, far]))
    manifest = D.dedup_index(tmp_path / "sigs", tmp_path / "index", DEDUP)
    assert [d["row"] for d in duplicates(tmp_path / "index")] == [1]
    assert (manifest["counts"]["near_edges"], manifest["counts"]["near_pairs_below_jaccard"]) == (1, 1)
    D.dedup_index(tmp_path / "sigs", tmp_path / "all", {**DEDUP, "verify_min_jaccard": None})
    assert [d["row"] for d in duplicates(tmp_path / "all")] == [1, 2]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Three sigs shards: random documents and planted near-duplicate clusters of 2 to 6 spread over the shards."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(11)
    docs = fillers(rng, 240)
    for _ in range(40):
        base = fillers(rng, 1)[0]
        docs += [base] + [mutate(rng, base, rng.choice(MP["num_perm"], rng.integers(5, 30), replace=False))
                          for _ in range(rng.integers(1, 6))]
    order = rng.permutation(len(docs))
    for k, part in enumerate(np.array_split(order, 3)):
        write_sigs(root / "sigs" / f"s{k}.parquet", np.stack([docs[i] for i in part]),
                   tokens=rng.integers(5, 15, len(part)))
    return root


@pytest.mark.parametrize("band_shards", [2, 5, 14])
def test_duplicates_do_not_depend_on_how_bands_are_split(planted, tmp_path, band_shards):
    whole = D.dedup_index(planted / "sigs", tmp_path / "one", {**DEDUP, "band_shards": 1})
    split = D.dedup_index(planted / "sigs", tmp_path / "split", {**DEDUP, "band_shards": band_shards})
    assert whole["counts"]["duplicates"] > 40 and whole["counts"]["largest_cluster"] >= 4
    assert split["outputs"] == whole["outputs"]  # duplicates.parquet: same bytes, same hash
    assert split["band_ranges"] == band_shards
    for key in ("docs", "clusters", "duplicates", "near_dup", "near_edges", "buckets", "buckets_capped"):
        assert split["counts"][key] == whole["counts"][key]


def test_index_is_deterministic_and_conserves_documents(planted, tmp_path):
    first = D.dedup_index(planted / "sigs", tmp_path / "a", DEDUP)
    second = D.dedup_index(planted / "sigs", tmp_path / "b", DEDUP)
    for name in ["duplicates.parquet"] + [f"edges/{r}.parquet" for r in D.band_ranges(MP["bands"], 2)]:
        assert common.sha256_file(tmp_path / "a" / name) == common.sha256_file(tmp_path / "b" / name)
    counts = first["counts"]
    assert counts == second["counts"]
    # Each component of two or more keeps exactly one: documents kept + listed == documents in.
    sizes = {int(size): n for size, n in counts["cluster_sizes"].items()}
    assert counts["duplicates"] == sum((size - 1) * n for size, n in sizes.items())
    assert counts["clusters"] == sum(sizes.values())
    dups = duplicates(tmp_path / "a")
    removed = {(d["shard"], d["row"]) for d in dups}
    assert len(removed) == len(dups) and not removed & {(d["kept_shard"], d["kept_row"]) for d in dups}


def test_edge_shards_must_cover_every_band_once_with_these_params(planted, tmp_path):
    paths = D.all_band_edges(planted / "sigs", tmp_path / "edges", DEDUP)
    assert paths == [tmp_path / "edges" / f"{name}.parquet" for name in ("00-07", "07-14")]
    with pytest.raises(common.StageError, match="need every band"):
        D.merge_edges(planted / "sigs", paths[:1], tmp_path / "index", DEDUP)
    with pytest.raises(common.StageError, match="need every band"):
        D.merge_edges(planted / "sigs", paths + paths[:1], tmp_path / "index", DEDUP)
    with pytest.raises(common.StageError, match="built with other dedup params"):
        D.merge_edges(planted / "sigs", paths, tmp_path / "index", {**DEDUP, "verify_min_jaccard": 0.5})
    with pytest.raises(common.StageError, match="--bands '07-20'"):
        D.band_edges(planted / "sigs", "07-20", tmp_path / "bad", DEDUP)
    with pytest.raises(common.StageError, match="band_shards: 15"):
        D.band_ranges(14, 15)
    assert D.band_ranges(14, 3) == ["00-04", "04-09", "09-14"]


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


def test_cli_edges_per_band_range_then_merge_then_apply_one_shard(corpus, tmp_path):
    root = corpus["root"]
    cfg = json.dumps({"dedup": DEDUP})
    run = [sys.executable, "-m", "stages.dedup", "--params-json", cfg]
    sigs = ["--sigs-dir", str(root / "filter" / "sigs")]
    edges = tmp_path / "index" / "edges"
    for name in D.band_ranges(MP["bands"], DEDUP["band_shards"]):  # one job per range, as the rules run them
        subprocess.run(run + ["edges", *sigs, "--output-dir", str(edges), "--bands", name], check=True, cwd=common.REPO)
    subprocess.run(run + ["merge", *sigs, "--edges-dir", str(edges), "--output-dir", str(tmp_path / "index")],
                   check=True, cwd=common.REPO)
    assert common.sha256_file(tmp_path / "index" / "duplicates.parquet") == \
        common.sha256_file(root / "index" / "duplicates.parquet")
    subprocess.run(run + ["apply", "--input-dir", str(root / "filter" / "kept"),
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
                     "kept_id": common.content_id(texts[3]), "kept_shard": "big", "kept_row": 3, "component_size": 2}]
    D.dedup_shards(tmp_path / "filter" / "kept", tmp_path / "index" / "duplicates.parquet", tmp_path / "dedup", DEDUP)
    kept = pq.read_table(tmp_path / "dedup" / "kept" / "big.parquet").column("text").to_pylist()
    assert kept == texts[:-1]
    assert pq.read_table(tmp_path / "dedup" / "kept" / "empty.parquet").num_rows == 0
