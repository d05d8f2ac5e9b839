"""schedule: the FG-WSD plan is exact arithmetic: phase tokens sum to the budget, shares match the recipe, the
high-quality share rises through the stable stage, decay favours math/code/QA, and the 3b plan is the paper's."""
from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from stages import common, schedule

RECIPE_SHARES = {"warmup": 0.004, "diversity_stable": 0.54, "hq_stable": 0.28, "decay": 0.17}


def params_at(scale: str) -> dict:
    params = common.load_params()
    params["scale"] = scale
    return params


def buckets_json(scale: str, tokens: dict[str, int]) -> dict:
    """What select writes: bucket sizes (bytes / 4 estimates) plus the scale's budgets and epoch bounds."""
    p = common.stage_params(params_at(scale), "select")
    return {"budgets": p["budgets"], "epoch_bounds": {k: p[k] for k in ("min_top_epochs", "max_epochs")},
            "buckets": {b: {"docs": 1, "approx_tokens": n, "epochs": 1.0} for b, n in tokens.items()}}


TINY_BUCKETS = {"top/general": 120_000, "top/math": 30_000, "top/code": 20_000, "pool/general": 200_000,
                "pool/qa": 10_000}


def plan_at(scale: str, tokens: dict[str, int] = TINY_BUCKETS, real: dict[str, int] | None = None) -> dict:
    """The plan for select's estimates `tokens` and the real stream sizes `real` (the estimates when None)."""
    return schedule.fgwsd_plan(buckets_json(scale, tokens), real or tokens,
                               common.stage_params(params_at(scale), "schedule"))


def expected_draws(plan: dict) -> dict[str, float]:
    """What the pretrain sampler draws from each bucket in expectation: phase k draws sequences i.i.d. from its
    mixture (stages/pretrain.py sequence_buckets), so bucket b gets sum_k T_k m_k(b) tokens."""
    out: dict[str, float] = {}
    for ph in plan["phases"]:
        total = math.fsum(ph["mixture"].values())
        for b, f in ph["mixture"].items():
            out[b] = out.get(b, 0.0) + ph["tokens"] * f / total
    return out


def test_largest_remainder_is_exact():
    assert schedule.largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert schedule.largest_remainder(23, [Fraction(1, 10), Fraction(124, 10), Fraction(65, 10), 4]) == [0, 12, 7, 4]
    assert sum(schedule.largest_remainder(1_000_003, [0.3, 0.3, 0.4])) == 1_000_003


@pytest.mark.parametrize("scale", ["tiny", "small", "3b"])
def test_phases_sum_exactly_and_stage_shares_match_the_recipe(scale):
    plan = plan_at(scale)
    total = plan["total_tokens"]
    assert total == common.stage_params(params_at(scale), "select")["budgets"]["train_tokens"]
    assert sum(ph["tokens"] for ph in plan["phases"]) == total
    for stage, share in RECIPE_SHARES.items():
        got = sum(ph["tokens"] for ph in plan["phases"] if ph["stage"] == stage) / total
        assert got == pytest.approx(share, abs=0.005), stage


def test_3b_plan_is_the_papers_numbers():
    plan = plan_at("3b")
    stage_tokens = {s: sum(ph["tokens"] for ph in plan["phases"] if ph["stage"] == s) for s in schedule.STAGES}
    assert plan["total_tokens"] == 23 * 10**12
    assert stage_tokens == {"warmup": 10**11, "diversity_stable": 124 * 10**11, "hq_stable": 65 * 10**11,
                            "decay": 4 * 10**12}
    warmup, decay = plan["phases"][0], plan["phases"][-1]
    assert (warmup["lr_start"], warmup["lr_end"], warmup["lr_shape"]) == (0.0, 4.5e-4, "linear")
    assert (decay["lr_start"], decay["lr_end"]) == (4.5e-4, 1.5e-6)
    assert all(ph["lr_start"] == ph["lr_end"] == 4.5e-4 and ph["lr_shape"] == "constant"
               for ph in plan["phases"] if ph["stage"] in schedule.STABLE)
    assert decay["seq_len_scale"] == 2.0 and decay["rope_theta_scale"] > 1.0
    assert all(ph["seq_len_scale"] == ph["rope_theta_scale"] == 1.0 for ph in plan["phases"][:-1])


def test_3b_pool_top_stream_arithmetic():
    """12.5T pool of which 6.5T top, 23T stream: the top subset is drawn >= 2 epochs, the rest about once."""
    plan = plan_at("3b", {"top/general": 5 * 10**12, "top/math": 15 * 10**11, "pool/general": 6 * 10**12})
    assert plan["tiers"]["top"]["tokens"] == 65 * 10**11 and sum(plan["buckets"].values()) == 125 * 10**11
    assert sum(plan["draws"].values()) == pytest.approx(23 * 10**12, rel=1e-9)
    assert plan["tiers"]["top"]["epochs"] >= 2.0 and 0.8 < plan["tiers"]["pool"]["epochs"] < 1.5


def test_mixtures_sum_to_one_over_existing_buckets():
    for ph in plan_at("tiny")["phases"]:
        assert set(ph["mixture"]) <= set(TINY_BUCKETS)
        assert math.fsum(ph["mixture"].values()) == pytest.approx(1.0, abs=1e-9)
        assert all(round(f, 6) == f for f in ph["mixture"].values())


def test_high_quality_share_rises_across_stable_sub_phases():
    stable = [ph for ph in plan_at("tiny")["phases"] if ph["stage"] in schedule.STABLE]
    top = [sum(f for b, f in ph["mixture"].items() if b.startswith("top/")) for ph in stable]
    assert len(stable) >= 4 and top[0] == pytest.approx(0.5, abs=1e-6)  # about 1:1 HQ:MQ at the start
    assert all(b >= a for a, b in zip(top, top[1:])) and top[-1] > top[0]


def test_decay_raises_math_code_and_qa():
    phases = plan_at("tiny")["phases"]
    last_stable, decay = phases[-2], phases[-1]
    for group in ("math", "code", "qa"):
        share = lambda ph: sum(f for b, f in ph["mixture"].items() if b.endswith("/" + group))
        assert share(decay) > share(last_stable), group


def test_epochs_on_a_hand_computed_example():
    """Two buckets, one per tier, a plan of 1000 tokens with hq shares 0.5 / 1.0 (no boosts)."""
    p = common.stage_params(params_at("tiny"), "schedule")
    p["stage_weights"] = {"warmup": 1, "diversity_stable": 4, "hq_stable": 4, "decay": 1}
    p["phases"] = [{"name": "warmup", "stage": "warmup", "weight": 1, "hq_share": 0.5},
                   {"name": "stable_diverse_1", "stage": "diversity_stable", "weight": 1, "hq_share": 0.5},
                   {"name": "stable_hq_1", "stage": "hq_stable", "weight": 1, "hq_share": 1.0},
                   {"name": "decay", "stage": "decay", "weight": 1, "hq_share": 1.0}]
    buckets = {"budgets": {"train_tokens": 1000}, "epoch_bounds": {"min_top_epochs": 2, "max_epochs": 4},
               "buckets": {"top/general": {"approx_tokens": 150, "epochs": 3.0},
                           "pool/general": {"approx_tokens": 200, "epochs": 1.0}}}
    plan = schedule.fgwsd_plan(buckets, {"top/general": 200, "pool/general": 250}, p)  # real sizes rule
    assert [ph["tokens"] for ph in plan["phases"]] == [100, 400, 400, 100]
    # top: 0.5*100 + 0.5*400 + 400 + 100 = 750 -> 3.75 epochs; pool: 50 + 200 = 250 -> 1 epoch
    assert plan["draws"] == {"pool/general": 250, "top/general": 750}
    assert plan["epochs"] == {"pool/general": 1.0, "top/general": 3.75}
    assert plan["phases"][2]["mixture"] == {"top/general": 1.0}
    assert plan["select_epochs"] == {"pool/general": 1.0, "top/general": 3.0}
    assert plan["select_approx_tokens"] == {"pool/general": 200, "top/general": 150}
    assert plan["hq_share_lift"] == 0.0 and plan["min_top_epochs_met"]


def test_min_top_epochs_hold_in_real_tokens():
    """BPE streams larger than the bytes / 4 estimates (math and code compress worse): a plan sized on the estimates
    gives top buckets < min_top_epochs of their real streams; the plan built from the real sizes lifts the top
    shares just enough that the sampler's expected draws give every top bucket >= min_top_epochs."""
    approx = {"top/general": 300_000, "top/math": 2_400, "top/code": 60_000, "pool/general": 240_000,
              "pool/math": 7_500, "pool/code": 50_000}
    real = {"top/general": 330_000, "top/math": 3_400, "top/code": 66_000, "pool/general": 260_000,
            "pool/math": 10_800, "pool/code": 55_000}
    m = common.stage_params(params_at("tiny"), "select")["min_top_epochs"]
    estimated = expected_draws(plan_at("tiny", approx))
    assert min(estimated[b] / real[b] for b in real if b.startswith("top/")) < m  # the bug: < m in real tokens
    plan = plan_at("tiny", approx, real)
    assert plan["buckets"] == real and 0 < plan["hq_share_lift"] < 1 and plan["min_top_epochs_met"]
    draws = expected_draws(plan)
    epochs = {b: draws[b] / real[b] for b in real if b.startswith("top/")}
    assert min(epochs.values()) >= m
    assert min(epochs.values()) < m + 0.01  # the smallest lift that does it, not more
    assert all(math.isclose(plan["epochs"][b], round(e, 4), abs_tol=1e-4) for b, e in epochs.items())
    shares = [plan["hq_shares"][ph["name"]] for ph in plan["phases"] if ph["stage"] in schedule.STABLE]
    assert all(b >= a for a, b in zip(shares, shares[1:]))  # still rising through the stable stage


def test_a_stream_too_short_for_min_top_epochs_is_recorded():
    real = {"top/general": 600_000, "pool/general": 100_000}  # 2 epochs of top would need 1.2M of a 1M stream
    plan = plan_at("tiny", {"top/general": 300_000, "pool/general": 100_000}, real)
    assert plan["hq_share_lift"] == 1.0 and not plan["min_top_epochs_met"]
    assert all(set(ph["mixture"]) == {"top/general"} for ph in plan["phases"])
    assert "NOT met" in schedule.plan_markdown(plan)


def test_a_selected_bucket_without_a_stream_is_an_error():
    with pytest.raises(common.StageError, match=r"\['top/math'\] have no token stream"):
        plan_at("tiny", TINY_BUCKETS, {b: n for b, n in TINY_BUCKETS.items() if b != "top/math"})


def test_a_missing_tier_hands_its_share_to_the_other():
    plan = plan_at("tiny", {"top/general": 1000, "top/math": 1000})
    assert plan["phases"][1]["mixture"] == {"top/general": 0.5, "top/math": 0.5}


def test_falling_hq_share_is_refused():
    p = common.stage_params(params_at("tiny"), "schedule")
    p["phases"][2]["hq_share"] = 0.1
    with pytest.raises(common.StageError, match="must rise"):
        schedule.fgwsd_plan(buckets_json("tiny", TINY_BUCKETS), TINY_BUCKETS, p)


def test_write_plan_is_deterministic_and_cli_runs(tmp_path):
    src = tmp_path / "buckets.json"
    common.write_json(src, buckets_json("tiny", TINY_BUCKETS))
    streams = tmp_path / "tokenize_manifest.json"
    common.write_json(streams, {"buckets": {b: {"bin": f"buckets/{b}.bin", "tokens": n}
                                            for b, n in TINY_BUCKETS.items()}})
    p = common.stage_params(params_at("tiny"), "schedule")
    schedule.write_plan(src, streams, tmp_path / "one", p)
    schedule.main(["--params-json", json.dumps({"schedule": p}), "--buckets", str(src), "--tokens-manifest",
                   str(streams), "--output-dir", str(tmp_path / "two")])
    for name in ("plan.json", "plan.md", "manifest.json"):
        assert common.sha256_file(tmp_path / "one" / name) == common.sha256_file(tmp_path / "two" / name)
    plan = json.loads((tmp_path / "one" / "plan.json").read_text())
    assert {"total_tokens", "lr_peak", "lr_final", "buckets", "phases"} <= set(plan)
    assert set(plan["phases"][0]) == {"name", "stage", "tokens", "lr_start", "lr_end", "lr_shape", "seq_len_scale",
                                      "rope_theta_scale", "mixture"}
    assert "| decay | decay |" in (tmp_path / "one" / "plan.md").read_text()
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(common.StageError, match="bad.json"):
        schedule.write_plan(tmp_path / "bad.json", streams, tmp_path / "three", p)
    with pytest.raises(common.StageError, match="bad.json"):
        schedule.write_plan(src, tmp_path / "bad.json", tmp_path / "three", p)
