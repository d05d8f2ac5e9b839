"""The report card: one markdown page + PNG plots, gathered from what the stages wrote.

Sections: the data funnel and utility histogram, the FG-WSD plan and the pretraining curve (loss and LR by
phase), held-out loss at each phase end, accuracy per benchmark per checkpoint with its 95% interval, post-training
(held-out ladder accuracy per level of base, teacher, sft_cold, sft_full, distill, rl_stem, rl_code, rl_pref; what each
stage bought, paired against the previous evaluated stage; the teacher's margin over the student; the SFT data's pass
rates and rejection reasons), RL (each stage's pass-rate filter and its histogram, the GRPO run's rollout metrics per
step, held-out accuracy before and after each stage on its domain, the reward model's held-out pair accuracy),
time and tokens per stage, the paper's table beside ours, and the ablation study when one has been run
(tools/ablate.py). Every figure is read from an artifact of this run; nothing is typed in except the paper's published
numbers (data/paper_results.yaml); a checkpoint that was not evaluated has no row. Evaluation metrics also go to
dvclive (dvclive/eval) for `dvc metrics show` and `dvc exp show`.

A difference between two checkpoints is "beyond the interval" when the 95% paired-bootstrap interval of the
per-problem difference (stages.eval_stats.paired_difference, report.bootstrap_resamples) excludes 0, else "inside
the interval": a gain inside it is not told from sampling noise on this many problems.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from stages import common, eval_stats  # noqa: E402

STAGE = "report"
POST_TRAINING = ("base", "teacher", "sft_cold", "sft_full", "distill", "rl_stem", "rl_code", "rl_pref")  # recipe order
STUDENT_CHAIN = ("base", "sft_cold", "sft_full", "distill", "rl_stem", "rl_code", "rl_pref")  # each from the one before
# RL stage -> (the checkpoint it starts from, the held-out benchmarks of its domain)
RL_STAGES = {"rl_stem": ("distill", ("ladder_math",)), "rl_code": ("rl_stem", ("ladder_code",)),
             "rl_pref": ("rl_code", ("ladder_math", "ladder_code"))}
RL_CURVES = (("rl", "reward_mean"), ("rl", "pass_rate"), ("rl", "response_length"), ("rl", "entropy"),
             ("train", "clip_fraction"), ("rl", "truncation_rate"))  # dvclive <prefix>/<name> per step
REPO = common.REPO
PNG_META = {"Software": None}  # no version stamp: the same run gives the same bytes


def read_json(path: Path) -> dict:
    data = common.read_manifest(path)
    if data is None:
        raise common.StageError(f"{path}: missing or not valid JSON")
    return data


def read_tsv_raw(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def read_tsv(path: Path) -> list[dict]:
    """A dvclive metric TSV as floats (missing file: no points)."""
    if not path.is_file():
        return []
    return [{k: float(v) for k, v in row.items() if k != "timestamp"} for row in read_tsv_raw(path)]


def savefig(fig, path: Path) -> Path:
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata=PNG_META)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- plots

def plot_funnel(funnel: dict, out: Path) -> Path:
    rows = [(f"{s['stage']}: {d['rule']}", d["docs"]) for s in funnel["steps"] for d in s["dropped"]]
    rows.append(("kept after select", funnel["steps"][-1]["docs_kept"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(4, 0.28 * len(rows))),
                                   gridspec_kw={"width_ratios": [3, 2]})
    labels, values = zip(*rows)
    ax1.barh(range(len(rows)), values, color=["#c44" if not l.startswith("kept") else "#4a4" for l in labels])
    ax1.set_yticks(range(len(rows)), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("documents")
    ax1.set_title("Data funnel: documents dropped per rule")
    hist = funnel["utility_histogram"]
    ax2.bar([int(u) for u in hist], list(hist.values()), color="#36c")
    ax2.set_xticks(range(10))
    ax2.set_xlabel("utility (0-9)")
    ax2.set_ylabel("documents")
    ax2.set_title("Utility histogram (scored documents)")
    return savefig(fig, out)


def plot_pretrain(live_dir: Path, manifest: dict, out: Path) -> Path | None:
    loss = read_tsv(live_dir / "plots" / "metrics" / "train" / "loss.tsv")
    lr = read_tsv(live_dir / "plots" / "metrics" / "train" / "lr.tsv")
    if not loss:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot([r["step"] for r in loss], [r["loss"] for r in loss], color="#36c", label="train loss")
    for name, color in (("hq", "#c60"), ("math", "#393")):
        pts = read_tsv(live_dir / "plots" / "metrics" / "eval" / f"heldout_{name}_loss.tsv")
        if pts:
            ax.plot([r["step"] for r in pts], [r[f"heldout_{name}_loss"] for r in pts], "o--", color=color,
                    label=f"held-out {name} loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    start = 0
    colors = {"warmup": "#eee", "diversity_stable": "#e6f0ff", "hq_stable": "#fff2d9", "decay": "#e8f7e8"}
    for ph in manifest["counts"]["phases"]:
        ax.axvspan(start, start + ph["steps"], color=colors.get(ph["stage"], "#f4f4f4"), zorder=0)
        ax.text(start + ph["steps"] / 2, ax.get_ylim()[1], ph["name"], ha="center", va="top", fontsize=7, rotation=90)
        start += ph["steps"]
    if lr:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in lr], [r["lr"] for r in lr], color="#888", lw=1, label="learning rate")
        ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"Pretraining ({manifest.get('schedule', '?')}): loss and LR by FG-WSD phase")
    return savefig(fig, out)


def plot_eval(evals: dict, out: Path) -> Path | None:
    benches = sorted({b for m in evals.values() for b in m})
    if not benches:
        return None
    names = list(evals)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) * len(benches) / 2), 4))
    width = 0.8 / len(benches)
    for j, bench in enumerate(benches):
        ms = [evals[n].get(bench) for n in names]
        ys = [100 * m["avg@k"] if m else 0.0 for m in ms]
        # a percentile interval need not hold the mean (a skewed resample distribution): bars never go negative
        err = [[max(0.0, y - 100 * m["avg@k:ci95_low"]) if m else 0.0 for y, m in zip(ys, ms)],
               [max(0.0, 100 * m["avg@k:ci95_high"] - y) if m else 0.0 for y, m in zip(ys, ms)]]
        ax.bar([i + j * width for i in range(len(names))], ys, width, yerr=err, capsize=2, label=bench)
    ax.set_xticks([i + width * (len(benches) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("avg@k (%), 95% interval")
    ax.set_title("Accuracy per benchmark per checkpoint")
    ax.legend(fontsize=8)
    return savefig(fig, out)


def plot_rl(live_root: Path, out: Path) -> Path:
    """The RL stages' rollout metrics per step (dvclive/<stage>), one panel per metric, one line per stage (a figure
    saying so when no step ran)."""
    series = {(st, name): read_tsv(live_root / st / "plots" / "metrics" / prefix / f"{name}.tsv")
              for st in RL_STAGES for prefix, name in RL_CURVES}
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    if not any(series.values()):
        fig.text(0.5, 0.5, "no GRPO step ran (no prompt kept)", ha="center", va="center")
    for ax, (prefix, name) in zip(axes.flat, RL_CURVES):
        for st in RL_STAGES:
            pts = series[(st, name)]
            if pts:
                ax.plot([r["step"] for r in pts], [r[name] for r in pts], marker=".", label=st)
        ax.set_title(f"{prefix}/{name}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    if any(series.values()):
        axes.flat[0].legend(fontsize=8)
    fig.suptitle("GRPO rollouts per optimizer step")
    fig.tight_layout()
    return savefig(fig, out)


def plot_pass_filter(histograms: dict[str, dict], out: Path) -> Path | None:
    """Each RL stage's pass-rate histogram: prompts with j of k passes, the kept band shaded."""
    if not histograms:
        return None
    fig, axes = plt.subplots(1, len(histograms), figsize=(4.5 * len(histograms), 3.5), squeeze=False)
    for ax, (role, h) in zip(axes[0], histograms.items()):
        k = h["k"]
        colors = ["#4a4" if h["low"] < j / k < h["high"] else "#c44" for j in range(k + 1)]
        ax.bar(range(k + 1), h["passes"], color=colors)
        ax.set_xticks(range(k + 1))
        ax.set_xlabel(f"passes of k = {k}", fontsize=8)
        ax.set_ylabel("prompts", fontsize=8)
        ax.set_title(f"{role}: {h['verdicts']['kept']} kept (green band)", fontsize=9)
    return savefig(fig, out)


# ----------------------------------------------------------------------------- tables

def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def pct(x) -> str:
    """A rate in percent, one decimal; "—" when it is not a number (not measured)."""
    return f"{100 * x:.1f}" if _number(x) else "—"


def pct_ci(m: dict | None, metric: str = "avg@k") -> str:
    """A metric in percent with its 95% interval, "12.5 [8.1, 18.0]"; "—" when not measured."""
    if not m:
        return "—"
    return f"{pct(m[metric])} [{pct(m[f'{metric}:ci95_low'])}, {pct(m[f'{metric}:ci95_high'])}]"


def signed_ci(d: dict) -> str:
    """A paired difference in points with its 95% interval, "+4.2 [-1.0, +9.5]"."""
    return f"{100 * d['delta']:+.1f} [{100 * d['ci95_low']:+.1f}, {100 * d['ci95_high']:+.1f}]"


def final_student(evals: dict) -> str | None:
    """The last post-trained student stage evaluated (distill, else sft_full, else sft_cold)."""
    return next((n for n in reversed(STUDENT_CHAIN[1:]) if n in evals), None)


def paper_table(paper: dict, evals: dict, scale: str) -> str:
    """The paper's published numbers beside ours for the same benchmark: post-trained rows from our final evaluated
    student (distill, sft_full or sft_cold; the base model when none is), base rows from the base model."""
    post = final_student(evals) or "base"
    rows = []
    for kind, key, source in (("post-trained", "post_trained", post), ("base, few-shot", "base_few_shot", "base")):
        for bench in paper[key]:
            m = evals.get(source, {}).get(bench["ours"]) if bench["ours"] else None
            rows.append([bench["name"], kind, bench["nanbeige4_3b"], f"{pct_ci(m)} ({source})" if m else "—"])
    note = (f"Post-trained rows: ours from `{post}`" + ("" if post != "base" else " (no post-trained checkpoint "
            "evaluated yet)") + "; base rows from `base`. Brackets: 95% interval.")
    if scale != "3b":
        note += (" At the `tiny` scale this is a pipeline check, not a comparable figure. Our BFCL is the non-live "
                 "single-turn Python subset.")
    return md_table(["benchmark", "model", "Nanbeige4-3B (paper)", f"ours ({scale})"], rows) + "\n\n" + note


# ----------------------------------------------------------------------------- post-training

def ladder_section(evals: dict) -> str:
    """Held-out ladder accuracy per level (avg@k and its 95% interval) of each post-training checkpoint evaluated."""
    names = [n for n in POST_TRAINING if n in evals]
    ladders = sorted({b for n in names for b, m in evals[n].items() if "by_level" in m})
    if not ladders:
        return "No ladder benchmark evaluated (evaluate.run has no `ladder` entry)."
    parts = []
    for bench in ladders:
        levels = sorted({lv for n in names for lv in evals[n].get(bench, {}).get("by_level", {})}, key=int)
        rows = [[n, evals[n][bench]["prompt_format"], evals[n][bench]["n_problems"],
                 *[pct_ci(evals[n][bench]["by_level"].get(lv)) for lv in levels], pct_ci(evals[n][bench])]
                for n in names if bench in evals[n]]
        method = {evals[n][bench]["ci95_method"] for n in names if bench in evals[n]}
        parts += [f"`{bench}` (avg@k %, 95% interval: {', '.join(sorted(method))} over problems):", "",
                  md_table(["checkpoint", "format", "problems", *[f"L{lv}" for lv in levels], "overall"], rows), ""]
    return "\n".join(parts).rstrip()


def compare(scores: dict, before: str, after: str, bench: str, resamples: int, seed: int) -> dict | None:
    """after - before on one benchmark, paired over the problems both were scored on (None when they share none)."""
    return eval_stats.paired_difference(scores[before][bench], scores[after][bench], resamples,
                                        eval_stats.derived_seed(seed, "compare", before, after, bench))


def stage_deltas(evals: dict, scores: dict, resamples: int, seed: int) -> list[dict]:
    """What each student stage bought: each evaluated stage of STUDENT_CHAIN against the evaluated one before it, on
    every benchmark both ran. Rows {"stage", "previous", "benchmark", "before", "after", **paired_difference}."""
    chain = [n for n in STUDENT_CHAIN if n in evals]
    rows = []
    for prev, cur in zip(chain, chain[1:]):
        for bench in sorted(set(evals[prev]) & set(evals[cur])):
            d = compare(scores, prev, cur, bench, resamples, seed)
            if d is not None:
                rows.append({"stage": cur, "previous": prev, "benchmark": bench, "before": evals[prev][bench],
                             "after": evals[cur][bench], **d})
    return rows


def teacher_margin(evals: dict, scores: dict, resamples: int, seed: int) -> list[dict]:
    """teacher - final student on every benchmark both ran (rows as stage_deltas'); none without both."""
    student = final_student(evals)
    if "teacher" not in evals or student is None:
        return []
    rows = []
    for bench in sorted(set(evals["teacher"]) & set(evals[student])):
        d = compare(scores, student, "teacher", bench, resamples, seed)
        if d is not None:
            rows.append({"stage": "teacher", "previous": student, "benchmark": bench, "before": evals[student][bench],
                         "after": evals["teacher"][bench], **d})
    return rows


def comparison_table(rows: list[dict], before: str, after: str) -> str:
    return md_table(["benchmark", f"{before} (%)", f"{after} (%)", "delta, points [95%]", "problems", "verdict"],
                    [[r["benchmark"], pct_ci(r["before"]), pct_ci(r["after"]), signed_ci(r), r["n"], r["verdict"]]
                     for r in rows])


def comparison_metrics(rows: list[dict], key: str, name: str) -> dict[str, float]:
    """dvclive entries of comparison rows: <key>/<name>, <key>/ci95_low, <key>/ci95_high (key formatted by the row)."""
    out = {}
    for r in rows:
        prefix = key.format(**r)
        out.update({f"{prefix}/{name}": r["delta"], f"{prefix}/ci95_low": r["ci95_low"],
                    f"{prefix}/ci95_high": r["ci95_high"]})
    return out


def _part(data: dict, key: str, kind: type):
    """data[key] when it is a `kind` (dict or list), else an empty one: another engineer's file, read defensively."""
    value = data.get(key)
    return value if isinstance(value, kind) else kind()


def sft_data_section(path: Path | None) -> tuple[str, dict[str, float]]:
    """(markdown, dvclive metrics) of the sft_data stage's metrics.json (stages/sft_data.py): counts, per-round
    solved and candidate pass rates, checklist item pass rates, rejection reasons. Read defensively: each part is
    rendered when present and well-formed, a missing file is said, nothing is faked."""
    data = common.read_manifest(path) if path is not None else None
    if not isinstance(data, dict):
        return "No SFT data metrics (the sft_data stage has not run).", {}
    lines, live = [], {}
    counts = _part(data, "counts", dict)
    if all(_number(counts.get(k)) for k in ("instructions", "kept", "rejected")):
        lines += [f"{counts['instructions']} instructions -> {counts['kept']} kept, {counts['rejected']} rejected.", ""]
        live.update({f"sft_data/count/{k}": float(counts[k]) for k in ("instructions", "kept", "rejected")})
    rounds = [r for r in _part(data, "rounds", list) if isinstance(r, dict) and _number(r.get("round"))]
    if rounds:
        lines += [md_table(["round", "instructions", "solved (%)", "candidates", "candidate pass rate (%)"],
                           [[r["round"], r.get("instructions", "—"), pct(r.get("solved_rate")),
                             r.get("candidates", "—"), pct(r.get("candidate_pass_rate"))] for r in rounds]), ""]
        live.update({f"sft_data/round_{r['round']}/{k}": float(r[k]) for r in rounds
                     for k in ("solved_rate", "candidate_pass_rate") if _number(r.get(k))})
    items = {k: v for k, v in _part(data, "items", dict).items()
             if isinstance(v, dict) and _number(v.get("pass_rate"))}
    if items:
        lines += [md_table(["checklist item", "checked", "passed", "pass rate (%)"],
                           [[k, v.get("checked", "—"), v.get("passed", "—"), pct(v["pass_rate"])]
                            for k, v in items.items()]), ""]
        live.update({f"sft_data/item_pass_rate/{k}": float(v["pass_rate"]) for k, v in items.items()})
    sources = {k: v for k, v in _part(data, "sources", dict).items() if _number(v)}
    if sources:
        lines += [md_table(["source of the kept solution", "count"], [[k, v] for k, v in sources.items()]), ""]
        live.update({f"sft_data/source/{k}": float(v) for k, v in sources.items()})
    rejections = {k: v for k, v in _part(data, "rejections", dict).items() if _number(v)}
    if rejections:
        lines += [md_table(["rejection reason", "count"], [[k, v] for k, v in rejections.items()]), ""]
        live.update({f"sft_data/rejected/{k}": float(v) for k, v in rejections.items()})
    if not lines:
        return f"The SFT data metrics ({path}) have none of counts, rounds, items, rejections in a known shape.", {}
    return "\n".join(lines).rstrip(), live


def post_training_section(evals: dict, scores: dict, resamples: int, seed: int,
                          sft_data: Path | None = None) -> tuple[str, dict[str, float]]:
    """(markdown, dvclive metrics) of the post-training part of the card: ladder per level, stage deltas, the
    teacher's margin, the SFT data. Only evaluated checkpoints appear."""
    evaluated = [n for n in POST_TRAINING if n in evals]
    missing = [n for n in POST_TRAINING if n not in evals]
    s = ["## Post-training", "",
         f"Evaluated: {', '.join(evaluated) or 'none'}" + (f"; not evaluated (no row): {', '.join(missing)}."
                                                           if missing else "."), "",
         "### Held-out task ladder, per level", "", ladder_section(evals), ""]
    live: dict[str, float] = {}
    deltas = stage_deltas(evals, scores, resamples, seed)
    s += ["### What each stage bought", ""]
    if deltas:
        s += ["Each stage against the evaluated stage before it (avg@k; delta paired over the same problems, 95% "
              f"bootstrap interval, {resamples} resamples). \"Inside the interval\": not told from noise.", ""]
        for prev, cur in dict.fromkeys((r["previous"], r["stage"]) for r in deltas):
            rows = [r for r in deltas if r["stage"] == cur]
            s += [f"`{cur}` vs `{prev}`:", "", comparison_table(rows, prev, cur), ""]
        live.update(comparison_metrics(deltas, "stage_delta/{stage}/{benchmark}", "delta"))
    else:
        s += ["Needs two evaluated stages of " + " -> ".join(STUDENT_CHAIN) + f"; evaluated: "
              f"{', '.join(n for n in STUDENT_CHAIN if n in evals) or 'none'}.", ""]
    margins = teacher_margin(evals, scores, resamples, seed)
    s += ["### The teacher's margin over the student", ""]
    if margins:
        s += [comparison_table(margins, margins[0]["previous"], "teacher"), ""]
        live.update(comparison_metrics(margins, "teacher_margin/{benchmark}", "margin"))
    else:
        s += ["Needs the teacher and a post-trained student (sft_cold, sft_full or distill) evaluated.", ""]
    text, sft_live = sft_data_section(sft_data)
    s += ["### SFT data (generate-critique-revise)", "", text]
    live.update(sft_live)
    return "\n".join(s), live


def _float(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _number(x) else "—"


def rl_section(art: Path, evals: dict, scores: dict, resamples: int, seed: int,
               histograms: dict[str, dict]) -> tuple[str, dict[str, float]]:
    """(markdown, dvclive metrics) of the RL part: the filters, the GRPO runs, before / after on each stage's domain,
    the reward model. Read from the stages' manifests; a stage that has not run is said, not faked."""
    filters = {r: common.read_manifest(art / "pass_filter" / r / "manifest.json") for r in RL_STAGES}
    runs = {r: common.read_manifest(art / r / "manifest.json") for r in RL_STAGES}
    rm = common.read_manifest(art / "reward_model" / "metrics.json")
    if not any(filters.values()) and not any(runs.values()) and rm is None:
        return "No RL stage has run.", {}
    s, live = [], {}
    rows = [[r, m["domain"], m["reward"], m["params"]["k"], m["counts"]["candidates"], m["counts"]["kept"],
             m["counts"]["too_hard"], m["counts"]["too_easy"], pct(m["counts"]["mean_pass_rate"])]
            for r, m in filters.items() if m]
    if rows:
        s += ["### Pass-rate filters", "",
              "Before each stage the previous model answers every candidate k times; a prompt is kept when its pass "
              "rate is strictly between the bounds (pass_filter.low / high), so its GRPO groups can differ.", "",
              md_table(["stage", "domain", "reward", "k", "candidates", "kept", "too hard", "too easy",
                        "mean pass rate (%)"], rows), ""]
        if histograms:
            s += ["![pass-rate histograms](rl_pass_filter.png)", ""]
        for r, m in filters.items():
            if m:
                live.update({f"pass_filter/{r}/{k}": float(m["counts"][k]) for k in ("kept", "candidates")})
    rows = [[r, m["counts"]["steps"], m["counts"]["kept_prompts"], m["counts"]["samples"],
             m["counts"]["groups_dropped"], m["counts"]["truncated"],
             f"{_float(m['reward_start'])} -> {_float(m['reward_end'])}",
             f"{pct(m['pass_rate_start'])} -> {pct(m['pass_rate_end'])}", _float(m["wall_time_s"], 0)]
            for r, m in runs.items() if m]
    if rows:
        s += ["### GRPO runs", "",
              "Reward and pass rate of the first and the last step's rollout (the policy's own samples at the "
              "rollout temperature, on the kept train prompts; not a held-out figure).", "",
              md_table(["stage", "steps", "kept prompts", "samples", "zero-variance groups dropped", "truncated",
                        "reward mean", "pass rate (%)", "wall s"], rows), ""]
        untrained = [r for r, m in runs.items() if m and not m["counts"].get("trained", True)]
        if untrained:
            s += [f"Not trained (no prompt kept, min_prompts 0: the init checkpoint passed through): "
                  f"{', '.join(untrained)}.", ""]
        s += ["![GRPO rollout metrics](rl_metrics.png)", ""]
        for r, m in runs.items():
            if m:
                live.update({f"{r}/{k}": float(m[k]) for k in ("reward_start", "reward_end") if _number(m[k])})
    compared = []
    for stage, (prev, benches) in RL_STAGES.items():
        for bench in benches:
            if bench in evals.get(stage, {}) and bench in evals.get(prev, {}):
                d = compare(scores, prev, stage, bench, resamples, seed)
                if d is not None:
                    compared.append({"stage": stage, "previous": prev, "benchmark": bench,
                                     "before": evals[prev][bench], "after": evals[stage][bench], **d})
    s += ["### Held-out accuracy before and after each RL stage", ""]
    if compared:
        s += [md_table(["stage", "benchmark", "before (%)", "after (%)", "delta, points [95%]", "problems",
                        "verdict"],
                       [[f"{r['previous']} -> {r['stage']}", r["benchmark"], pct_ci(r["before"]), pct_ci(r["after"]),
                         signed_ci(r), r["n"], r["verdict"]] for r in compared]), ""]
        live.update(comparison_metrics(compared, "rl_delta/{stage}/{benchmark}", "delta"))
    else:
        s += ["Needs an RL stage and the checkpoint before it evaluated on the stage's ladder benchmark.", ""]
    s += ["### Reward model (pairwise judge)", ""]
    if isinstance(rm, dict) and isinstance(rm.get("heldout"), dict):
        c, after, before = rm.get("counts", {}), rm["heldout"], rm.get("heldout_before") or {}
        metric_rows = [[name, pct_ci_rate(before.get(name)), pct_ci_rate(after.get(name))]
                       for name in ("pair_accuracy", "accuracy", "consistency")]
        s += [f"{c.get('train_pairs', '—')} train / {c.get('heldout_pairs', '—')} held-out pairs (held out by "
              f"prompt), {c.get('pairs_rejected', '—')} rejected, {c.get('steps', '—')} steps. Pair accuracy: "
              "both orders averaged, one verdict per pair; accuracy: per comparison (2 per pair, not independent); "
              "consistency: the verdict survives swapping the responses. Wilson 95% intervals.", "",
              md_table(["held-out metric", "before training (%)", "after (%)"], metric_rows), ""]
        for name in ("pair_accuracy", "accuracy", "consistency"):
            if isinstance(after.get(name), dict):
                live[f"reward_model/heldout/{name}"] = float(after[name]["value"])
    elif isinstance(rm, dict):
        c = rm.get("counts", {})
        s += [f"The reward model did not train: {c.get('train_pairs', '—')} train / {c.get('heldout_pairs', '—')} "
              "held-out pairs (min_pairs 0 let the init model stand in as the judge).", ""]
    else:
        s += ["The reward model has not run.", ""]
    return "\n".join(s).rstrip(), live


def pct_ci_rate(m: dict | None) -> str:
    """A {value, ci95_low, ci95_high} rate as "62.5 [40.1, 80.2]"."""
    if not isinstance(m, dict) or not _number(m.get("value")):
        return "—"
    return f"{100 * m['value']:.1f} [{100 * m['ci95_low']:.1f}, {100 * m['ci95_high']:.1f}]"


def _md5(path: Path) -> str | None:
    """DVC's hash of a file (md5 of its bytes), None when absent."""
    if not path.is_file():
        return None
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ablation_provenance(study: dict, repo: Path) -> str:
    """'current' when every run saw this workspace's provenance inputs, else what differs (a stale or foreign table)."""
    runs = study.get("runs")
    if not runs:
        return "provenance unknown (made by an older tools/ablate.py): treat as foreign and rerun"
    differs = sorted({path for r in runs for path, h in r["inputs"].items() if h is None or h != _md5(repo / path)})
    if differs:
        return ("STALE: made on inputs that differ from this workspace's (" + ", ".join(differs)
                + "); rerun `" + study["command"] + "`")
    return "current: every run used this workspace's " + ", ".join(sorted(runs[0]["inputs"])) + \
        " (commits " + ", ".join(sorted({str(r["rev"])[:8] for r in runs})) + ")"


def ablation_section(path: Path, repo: Path = REPO) -> str:
    """Each study: mean +- sample sd over seeds per variant, the per-seed values, and where the figures came from."""
    if not path.is_file():
        return ("No ablation results yet: `python -m tools.ablate` runs the study as DVC experiments "
                "(FG-WSD vs WSD vs cosine) and the next report includes its table.")
    results = read_json(path)
    parts = []
    for study in results.get("studies", []):
        seeds = study.get("seeds") or []
        header = ["variant", *[f"{c} (mean ± sd, n)" if seeds else c for c in study["columns"]]]
        rows = []
        for r in study["rows"]:
            cells = []
            for c in study["columns"]:
                values = r.get(f"{c}:values") or ([] if r.get(c) is None else [r[c]])
                sd = r.get(f"{c}:sd")
                if not values:
                    cells.append("—")
                elif sd is None:
                    cells.append(f"{values[0]:.4f}" + (" (n=1)" if seeds else ""))
                else:
                    cells.append(f"{r[c]:.4f} ± {sd:.4f} (n={len(values)})")
            rows.append([r["variant"], *cells])
        parts += [f"Study `{study['study']}`" + (f", seeds {seeds}" if seeds else "") + ":", "", md_table(header, rows),
                  "", f"Command: `{study['command']}`. Provenance: {ablation_provenance(study, repo)}.", ""]
    if not parts:
        return "The ablation results file has no studies: rerun `python -m tools.ablate`."
    return "\n".join(parts).rstrip()


def stage_times(bench_dir: Path) -> list[list]:
    """Wall time and peak memory per rule, from Snakemake `benchmark:` files (absent under DVC)."""
    rows = []
    for rule_dir in sorted(p for p in bench_dir.glob("*") if p.is_dir()):
        secs, rss, jobs = 0.0, 0.0, 0
        for tsv in sorted(rule_dir.glob("*.tsv")):
            for r in read_tsv_raw(tsv):
                secs += float(r["s"])
                rss = max(rss, float(r["max_rss"]) if r["max_rss"] not in ("-", "NA", "") else 0.0)
                jobs += 1
        if jobs:
            rows.append([rule_dir.name, jobs, f"{secs:.1f}", f"{rss:.0f}"])
    return rows


# ----------------------------------------------------------------------------- the card

def write_report(artifacts: str | Path, checkpoints: list[str], output_dir: str | Path, live_dir: str | Path,
                 params: dict, pretrain_live: Path = REPO / "dvclive" / "pretrain",
                 paper_file: Path = REPO / "data" / "paper_results.yaml",
                 ablation_file: Path | None = None, bench_dir: Path | None = None,
                 sft_data_file: Path | None = None, rl_live_root: Path = REPO / "dvclive") -> str:
    art, out = Path(artifacts), Path(output_dir)
    scale = params["scale"]
    funnel = read_json(art / "funnel" / "funnel.json")
    plan = read_json(art / "schedule" / "plan.json")
    pretrain = read_json(art / "pretrain" / "manifest.json")
    evals = {name: read_json(art / "eval" / name / "metrics.json") for name in checkpoints}
    scores = {name: read_json(art / "eval" / name / "scores.json") for name in checkpoints}
    paper = yaml.safe_load(paper_file.read_text(encoding="utf-8"))

    pngs = [plot_funnel(funnel, out / "data_funnel.png"),
            plot_pretrain(Path(pretrain_live), pretrain, out / "pretrain_loss.png"),
            plot_eval(evals, out / "eval_accuracy.png")]

    final = funnel["steps"][-1]
    s = [f"# Report card — scale `{scale}`", "",
         f"Model: {pretrain['num_parameters']:,} parameters, schedule `{pretrain['schedule']}`, "
         f"{pretrain['counts']['tokens_consumed']:,} tokens in {pretrain['counts']['steps']} steps, "
         f"{pretrain['wall_time_s']:.0f} s of training. Train loss {pretrain['loss_start']:.3f} -> "
         f"{pretrain['loss_end']:.3f}.", "",
         "## Data funnel", "",
         f"{funnel['steps'][0]['docs_in']:,} raw documents -> {final['docs_kept']:,} selected "
         f"({final['tokens_kept']:,} approx. tokens).", "",
         md_table(["stage", "in", "kept", "tokens kept", "dropped (rule: docs)"],
                  [[st["stage"], st["docs_in"], st["docs_kept"], st["tokens_kept"],
                    ", ".join(f"{d['rule']}: {d['docs']}" for d in st["dropped"]) or "—"] for st in funnel["steps"]]),
         "", "![data funnel](data_funnel.png)", ""]
    if funnel.get("quality_model"):
        s += ["Quality classifier (reference vs web), held-out: "
              + ", ".join(f"{k} {v:.3f}" for k, v in funnel["quality_model"].items()), ""]

    s += ["## FG-WSD plan and pretraining", "",
          md_table(["phase", "stage", "tokens planned", "tokens consumed", "steps", "seq_len", "LR", "top mixture"],
                   [[ph["name"], ph["stage"], ph["tokens_planned"], ph["tokens_consumed"], ph["steps"], ph["seq_len"],
                     f"{pl['lr_start']:.2e} -> {pl['lr_end']:.2e}",
                     ", ".join(f"{b} {w:.2f}" for b, w in sorted(pl["mixture"].items(), key=lambda kv: -kv[1])[:3])]
                    for ph, pl in zip(pretrain["counts"]["phases"], plan["phases"])]), ""]
    if pngs[1]:
        s += ["![pretraining loss](pretrain_loss.png)", ""]
    heldout = pretrain.get("heldout_loss") or {}
    if heldout:
        order = [ph["name"] for ph in pretrain["counts"]["phases"] if ph["name"] in heldout]
        sets = sorted(next(iter(heldout.values())))
        s += ["Held-out loss at each phase end:", "",
              md_table(["phase", *sets], [[ph, *[f"{heldout[ph][k]:.4f}" for k in sets]] for ph in order]), ""]

    benches = sorted({b for m in evals.values() for b in m})
    methods = sorted({m["ci95_method"] for ms in evals.values() for m in ms.values()})
    s += ["## Evaluation", "",
          "Sampling protocol from params (temperature, top-p, n samples per problem); avg@k with its 95% interval "
          "over problems (Wilson for one 0/1 sample per problem, else a bootstrap over problems; here "
          f"{', '.join(methods) or '—'}), and unbiased pass@k. Format: the checkpoint's prompt format "
          "(evaluate.per_checkpoint).", "",
          md_table(["checkpoint", "format", *[f"{b} avg@k [95%] / pass@k (%)" for b in benches]],
                   [[name, ", ".join(sorted({b["prompt_format"] for b in m.values()})) or "—",
                     *[f"{pct_ci(m.get(b))} / {pct(m.get(b, {}).get('pass@k'))}" for b in benches]]
                    for name, m in evals.items()]), ""]
    if pngs[2]:
        s += ["![evaluation](eval_accuracy.png)", ""]
    post, post_live = post_training_section(evals, scores, int(params["bootstrap_resamples"]), int(params["seed"]),
                                            sft_data_file)
    s += [post, ""]
    histograms = {r: h for r in RL_STAGES
                  if (h := common.read_manifest(art / "pass_filter" / r / "histogram.json")) is not None}
    rl_text, rl_live = rl_section(art, evals, scores, int(params["bootstrap_resamples"]), int(params["seed"]),
                                  histograms)
    rl_pngs = [plot_pass_filter(histograms, out / "rl_pass_filter.png"),
               plot_rl(Path(rl_live_root), out / "rl_metrics.png")]
    pngs += [p for p in rl_pngs if p]
    post_live.update(rl_live)
    s += ["## Reinforcement learning", "", rl_text, ""]

    s += ["## Time and tokens per stage", ""]
    times = stage_times(bench_dir) if bench_dir and bench_dir.is_dir() else []
    if times:
        s += [md_table(["rule", "jobs", "wall s (sum)", "peak RSS MB"], times), ""]
    else:
        s += ["Per-rule wall time is recorded by Snakemake `benchmark:` files; this run had none.", ""]
    s += [md_table(["stage", "tokens"], [["data (selected, approx.)", final["tokens_kept"]],
                                         ["pretrain (consumed)", pretrain["counts"]["tokens_consumed"]]]), ""]

    s += ["## The paper beside ours", "", paper_table(paper, evals, scale), "",
          "## Ablations (DVC experiments)", "", ablation_section(ablation_file or Path("/nonexistent")), ""]
    text = "\n".join(s)
    common.write_text(out / "report.md", text)

    live = common.open_live(live_dir)
    for name, metrics in evals.items():
        for bench, m in metrics.items():
            for key in ("avg@k", "avg@k:ci95_low", "avg@k:ci95_high", "pass@1"):
                live.log_metric(f"{name}/{bench}/{key}", round(m[key], 6), plot=False)
            for lv, ml in m.get("by_level", {}).items():
                for key in ("avg@k", "avg@k:ci95_low", "avg@k:ci95_high"):
                    live.log_metric(f"{name}/{bench}/L{lv}/{key}", round(ml[key], 6), plot=False)
    for key, value in post_live.items():
        live.log_metric(key, round(value, 6), plot=False)
    for ph, vals in heldout.items():
        for k, v in vals.items():
            live.log_metric(f"heldout/{ph}/{k}", round(v, 6), plot=False)
    for bench in benches:  # `dvc plots show`: accuracy of every checkpoint, one bar chart per benchmark
        live.log_plot(f"{bench}_avg_at_k", [{"checkpoint": n, "avg@k": m.get(bench, {}).get("avg@k", 0.0)}
                                            for n, m in evals.items()],
                      x="avg@k", y="checkpoint", template="bar_horizontal", title=f"{bench}: avg@k per checkpoint")
    live.end()

    common.write_manifest(out / "manifest.json", stage=STAGE, params=params, inputs=[],
                          outputs=[out / "report.md", *[p for p in pngs if p]],
                          counts={"checkpoints": len(evals), "benchmarks": len(benches)},
                          code=common.code_version("stages.report"))
    return text


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True, help="artifacts/<scale>")
    ap.add_argument("--checkpoints", required=True, help="comma-separated names evaluated under <artifacts>/eval/")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--live-dir", required=True)
    ap.add_argument("--pretrain-live", default="dvclive/pretrain")
    ap.add_argument("--ablation", default=None, help="ablation results JSON (tools/ablate.py), if any")
    ap.add_argument("--benchmarks-dir", default=None, help="Snakemake benchmark files, if any")
    ap.add_argument("--sft-data", default=None, help="the sft_data stage's metrics.json, if any")
    ap.add_argument("--rl-live-root", default="dvclive", help="where the RL stages' dvclive directories are")
    args = ap.parse_args()
    try:
        params = common.resolve_cli_params(args, STAGE)
        write_report(args.artifacts, args.checkpoints.split(","), args.output_dir, args.live_dir, params,
                     pretrain_live=Path(args.pretrain_live),
                     ablation_file=Path(args.ablation) if args.ablation else None,
                     bench_dir=Path(args.benchmarks_dir) if args.benchmarks_dir else None,
                     sft_data_file=Path(args.sft_data) if args.sft_data else None,
                     rl_live_root=Path(args.rl_live_root))
    except common.StageError as exc:
        common.fail(exc)
    print(f"report card: {Path(args.output_dir) / 'report.md'}")


if __name__ == "__main__":
    main()
