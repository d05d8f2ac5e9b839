"""The report card: evaluation rows with 95% intervals, post-training sections with and without post-trained
checkpoints, stage deltas labelled inside / beyond the interval, the SFT data metrics, and the dvclive columns.
Metrics are built by stages.evaluate.benchmark_metrics from per-problem scores, so every interval is computed."""
import json

import pytest

from stages import common, eval_stats
from stages import evaluate as ev
from stages import report

CFG = {"bootstrap_resamples": 1000, "seed": 1234}
LEVELS = [1] * 20 + [2] * 20


# the shape stages/sft_data.py writes (metrics.json)
SFT_METRICS = {
    "counts": {"instructions": 10, "kept": 6, "rejected": 4},
    "rounds": [{"round": 0, "instructions": 10, "solved": 5, "solved_rate": 0.5, "candidates": 20,
                "candidate_pass_rate": 0.3, "by_source": {}},
               {"round": 1, "instructions": 6, "solved": 2, "solved_rate": 1 / 3, "candidates": 12,
                "candidate_pass_rate": 0.25, "by_source": {}}],
    "items": {"final_answer": {"checked": 8, "passed": 5, "pass_rate": 0.625},
              "length": {"checked": 0, "passed": 0, "pass_rate": None}},
    "rejections": {"checklist_failed": 3, "cot_unreconstructable": 1},
}


def write_eval(art, name: str, benches: dict[str, list[list[float]]], fmt: str) -> None:
    """art/eval/<name>/{metrics,scores}.json as stages.evaluate writes them, from per-problem sample scores
    (ladder_* benchmarks get levels: 20 problems at L1, 20 at L2)."""
    metrics, scores = {}, {}
    for bench, per_problem in benches.items():
        ids = [f"{bench}-{i}" for i in range(len(per_problem))]
        levels = LEVELS if bench.startswith("ladder") else None
        metrics[bench], scores[bench] = ev.benchmark_metrics(bench, ids, per_problem, levels,
                                                             {**CFG, "prompt_format": fmt})
    common.write_json(art / "eval" / name / "metrics.json", metrics)
    common.write_json(art / "eval" / name / "scores.json", scores)


def solved(n_right: int, n: int = 40, k: int = 2) -> list[list[float]]:
    """n problems, the first n_right solved in every one of k samples."""
    return [[1.0] * k if i < n_right else [0.0] * k for i in range(n)]


def write_pipeline(art) -> None:
    """The pre-evaluation artifacts the card reads (funnel, plan, pretrain manifest), minimal."""
    common.write_json(art / "funnel" / "funnel.json", {
        "steps": [{"stage": "filter", "docs_in": 100, "docs_kept": 80, "tokens_kept": 8000,
                   "dropped": [{"rule": "short", "docs": 20}]}],
        "utility_histogram": {"3": 40, "7": 40}})
    common.write_json(art / "schedule" / "plan.json", {"phases": [{"lr_start": 1e-3, "lr_end": 1e-4,
                                                                   "mixture": {"web": 0.7, "math": 0.3}}]})
    common.write_json(art / "pretrain" / "manifest.json", {
        "num_parameters": 1000, "schedule": "fgwsd", "wall_time_s": 3.0, "loss_start": 9.0, "loss_end": 5.0,
        "counts": {"tokens_consumed": 4096, "steps": 4,
                   "phases": [{"name": "decay", "stage": "decay", "tokens_planned": 4096, "tokens_consumed": 4096,
                               "steps": 4, "seq_len": 64}]}})


def card(tmp_path, checkpoints, sft_data=None) -> tuple[str, dict]:
    art = tmp_path / "artifacts"
    text = report.write_report(art, checkpoints, tmp_path / "out", tmp_path / "live",
                               {"scale": "tiny", **CFG}, pretrain_live=tmp_path / "no_live", sft_data_file=sft_data)
    return text, json.loads((tmp_path / "live" / "metrics.json").read_text())


def section(text: str, title: str) -> str:
    return text.split(f"### {title}\n", 1)[1].split("\n#", 1)[0]


def test_report_without_post_training_checkpoints_lists_what_was_evaluated(tmp_path):
    art = tmp_path / "artifacts"
    write_pipeline(art)
    write_eval(art, "base", {"tiny_math": solved(4), "ladder_math": solved(6)}, "plain")
    write_eval(art, "phase_decay", {"tiny_math": solved(3), "ladder_math": solved(5)}, "plain")
    text, live = card(tmp_path, ["base", "phase_decay"])
    assert ("Evaluated: base; not evaluated (no row): teacher, sft_cold, sft_full, distill, rl_stem, rl_code, "
            "rl_pref.") in text
    assert "No RL stage has run." in text and "rl_metrics.png" not in text
    ladder = section(text, "Held-out task ladder, per level")
    assert "| base | plain | 40 |" in ladder and "teacher" not in ladder and "phase_decay" not in ladder
    # 6 of the 20 L1 problems right in both samples: 30.0% with its bootstrap interval over problems
    lo, hi = eval_stats.accuracy_interval([1.0] * 6 + [0.0] * 14, False, 1000,
                                          eval_stats.derived_seed(1234, "ladder_math", 1))[0]
    assert f"30.0 [{100 * lo:.1f}, {100 * hi:.1f}]" in ladder and "| 0.0 [0.0, 16.1] |" in ladder  # L2: Wilson 0/20
    assert "Needs two evaluated stages" in section(text, "What each stage bought")
    assert "Needs the teacher" in section(text, "The teacher's margin over the student")
    assert "sft_data stage has not run" in text
    assert "| phase_decay | plain |" in text and "ours from `base` (no post-trained checkpoint evaluated yet)" in text
    assert live["base"]["ladder_math"]["L1"]["avg@k"] == 0.3 and "stage_delta" not in live
    assert live["base"]["tiny_math"]["avg@k:ci95_low"] < 0.1 < live["base"]["tiny_math"]["avg@k:ci95_high"]


def test_report_with_post_training_labels_deltas_inside_and_beyond_the_interval(tmp_path):
    art = tmp_path / "artifacts"
    write_pipeline(art)
    write_eval(art, "base", {"ladder_math": solved(2), "tiny_math": solved(1)}, "plain")
    write_eval(art, "sft_full", {"ladder_math": solved(20), "tiny_math": solved(1)}, "chat")      # +45 points
    write_eval(art, "distill", {"ladder_math": solved(21), "tiny_math": solved(2)}, "chat")      # +1 problem
    write_eval(art, "teacher", {"ladder_math": solved(38), "tiny_math": solved(30)}, "chat")
    sft = tmp_path / "sft_metrics.json"
    common.write_json(sft, SFT_METRICS)
    text, live = card(tmp_path, ["base", "sft_full", "distill", "teacher"], sft_data=sft)
    assert "not evaluated (no row): sft_cold, rl_stem, rl_code, rl_pref." in text
    bought = section(text, "What each stage bought")
    assert "`sft_full` vs `base`:" in bought and "`distill` vs `sft_full`:" in bought and "sft_cold" not in bought
    tables = bought.split("`distill` vs `sft_full`:")
    assert "| ladder_math |" in tables[0] and "+45.0 [" in tables[0] and "beyond the interval" in tables[0]
    assert "| ladder_math |" in tables[1] and "+2.5 [" in tables[1] and "beyond" not in tables[1]
    assert tables[1].count("inside the interval") == 2  # ladder_math and tiny_math of distill
    margin = section(text, "The teacher's margin over the student")
    assert "distill (%)" in margin and "teacher (%)" in margin and "+42.5 [" in margin
    assert "beyond the interval" in margin
    ladder = section(text, "Held-out task ladder, per level")
    assert [line.split(" | ")[0] for line in ladder.splitlines() if line.startswith("| ")][1:] == \
        ["| base", "| teacher", "| sft_full", "| distill"]  # the recipe's order, sft_cold absent
    sft_text = section(text, "SFT data (generate-critique-revise)")
    assert "10 instructions -> 6 kept, 4 rejected." in sft_text and "| 1 | 6 | 33.3 | 12 | 25.0 |" in sft_text
    assert "| final_answer | 8 | 5 | 62.5 |" in sft_text and "| checklist_failed | 3 |" in sft_text
    assert live["stage_delta"]["sft_full"]["ladder_math"]["delta"] == pytest.approx(0.45)
    assert live["stage_delta"]["distill"]["ladder_math"]["ci95_low"] <= 0 <= \
        live["stage_delta"]["distill"]["ladder_math"]["ci95_high"]
    assert live["teacher_margin"]["tiny_math"]["margin"] == pytest.approx(0.7)
    assert live["sft_data"]["item_pass_rate"]["final_answer"] == 0.625 and live["sft_data"]["count"]["kept"] == 6
    assert live["sft_data"]["round_1"]["solved_rate"] == pytest.approx(1 / 3)
    assert "ours from `distill`" in text and "| chat |" in text


def write_rl(art, role: str, domain: str, reward: str, kept: int, passes: list[int], trained: bool = True) -> None:
    """The pass filter's manifest + histogram and the RL run's manifest, in the shapes stages/pass_filter.py and
    stages/rl.py write."""
    k, n = len(passes) - 1, sum(passes)
    hard, easy = passes[0] + (passes[1] if k >= 10 else 0), passes[-1]
    common.write_json(art / "pass_filter" / role / "manifest.json", {
        "stage": "pass_filter", "role": role, "domain": domain, "reward": reward, "params": {"k": k},
        "counts": {"candidates": n, "samples": n * k, "kept": kept, "too_hard": hard, "too_easy": easy,
                   "mean_pass_rate": sum(j * c for j, c in enumerate(passes)) / (n * k)}})
    common.write_json(art / "pass_filter" / role / "histogram.json", {
        "k": k, "low": 0.1, "high": 0.9, "passes": passes,
        "verdicts": {"kept": kept, "too_hard": hard, "too_easy": easy}, "by_level": {}})
    run = {"steps": 4, "kept_prompts": kept, "samples": 64, "groups_dropped": 3, "truncated": 5, "trained": trained}
    common.write_json(art / role / "manifest.json", {
        "stage": role, "counts": run if trained else {**run, "steps": 0, "samples": 0},
        "reward_start": 0.25 if trained else None, "reward_end": 0.5 if trained else None,
        "pass_rate_start": 0.25 if trained else None, "pass_rate_end": 0.5 if trained else None,
        "wall_time_s": 12.0})


def test_report_rl_section_filters_runs_before_after_and_the_judge(tmp_path):
    art = tmp_path / "artifacts"
    write_pipeline(art)
    write_eval(art, "distill", {"ladder_math": solved(4), "ladder_code": solved(2)}, "chat")
    write_eval(art, "rl_stem", {"ladder_math": solved(24), "ladder_code": solved(2)}, "chat")    # +50 points
    write_eval(art, "rl_code", {"ladder_math": solved(24), "ladder_code": solved(3)}, "chat")    # +1 problem
    write_rl(art, "rl_stem", "math", "verifier", 6, [10, 3, 2, 1, 4])
    write_rl(art, "rl_code", "code", "verifier", 2, [20, 1, 1, 0, 0])
    write_rl(art, "rl_pref", "math+code", "judge", 0, [8, 0, 0, 0, 0], trained=False)
    rate = {"value": 0.75, "ci95_low": 0.5, "ci95_high": 0.9}
    common.write_json(art / "reward_model" / "metrics.json", {
        "heldout": {"pairs": 8, "accuracy": rate, "pair_accuracy": rate, "consistency": rate},
        "heldout_before": {"pairs": 8, "accuracy": {"value": 0.5, "ci95_low": 0.2, "ci95_high": 0.8},
                           "pair_accuracy": {"value": 0.5, "ci95_low": 0.2, "ci95_high": 0.8},
                           "consistency": {"value": 0.25, "ci95_low": 0.1, "ci95_high": 0.6}},
        "counts": {"train_pairs": 30, "heldout_pairs": 8, "pairs_rejected": 1, "steps": 12}})
    live_root = tmp_path / "rl_live"
    live = common.open_live(live_root / "rl_stem")
    for step in range(3):
        live.log_metric("rl/reward_mean", 0.2 * step)
        live.log_metric("train/clip_fraction", 0.01)
        live.next_step()
    live.end()
    text = report.write_report(art, ["distill", "rl_stem", "rl_code"], tmp_path / "out", tmp_path / "live",
                               {"scale": "tiny", **CFG}, pretrain_live=tmp_path / "no_live", rl_live_root=live_root)
    rl = text.split("## Reinforcement learning\n", 1)[1].split("\n## ", 1)[0]
    assert "| rl_stem | math | verifier | 4 | 20 | 6 | 10 | 4 | 32.5 |" in rl
    assert "| rl_pref | math+code | judge | 4 | 8 | 0 | 8 | 0 | 0.0 |" in rl
    assert "| rl_stem | 4 | 6 | 64 | 3 | 5 | 0.250 -> 0.500 | 25.0 -> 50.0 | 12 |" in rl
    assert "Not trained (no prompt kept, min_prompts 0: the init checkpoint passed through): rl_pref." in rl
    before_after = section(text, "Held-out accuracy before and after each RL stage")
    lines = [line for line in before_after.splitlines() if line.startswith("| distill -> rl_stem")]
    assert len(lines) == 1 and "| ladder_math |" in lines[0] and "+50.0 [" in lines[0] and "beyond" in lines[0]
    code = [line for line in before_after.splitlines() if line.startswith("| rl_stem -> rl_code")]
    assert len(code) == 1 and "| ladder_code |" in code[0] and "inside the interval" in code[0]
    judge = section(text, "Reward model (pairwise judge)")
    assert "30 train / 8 held-out pairs" in judge
    assert "| pair_accuracy | 50.0 [20.0, 80.0] | 75.0 [50.0, 90.0] |" in judge
    for png in ("rl_pass_filter.png", "rl_metrics.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000 and f"]({png})" in rl
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert metrics["rl_delta"]["rl_stem"]["ladder_math"]["delta"] == pytest.approx(0.5)
    assert metrics["pass_filter"]["rl_stem"]["kept"] == 6
    assert metrics["reward_model"]["heldout"]["pair_accuracy"] == 0.75
    assert "reward_start" not in metrics.get("rl_pref", {})


def test_sft_data_section_reads_defensively(tmp_path):
    assert "has not run" in report.sft_data_section(tmp_path / "missing.json")[0]
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"rounds": 3, "items": ["x"], "rejections": {"a": "many"}}))
    assert report.sft_data_section(odd) == (f"The SFT data metrics ({odd}) have none of counts, rounds, items, "
                                            "rejections in a known shape.", {})
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"rounds": [{"round": 0, "solved_rate": None}, "junk"],
                                   "rejections": {"length": 2, "bad": [1]}}))
    text, live = report.sft_data_section(partial)
    assert "| 0 | — | — | — | — |" in text and "| length | 2 |" in text and "bad" not in text
    assert live == {"sft_data/rejected/length": 2.0}
