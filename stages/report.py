"""The report card: one markdown page + PNG plots, gathered from what the stages wrote.

Sections: the data funnel and utility histogram, the FG-WSD plan and the pretraining curve (loss and LR by
phase), held-out loss at each phase end, accuracy per benchmark per checkpoint, time and tokens per stage,
the paper's table beside ours, and the ablation study when one has been run (tools/ablate.py).
Every figure is read from an artifact of this run; nothing is typed in except the paper's published numbers
(data/paper_results.yaml). Evaluation metrics also go to dvclive (dvclive/eval) for `dvc metrics show` and
`dvc exp show`.
"""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from stages import common  # noqa: E402

STAGE = "report"
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
        ys = [100 * evals[n].get(bench, {}).get("avg@k", 0.0) for n in names]
        ax.bar([i + j * width for i in range(len(names))], ys, width, label=bench)
    ax.set_xticks([i + width * (len(benches) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("avg@k (%)")
    ax.set_title("Accuracy per benchmark per checkpoint")
    ax.legend(fontsize=8)
    return savefig(fig, out)


# ----------------------------------------------------------------------------- tables

def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def paper_table(paper: dict, evals: dict, scale: str) -> str:
    """The paper's published numbers beside ours for the same benchmark (ours from the final base model)."""
    ours = evals.get("base", {})
    rows = []
    for kind, key in (("post-trained", "post_trained"), ("base, few-shot", "base_few_shot")):
        for bench in paper[key]:
            mine = ours.get(bench["ours"], {}).get("avg@k") if bench["ours"] else None
            rows.append([bench["name"], kind, bench["nanbeige4_3b"], pct(mine)])
    note = ("Ours comes from this run's base model; at the `tiny` scale it is a pipeline check, not a comparable "
            "figure. Our BFCL is the non-live single-turn Python subset." if scale != "3b" else
            "Ours comes from this run's base model (the post-training stages are not built yet).")
    return md_table(["benchmark", "model", "Nanbeige4-3B (paper)", f"ours ({scale})"], rows) + "\n\n" + note


def ablation_section(path: Path) -> str:
    if not path.is_file():
        return ("No ablation results yet: `python -m tools.ablate` runs the study as DVC experiments "
                "(FG-WSD vs WSD vs cosine) and the next report includes its table.")
    results = read_json(path)
    header = ["variant", *results["columns"]]
    rows = [[r["variant"], *[("—" if r.get(c) is None else f"{r[c]:.4f}") for c in results["columns"]]]
            for r in results["rows"]]
    return md_table(header, rows) + f"\n\nCommand: `{results['command']}`"


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
                 ablation_file: Path | None = None, bench_dir: Path | None = None) -> str:
    art, out = Path(artifacts), Path(output_dir)
    scale = params["scale"]
    funnel = read_json(art / "funnel" / "funnel.json")
    plan = read_json(art / "schedule" / "plan.json")
    pretrain = read_json(art / "pretrain" / "manifest.json")
    evals = {name: read_json(art / "eval" / name / "metrics.json") for name in checkpoints}
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
    s += ["## Evaluation", "",
          "Sampling protocol from params (temperature, top-p, n samples per problem); avg@k and unbiased pass@k.", "",
          md_table(["checkpoint", *[f"{b} avg@k / pass@k (%)" for b in benches]],
                   [[name, *[f"{pct(m.get(b, {}).get('avg@k'))} / {pct(m.get(b, {}).get('pass@k'))}" for b in benches]]
                    for name, m in evals.items()]), ""]
    if pngs[2]:
        s += ["![evaluation](eval_accuracy.png)", ""]

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
            for key in ("avg@k", "pass@1"):
                if key in m:
                    live.log_metric(f"{name}/{bench}/{key}", round(m[key], 6), plot=False)
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
    args = ap.parse_args()
    try:
        params = common.resolve_cli_params(args, STAGE)
        write_report(args.artifacts, args.checkpoints.split(","), args.output_dir, args.live_dir, params,
                     pretrain_live=Path(args.pretrain_live),
                     ablation_file=Path(args.ablation) if args.ablation else None,
                     bench_dir=Path(args.benchmarks_dir) if args.benchmarks_dir else None)
    except common.StageError as exc:
        common.fail(exc)
    print(f"report card: {Path(args.output_dir) / 'report.md'}")


if __name__ == "__main__":
    main()
