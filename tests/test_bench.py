"""bench/bench_data.py's workload builder and baseline mapping (no timing, no datatrove needed)."""
import importlib.util
import sys
from collections import Counter

import pyarrow as pa
import pytest

from stages import common

spec = importlib.util.spec_from_file_location("bench_data", common.REPO / "bench" / "bench_data.py")
bench_data = importlib.util.module_from_spec(spec)
sys.modules["bench_data"] = bench_data  # dataclasses resolve their module by name
spec.loader.exec_module(bench_data)

BASE = [
    "The river runs through the valley and the town that was built beside it.\nIt has a bridge of old stone.",
    "Numbers are counted with the digits of a place-value system.\nEach place is worth ten of the next.",
    "def area(r):\n    return 3.14159 * r * r",
]


@pytest.fixture
def ingest_dir(tmp_path):
    rows = [{"id": common.content_id(t), "source": "unit", "domain": "code" if t.startswith("def") else "web",
             "text": t, "n_chars": len(t), "approx_tokens": -(-len(t.encode()) // 4)} for t in BASE]
    common.write_table(tmp_path / "ingest" / "unit.parquet", pa.Table.from_pylist(rows))
    return tmp_path / "ingest"


def test_workload_has_requested_docs_in_fixed_size_shards(ingest_dir, tmp_path):
    summary = bench_data.build_workload(ingest_dir, tmp_path / "wl", n_docs=25, shard_docs=10, seed=7)
    shards = common.list_shards(tmp_path / "wl")
    assert shards == ["part-00000", "part-00001", "part-00002"]
    assert [common.count_rows(tmp_path / "wl" / f"{s}.parquet") for s in shards] == [10, 10, 5]
    assert summary["docs"] == 25 and sum(summary["variants"].values()) == 25
    assert summary["variants"]["original"] == len(BASE)
    rows = [r for s in shards for b in common.iter_batches(tmp_path / "wl" / f"{s}.parquet") for r in b]
    assert all(r["id"] == common.content_id(r["text"]) and r["n_chars"] == len(r["text"]) for r in rows)
    assert [r["text"] for r in rows[: len(BASE)]] == BASE


def test_workload_is_deterministic(ingest_dir, tmp_path):
    bench_data.build_workload(ingest_dir, tmp_path / "a", n_docs=40, shard_docs=16, seed=3)
    bench_data.build_workload(ingest_dir, tmp_path / "b", n_docs=40, shard_docs=16, seed=3)
    for shard in common.list_shards(tmp_path / "a"):
        assert common.sha256_file(tmp_path / "a" / f"{shard}.parquet") == \
            common.sha256_file(tmp_path / "b" / f"{shard}.parquet")


def test_replica_variants_keep_words_and_line_ends():
    text = BASE[0]
    variants = {}
    for k in range(1, 60):
        new, variant = bench_data.replica_text(text, k, 0, seed=11)
        variants.setdefault(variant, (k, new))
    assert set(variants) == {"exact", "near", "novel"}
    assert variants["exact"][1] == text
    k, near = variants["near"]
    assert near.split("\n")[-1] == bench_data.APPENDED_SENTENCE.format(k=k)
    novel = variants["novel"][1]
    assert novel != text and Counter(novel.split()) == Counter(text.split())
    assert [line.split()[-1] for line in novel.split("\n")] == [line.split()[-1] for line in text.split("\n")]


def test_datatrove_filters_carry_our_thresholds_and_exemptions():
    fp = common.stage_params(common.load_params(), "filter")
    specs = {s["name"]: s for s in bench_data.datatrove_filter_specs(fp)}
    assert list(specs)[-1] == "langid"
    assert specs["GopherQualityFilter"]["kwargs"]["min_doc_words"] == fp["min_words"]
    assert specs["GopherRepetitionFilter"]["kwargs"]["dup_n_grams"] == fp["max_dup_ngram_chars_frac"]
    assert specs["langid"]["kwargs"]["min_score"] == fp["lang_min_prob"]
    assert specs["GopherRepetitionFilter"]["kwargs"]["dup_para_frac"] == fp["max_dup_paragraphs_frac"]
    for name, s in specs.items():
        covered = {r for r, n in bench_data.DATATROVE_FILTER_OF_RULE.items() if n == name}
        for domain, rules in fp["rules_exempt_by_domain"].items():
            assert (domain in s["exempt_domains"]) == bool(set(rules) & covered), (name, domain)


@pytest.mark.parametrize("mode", list(bench_data.LANGID_MODES))
def test_each_ratio_mode_gives_datatrove_the_language_id_it_names(mode):
    """rules only: no language step; same langid: our vectorized classifier; full pipeline: stock langid.py."""
    fp = common.stage_params(common.load_params(), "filter")
    _, step = bench_data.LANGID_MODES[mode]
    names = [s["name"] for s in bench_data.datatrove_filter_specs(fp, step)]
    assert names[-1] == step if step else not {"langid", "vectorized_langid"} & set(names)
    assert bench_data.HEADLINE_MODE in bench_data.LANGID_MODES


def test_rules_only_params_turn_language_id_off(tmp_path):
    path = bench_data.params_without_langid(common.REPO / "params.yaml", tmp_path)
    fp = common.stage_params(common.load_params(path), "filter")
    assert fp["languages"] == [] and fp["rules"] == common.stage_params(common.load_params(), "filter")["rules"]
