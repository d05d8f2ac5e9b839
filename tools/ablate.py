"""The ablation study as DVC experiments: one `dvc exp run` per variant, then one table.

    python -m tools.ablate                    # every study in params.yaml `ablations:`
    python -m tools.ablate --study schedule   # FG-WSD vs WSD vs cosine

Each variant is a set of `-S key=value` overrides on the same DAG (`dvc exp run --temp`, so the workspace is
untouched and unchanged stages come from DVC's run cache: a schedule ablation retrains and re-evaluates, never
re-filters). A later ablation (with vs without distillation, RL from SFT vs from distillation) is one more
entry under `ablations:` in params.yaml. The results go to ablation/<scale>/results.json and .md, which the
report card includes: every figure is read back from `dvc exp show --json`, never typed in.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from stages import common

REPO = common.REPO


def exp_name(study: str, variant: str) -> str:
    return f"{study}-{variant}"


def run_variant(study: str, variant: str, overrides: dict, target: str) -> None:
    cmd = ["dvc", "exp", "run", "--temp", "--force", "--name", exp_name(study, variant), target]
    for key, value in sorted(overrides.items()):
        cmd += ["-S", f"{key}={value}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def flatten(prefix: str, node) -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flatten(f"{prefix}/{k}" if prefix else k, v))
        return out
    return {prefix: node}


def collect(names: list[str]) -> dict[str, dict]:
    """{experiment name: {metric path: value}} from `dvc exp show --json --all-commits` (each experiment hangs off
    the commit it started from)."""
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], cwd=REPO, check=True,
                                      capture_output=True, text=True).stdout)
    found = {}

    def visit(node):
        if isinstance(node, dict):
            if node.get("name") in names and isinstance(node.get("data"), dict):
                metrics = {}
                for path, body in (node["data"].get("metrics") or {}).items():
                    for key, value in flatten("", body.get("data", {})).items():
                        metrics[f"{path}:{key}"] = value
                found[node["name"]] = metrics
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)
    visit(shown)
    return found


def results_table(study: str, spec: dict, metrics: dict[str, dict], command: str) -> dict:
    columns = [m["label"] for m in spec["metrics"]]
    rows = []
    for variant in spec["variants"]:
        got = metrics.get(exp_name(study, variant), {})
        row = {"variant": variant}
        for m in spec["metrics"]:
            value = got.get(f"{m['file']}:{m['key']}")
            row[m["label"]] = None if value is None else float(value)
        rows.append(row)
    return {"study": study, "columns": columns, "rows": rows, "command": command}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=None, help="one study from params.yaml `ablations:` (default: all)")
    ap.add_argument("--collect-only", action="store_true", help="rebuild the table from existing experiments")
    args = ap.parse_args()
    params = common.load_params()
    studies = params.get("ablations", {})
    if args.study:
        studies = {args.study: studies[args.study]}
    scale = params["scale"]
    tables = []
    for study, spec in studies.items():
        if not args.collect_only:
            for variant, overrides in spec["variants"].items():
                run_variant(study, variant, overrides, spec["target"])
        names = [exp_name(study, v) for v in spec["variants"]]
        command = f"python -m tools.ablate --study {study}"
        tables.append(results_table(study, spec, collect(names), command))
    out = REPO / "ablation" / scale
    merged = {"columns": sorted({c for t in tables for c in t["columns"]}, key=lambda c: c),
              "rows": [{**r, "variant": f"{t['study']}: {r['variant']}"} for t in tables for r in t["rows"]],
              "command": "python -m tools.ablate" if len(tables) != 1 else tables[0]["command"],
              "studies": tables}
    common.write_json(out / "results.json", merged)
    for t in tables:
        print(f"\n{t['study']}:")
        for r in t["rows"]:
            print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
    print(f"\nwrote {out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
