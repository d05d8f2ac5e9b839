"""select: thresholds and budgets over scored shards, recall, buckets, epochs, conservation, determinism."""
from __future__ import annotations

import json
import re

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fixtures_quality as fq
from stages import common, funnel, quality_model, score, select

SCORED_SCHEMA = pa.schema(list(fq.DOC_SCHEMA) + [pa.field(t, pa.float64()) for t in score.TAGS]
                          + [pa.field("utility", pa.int8())])


def select_params(**overrides) -> dict:
    p = common.stage_params(common.load_params(), "select")
    p.update({"pool_min_utility": 5, "top_min_utility": 7, "recall_min_sim": 0.5, "recall_share": 0.1,
              "min_top_epochs": 2,
              "max_epochs": 4, "domain_groups": {"math": "math", "code": "code", "qa": "qa"},
              "default_group": "general", "budgets": {"pool_tokens": 10**9, "top_tokens": 10**8,
                                                      "train_tokens": 10**9}})
    p.update(overrides)
    return p


def scored_row(name: str, domain: str, utility: int, sim: float, tokens: int) -> dict:
    row = fq.doc_row(f"document {name}", domain)
    row.update({t: 0.5 for t in score.TAGS}, retrieval_sim=sim, utility=utility, approx_tokens=tokens)
    return row


def write_scored(directory, shards: dict[str, list[dict]]):
    for name, rows in shards.items():
        common.write_table(directory / f"{name}.parquet", common.rows_to_table(rows, SCORED_SCHEMA))
    return directory


def decisions(out) -> dict[str, dict]:
    """{text: row} over pool and rejected shards."""
    got = {}
    for part in ("pool", "rejected"):
        for path in sorted((out / part).glob("*.parquet")):
            for row in pq.read_table(path).to_pylist():
                got[row["text"].removeprefix("document ")] = dict(row, part=part)
    return got


@pytest.fixture
def hand_made(tmp_path):
    return write_scored(tmp_path / "score", {
        "a": [scored_row("high_math", "math", 9, 0.1, 100), scored_row("mid_web", "web", 5, 0.2, 100),
              scored_row("low_web", "web", 2, 0.1, 100)],
        "b": [scored_row("recalled_wiki", "wiki", 1, 0.8, 100), scored_row("top_code", "code", 7, 0.0, 100),
              scored_row("mid_qa", "qa", 6, 0.3, 100)],
    })


def test_thresholds_recall_and_buckets(hand_made, tmp_path):
    out = tmp_path / "select"
    summary = select.select_pool(hand_made, out, select_params())
    d = decisions(out)
    assert {k for k, v in d.items() if v["part"] == "pool"} == {"high_math", "mid_web", "recalled_wiki", "top_code",
                                                                  "mid_qa"}
    assert d["high_math"]["bucket"] == "top/math" and d["top_code"]["bucket"] == "top/code"
    assert d["mid_web"]["bucket"] == "pool/general" and d["mid_qa"]["bucket"] == "pool/qa"
    assert d["recalled_wiki"]["recalled"] and d["recalled_wiki"]["bucket"] == "pool/general"
    assert re.match(r"retrieval_sim 0\.8000 >= 0\.5000 with utility 1 < 5", d["recalled_wiki"]["recall_reason"])
    assert not d["mid_web"]["recalled"] and d["mid_web"]["recall_reason"] == ""
    assert d["low_web"]["rule"] == "below_pool_utility" and "utility 2 < 5" in d["low_web"]["detail"]
    # nothing binds: recall takes what the 400 utility-candidate tokens leave of the 10^9 budget
    assert summary["counts"] == {"scored": 6, "kept": 5, "rejected": 1, "recall_candidates": 1, "recalled": 1,
                                 "recalled_tokens": 100, "recall_budget_tokens": 10**9 - 400,
                                 "rejected_by_rule": {"below_pool_utility": 1}}
    assert summary["epoch_bounds"] == {"min_top_epochs": 2, "max_epochs": 4}
    assert summary["buckets"]["pool/general"] == {"docs": 2, "approx_tokens": 200, "epochs": 4.0}
    assert set(summary["buckets"]) == {"top/math", "top/code", "pool/general", "pool/qa"}
    for shard in ("a", "b"):  # conservation per shard, on the files
        n = common.count_rows(hand_made / f"{shard}.parquet")
        assert common.count_rows(out / "pool" / f"{shard}.parquet") + \
            common.count_rows(out / "rejected" / f"{shard}.parquet") == n
    assert json.loads((out / "buckets.json").read_text()) == summary


def test_budget_keeps_highest_utility_first_with_id_tie_break(tmp_path):
    rows = [scored_row(name, "web", u, 0.0, 100) for name, u in
            (("u6", 6), ("u8_a", 8), ("u9", 9), ("u8_b", 8), ("u8_c", 8))]
    src = write_scored(tmp_path / "score", {"s": rows})
    p = select_params(budgets={"pool_tokens": 300, "top_tokens": 150, "train_tokens": 1000})
    summary = select.select_pool(src, tmp_path / "out", p)
    d = decisions(tmp_path / "out")
    eights = sorted((r["id"], k) for k, r in d.items() if r["utility"] == 8)
    kept = {k for k, r in d.items() if r["part"] == "pool"}
    # utility 9 first, then the utility-8 documents in id order until the 300-token budget is spent
    assert kept == {"u9", eights[0][1], eights[1][1]}
    assert d[eights[2][1]]["rule"] == "over_pool_budget" and d["u6"]["rule"] == "over_pool_budget"
    assert "cumulative pool tokens 400 > pool budget 300" in d[eights[2][1]]["detail"]
    assert d["u9"]["bucket"] == "top/general"  # only 100 of 150 top tokens fit before the next doc overflows
    assert summary["tiers"]["top"]["approx_tokens"] == 100 and summary["tiers"]["pool"]["approx_tokens"] == 200


@pytest.fixture
def binding(tmp_path):
    """Ten utility candidates (utility 6..9) and five recall candidates (utility 1, retrieval_sim 0.6..0.9), 100
    tokens each: 1,500 candidate tokens for a 500-token pool."""
    rows = [scored_row(f"u{i}", "web", 6 + i % 4, 0.0, 100) for i in range(10)]
    rows += [scored_row(f"r{i}", "wiki", 1, 0.6 + 0.075 * i, 100) for i in range(5)]
    return write_scored(tmp_path / "score", {"s": rows})


def test_recall_keeps_its_share_when_the_pool_budget_binds(binding, tmp_path):
    p = select_params(recall_share=0.4, budgets={"pool_tokens": 500, "top_tokens": 200, "train_tokens": 2000})
    summary = select.select_pool(binding, tmp_path / "out", p)
    d = decisions(tmp_path / "out")
    kept = {k for k, r in d.items() if r["part"] == "pool"}
    # recall: floor(0.4 x 500) = 200 tokens to the two most similar; utility: the 300 left to the three best
    assert {k for k in kept if k.startswith("r")} == {"r4", "r3"}
    assert all(d[k]["recalled"] and d[k]["bucket"] == "pool/general" for k in ("r4", "r3"))
    assert sorted(d[k]["utility"] for k in kept if k.startswith("u")) == [8, 9, 9]
    assert d["r2"]["rule"] == "over_recall_budget"
    assert "cumulative recall tokens 300 > recall budget 200" in d["r2"]["detail"]
    assert {r["rule"] for k, r in d.items() if k.startswith("u") and r["part"] == "rejected"} == {"over_pool_budget"}
    assert summary["counts"]["kept"] == 5 and sum(b["approx_tokens"] for b in summary["buckets"].values()) == 500
    assert {k: summary["counts"][k] for k in ("recall_candidates", "recalled", "recalled_tokens",
                                              "recall_budget_tokens")} == {"recall_candidates": 5, "recalled": 2,
                                                                           "recalled_tokens": 200,
                                                                           "recall_budget_tokens": 200}
    assert funnel.select_recall(duckdb.connect(), tmp_path / "out") == {"candidates": 5, "docs_recalled": 2,
                                                                        "tokens_recalled": 200}
    none = select.select_pool(binding, tmp_path / "none", dict(p, recall_share=0.0))
    assert none["counts"]["recalled"] == 0 and none["counts"]["kept"] == 5  # share 0: the budget goes to utility


def test_recall_takes_what_utility_leaves(binding, tmp_path):
    p = select_params(recall_share=0.0, budgets={"pool_tokens": 1_300, "top_tokens": 200, "train_tokens": 3000})
    summary = select.select_pool(binding, tmp_path / "out", p)
    # 1,000 utility tokens all fit; the 300 left go to the three most similar recall candidates
    assert summary["counts"]["recalled"] == 3 and summary["counts"]["recall_budget_tokens"] == 300
    assert summary["counts"]["kept"] == 13
    with pytest.raises(common.StageError, match="recall_share"):
        select.select_pool(binding, tmp_path / "bad", dict(p, recall_share=1.5))


@pytest.mark.parametrize("top,pool,train,m,cap,expected", [
    (6_500, 6_000, 23_000, 2, 4, {"top": round(17 / 6.5, 6), "pool": 1.0, "stream_tokens": 23_000}),  # paper, in G
    (100, 300, 1_000, 2, 4, {"top": 4.0, "pool": 2.0, "stream_tokens": 1_000}),      # top capped, pool fills
    (100, 300, 350, 2, 4, {"top": 2.0, "pool": 0.5, "stream_tokens": 350}),          # top floor of 2 epochs
    (100, 300, 10_000, 2, 4, {"top": 4.0, "pool": 4.0, "stream_tokens": 1_600}),     # data too small: shortfall
    (0, 500, 1_000, 2, 4, {"top": 0.0, "pool": 2.0, "stream_tokens": 1_000}),        # no top tier
])
def test_bucket_epochs_hand_computed(top, pool, train, m, cap, expected):
    assert select.bucket_epochs(top, pool, train, m, cap) == expected


def test_budgets_are_validated(hand_made, tmp_path):
    with pytest.raises(common.StageError, match="top_tokens <= pool_tokens"):
        select.select_pool(hand_made, tmp_path, select_params(budgets={"pool_tokens": 10, "top_tokens": 20,
                                                                       "train_tokens": 100}))
    with pytest.raises(common.StageError, match="min_top_epochs"):
        select.select_pool(hand_made, tmp_path, select_params(budgets={"pool_tokens": 100, "top_tokens": 60,
                                                                       "train_tokens": 100}))


def test_changing_pool_min_utility_changes_the_pool_not_the_scores(hand_made, tmp_path):
    before = {p.name: common.sha256_file(p) for p in hand_made.iterdir()}
    low = select.select_pool(hand_made, tmp_path / "low", select_params(pool_min_utility=2))
    high = select.select_pool(hand_made, tmp_path / "high", select_params(pool_min_utility=7))
    assert low["counts"]["kept"] == 6 and high["counts"]["kept"] == 3  # high_math, top_code + recalled_wiki
    assert {p.name: common.sha256_file(p) for p in hand_made.iterdir()} == before


def test_select_is_deterministic(hand_made, tmp_path):
    select.select_pool(hand_made, tmp_path / "one", select_params())
    select.select_pool(hand_made, tmp_path / "two", select_params())
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 6
    for rel in files:
        assert common.sha256_file(tmp_path / "one" / rel) == common.sha256_file(tmp_path / "two" / rel), rel


def test_recall_brings_back_a_low_utility_document_similar_to_a_seed(tmp_path):
    """End to end: a seed document mangled into one lower-case word per line scores low, but retrieval recalls it."""
    seed_file = fq.write_seed_set(tmp_path / "seed.jsonl", n=30, seed=11)
    seed_text = json.loads(seed_file.read_text().splitlines()[0])["text"]
    mangled = "\n".join(re.sub(r"[^a-z ]", "", seed_text.lower()).split())
    rows = fq.corpus_rows(60, seed=11) + [fq.doc_row(mangled, "web")]
    common.write_table(tmp_path / "kept" / "s.parquet", common.rows_to_table(rows, fq.DOC_SCHEMA))
    params = common.load_params()
    quality_model.build_quality_model(seed_file, tmp_path / "kept", tmp_path / "qm",
                                      common.stage_params(params, "quality_model"))
    score.score_all(tmp_path / "kept", tmp_path / "qm", tmp_path / "score", common.stage_params(params, "score"))
    target = [r for r in pq.read_table(tmp_path / "score" / "s.parquet").to_pylist() if r["text"] == mangled][0]
    assert target["retrieval_sim"] > 0.5
    pool_min = int(target["utility"]) + 1  # a cut-off this document misses on utility alone
    p = select_params(pool_min_utility=pool_min, top_min_utility=max(pool_min, 7), recall_min_sim=0.5)

    def fate(out, p):
        select.select_pool(tmp_path / "score", out, p)
        pool = pq.read_table(out / "pool" / "s.parquet").to_pylist()
        return next((r for r in pool if r["id"] == target["id"]), None)

    recalled = fate(tmp_path / "with_recall", p)
    assert recalled is not None and recalled["recalled"] and recalled["bucket"].startswith("pool/")
    assert fate(tmp_path / "without_recall", dict(p, recall_min_sim=1.01)) is None


def test_cli(hand_made, tmp_path):
    select.main(["--params-json", json.dumps({"select": select_params()}), "--input-dir", str(hand_made),
                 "--output-dir", str(tmp_path / "cli")])
    assert (tmp_path / "cli" / "manifest.json").is_file()
