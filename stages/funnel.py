"""The data funnel: documents and tokens kept and dropped per rule, stage by stage, and the utility histogram.

Reads only what the data stages wrote (their kept and rejected shards), so every number is a count over
artifacts, never a figure copied from a log. Writes funnel.json + funnel.md and the same figures as dvclive
metrics and plots, so `dvc metrics show`, `dvc exp show` and `dvc plots show` carry the funnel.
"""
from __future__ import annotations

from pathlib import Path

import duckdb

from stages import common

STAGE = "funnel"


def _glob(directory: Path) -> str | None:
    return str(directory / "*.parquet") if any(directory.glob("*.parquet")) else None


def _rows(con, sql: str) -> list[tuple]:
    return con.execute(sql).fetchall()


def select_recall(con, select_dir: Path) -> dict:
    """Recall in the selection: candidates (select's manifest) and the documents and tokens recalled into the pool
    (the pool shards' `recalled` column)."""
    counts = (common.read_manifest(select_dir / "manifest.json") or {}).get("counts", {})
    g = _glob(select_dir / "pool")
    docs, toks = (0, 0) if g is None else _rows(
        con, f"SELECT count(*), coalesce(sum(approx_tokens), 0) FROM read_parquet('{g}') WHERE recalled")[0]
    return {"candidates": int(counts.get("recall_candidates", 0)), "docs_recalled": int(docs),
            "tokens_recalled": int(toks)}


def data_funnel(artifacts: str | Path) -> dict:
    """Aggregate the funnel from artifacts/<scale>/{ingest,filter,dedup,score,select}."""
    art = Path(artifacts)
    con = duckdb.connect()
    con.execute("SET threads TO 1")  # deterministic summation order

    def kept(directory: Path) -> tuple[int, int]:
        g = _glob(directory)
        if g is None:
            return 0, 0
        docs, toks = _rows(con, f"SELECT count(*), coalesce(sum(approx_tokens), 0) FROM read_parquet('{g}')")[0]
        return int(docs), int(toks)

    def dropped(directory: Path, tokens: bool = True) -> list[dict]:
        g = _glob(directory)
        if g is None:
            return []
        tok = "coalesce(sum(approx_tokens), 0)" if tokens else "0"
        rows = _rows(con, f"SELECT rule, count(*), {tok} FROM read_parquet('{g}') GROUP BY rule ORDER BY rule")
        return [{"rule": r, "docs": int(d), "tokens": int(t)} for r, d, t in rows]

    steps = []
    ingest_docs, ingest_tokens = kept(art / "ingest")
    quarantined = dropped(art / "ingest" / "quarantine", tokens=False)
    steps.append({"stage": "ingest", "docs_in": ingest_docs + sum(q["docs"] for q in quarantined),
                  "docs_kept": ingest_docs, "tokens_kept": ingest_tokens, "dropped": quarantined})
    previous = ingest_docs
    for stage, kept_dir, rejected_dir in (("filter", art / "filter" / "kept", art / "filter" / "rejected"),
                                          ("dedup", art / "dedup" / "kept", art / "dedup" / "rejected"),
                                          ("select", art / "select" / "pool", art / "select" / "rejected")):
        docs, toks = kept(kept_dir)
        rejected = dropped(rejected_dir)
        n_in = docs + sum(r["docs"] for r in rejected)
        if n_in != previous:
            raise common.StageError(f"{kept_dir.parent}: {n_in} documents in, but the previous stage kept {previous}")
        steps.append({"stage": stage, "docs_in": n_in, "docs_kept": docs, "tokens_kept": toks, "dropped": rejected})
        previous = docs
    steps[-1]["recall"] = select_recall(con, art / "select")

    hist = {str(u): 0 for u in range(10)}
    g = _glob(art / "score")
    if g is not None:
        for u, n in _rows(con, f"SELECT utility, count(*) FROM read_parquet('{g}') GROUP BY utility ORDER BY utility"):
            hist[str(int(u))] = int(n)
    quality = common.read_manifest(art / "quality_model" / "metrics.json") or {}
    return {"steps": steps, "utility_histogram": hist,
            "quality_model": {k: quality[k] for k in ("heldout_auc", "heldout_accuracy") if k in quality}}


def funnel_markdown(funnel: dict) -> str:
    lines = ["| stage | rule | documents | tokens (approx) |", "|---|---|---:|---:|"]
    for step in funnel["steps"]:
        lines.append(f"| {step['stage']} | (in) | {step['docs_in']} | |")
        for d in step["dropped"]:
            lines.append(f"| {step['stage']} | dropped: {d['rule']} | {d['docs']} | {d['tokens']} |")
        lines.append(f"| {step['stage']} | **kept** | **{step['docs_kept']}** | **{step['tokens_kept']}** |")
        if "recall" in step:
            r = step["recall"]
            lines.append(f"| {step['stage']} | of which recalled (of {r['candidates']} candidates) | "
                         f"{r['docs_recalled']} | {r['tokens_recalled']} |")
    lines += ["", "| utility | documents |", "|---:|---:|"]
    lines += [f"| {u} | {n} |" for u, n in funnel["utility_histogram"].items()]
    if funnel["quality_model"]:
        lines += ["", "Quality classifier (reference vs web), held-out: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in funnel["quality_model"].items())]
    return "\n".join(lines) + "\n"


def write_funnel(artifacts: str | Path, output_dir: str | Path, live_dir: str | Path, params: dict) -> dict:
    out = Path(output_dir)
    funnel = data_funnel(artifacts)
    common.write_json(out / "funnel.json", funnel)
    common.write_text(out / "funnel.md", funnel_markdown(funnel))

    live = common.open_live(live_dir)
    for step in funnel["steps"]:
        live.log_metric(f"{step['stage']}/docs_kept", step["docs_kept"], plot=False)
        live.log_metric(f"{step['stage']}/tokens_kept", step["tokens_kept"], plot=False)
        for key, value in step.get("recall", {}).items():
            live.log_metric(f"{step['stage']}/recall_{key}", value, plot=False)
    for key, value in funnel["quality_model"].items():
        live.log_metric(f"quality_model/{key}", round(value, 6), plot=False)
    rules = [{"rule": f"{s['stage']}:{d['rule']}", "docs": d["docs"], "tokens": d["tokens"]}
             for s in funnel["steps"] for d in s["dropped"]]
    rules += [{"rule": "kept (final)", "docs": funnel["steps"][-1]["docs_kept"],
               "tokens": funnel["steps"][-1]["tokens_kept"]}]
    live.log_plot("funnel_documents", rules, x="docs", y="rule", template="bar_horizontal",
                  title="Documents dropped per rule", x_label="documents", y_label="rule")
    live.log_plot("utility_histogram", [{"utility": u, "docs": n} for u, n in funnel["utility_histogram"].items()],
                  x="docs", y="utility", template="bar_horizontal",
                  title="Utility (0-9) histogram", x_label="documents", y_label="utility")
    live.end()

    common.write_manifest(out / "manifest.json", stage=STAGE, params=params, inputs=[],
                          outputs=[out / "funnel.json", out / "funnel.md"],
                          counts={"docs_final": funnel["steps"][-1]["docs_kept"]},
                          code=common.code_version("stages.funnel"))
    return funnel


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True, help="artifacts/<scale>")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--live-dir", required=True)
    args = ap.parse_args()
    try:
        write_funnel(args.artifacts, args.output_dir, args.live_dir, common.resolve_cli_params(args, STAGE))
    except common.StageError as exc:
        common.fail(exc)


if __name__ == "__main__":
    main()
