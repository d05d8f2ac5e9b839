"""The ablation study as DVC experiments: one `dvc exp run` per variant, then one table.

    python -m tools.ablate                    # every study in params.yaml `ablations:`
    python -m tools.ablate --study schedule   # FG-WSD vs WSD vs cosine
    python -m tools.ablate --study distill --variant none   # rerun one variant, collect the whole table

Each variant is a set of `-S key=value` overrides on the same DAG (`dvc exp run --temp`, so the workspace is
untouched and unchanged stages come from DVC's run cache: a schedule ablation retrains and re-evaluates, never
re-filters). A later ablation (with vs without distillation, RL from SFT vs from distillation) is one more
entry under `ablations:` in params.yaml. The results go to ablation/<scale>/results.json and .md, which the
report card includes: every figure is read back from `dvc exp show --json`, never typed in.

Seeds: a study with `seeds: [...]` and `seed_key: pretrain.seed` runs every variant once per seed and reports the
mean, the sample standard deviation and every value, so a difference between variants can be told from seed noise.
Provenance: each run records the hashes DVC saw for the study's `provenance` inputs (e.g. the tokenize manifest and
the plan) and the commit it ran from; the report card compares them with the current workspace and marks a table
made on other inputs (another machine, an older corpus or plan) as stale instead of presenting it as this run's.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import yaml

from stages import common

REPO = common.REPO


def exp_name(study: str, variant: str, seed: int | None = None) -> str:
    return f"{study}-{variant}" if seed is None else f"{study}-{variant}-seed{seed}"


def runs(study: str, spec: dict) -> list[tuple[str, str, int | None, dict]]:
    """(experiment name, variant, seed, overrides) of every run of a study: variants x seeds."""
    seeds = spec.get("seeds") or [None]
    out = []
    for variant, overrides in spec["variants"].items():
        for seed in seeds:
            extra = {} if seed is None else {spec["seed_key"]: seed}
            out.append((exp_name(study, variant, seed), variant, seed, {**overrides, **extra}))
    return out


def _has_key(params: dict, dotted: str) -> bool:
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def variant_command(name: str, overrides: dict, target: str, params: dict) -> list[str]:
    """The `dvc exp run` of one variant. A key params.yaml has is overridden (`-S key=value`); one it lacks, such as a
    stage-level seed (`pretrain.seed`: stages.common.stage_params), is added (`-S +key=value`: DVC's Hydra
    grammar refuses a plain override of an absent key). No `--force`: in `dvc exp run` it means `dvc repro --force`,
    which reruns every stage upstream of the target with the run cache off (filter, dedup, score ... for each
    pretraining variant). Without it, only the stages whose params or deps the overrides change run."""
    cmd = ["dvc", "exp", "run", "--temp", "--name", name, target]
    for key, value in sorted(effective_overrides(overrides, params).items()):
        cmd += ["-S", f"{'' if _has_key(params, key) else '+'}{key}={value}"]
    return cmd


def effective_overrides(overrides: dict, params: dict) -> dict:
    """The overrides a stage actually reads: a stage reads `params[stage]` overlaid with `scales.<scale>.<stage>`
    (stages.common.stage_params), so `distill.max_steps=0` alone does nothing where the scale slice sets
    `scales.tiny.distill.max_steps: 40`. Such a key is overridden in the scale slice too (the variant's value is what
    the stage sees); keys the scale slice lacks are left as given."""
    out = dict(overrides)
    for key, value in overrides.items():
        scaled = f"scales.{params.get('scale')}.{key}"
        if not key.startswith("scales.") and _has_key(params, scaled):
            out[scaled] = value
    return out


def experiment_refs(name: str, root=REPO) -> list[str]:
    """Git refs of every experiment called `name`, on any baseline commit (refs/exps/<sha[:2]>/<sha[2:]>/<name>)."""
    out = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return [ref for ref in out.split() if ref.rsplit("/", 1)[-1] == name]


def run_variant(name: str, overrides: dict, target: str, root=REPO) -> None:
    """Run one variant as the experiment `name`, replacing earlier experiments of that name on any commit (a rerun
    of the study must not fail on its own earlier runs, nor leave two experiments of one name for `collect`)."""
    if refs := experiment_refs(name, root):
        subprocess.run(["dvc", "exp", "remove", *refs], cwd=root, check=True)
    cmd = variant_command(name, overrides, target, yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")))
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=root, check=True)


def flatten(prefix: str, node) -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flatten(f"{prefix}/{k}" if prefix else k, v))
        return out
    return {prefix: node}


def collect(names: list[str]) -> dict[str, dict]:
    """{experiment name: {"metrics": {path:key: value}, "deps": {path: hash}, "rev": sha}} from
    `dvc exp show --json --all-commits` (each experiment hangs off the commit it started from)."""
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], cwd=REPO, check=True,
                                      capture_output=True, text=True).stdout)
    found = {}

    def visit(node):
        if isinstance(node, dict):
            if node.get("name") in names and isinstance(node.get("data"), dict):
                data = node["data"]
                metrics = {}
                for path, body in (data.get("metrics") or {}).items():
                    for key, value in flatten("", body.get("data", {})).items():
                        metrics[f"{path}:{key}"] = value
                deps = {path: (body or {}).get("hash") for path, body in (data.get("deps") or {}).items()}
                found[node["name"]] = {"metrics": metrics, "deps": deps, "rev": data.get("rev") or node.get("rev")}
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)
    visit(shown)
    return found


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def workspace_hashes(paths: list[str], root=REPO) -> dict[str, str | None]:
    """md5 of each provenance file in the workspace the runs start from (DVC 3's hash of a file), None if absent.
    A run's own DVC dep hash is preferred when the target stage lists the file itself; a stage that depends on the
    file's directory (pretrain on artifacts/<scale>/tokenize) checks out this workspace's copy."""
    from stages.report import _md5
    return {p: (_md5(root / p) if (root / p).is_file() else None) for p in paths}


def results_table(study: str, spec: dict, found: dict[str, dict], command: str,
                  started_from: dict[str, str | None] | None = None) -> dict:
    """One row per variant: mean, sd and the per-seed values of every metric; plus each run's provenance
    (the run's DVC hash of each provenance file, else the hash of the workspace it started from)."""
    started_from = started_from or {}
    columns = [m["label"] for m in spec["metrics"]]
    rows, run_rows = [], []
    for variant in spec["variants"]:
        per_metric = {m["label"]: [] for m in spec["metrics"]}
        for name, v, seed, _ in runs(study, spec):
            if v != variant:
                continue
            got = found.get(name)
            if got is None:
                continue
            for m in spec["metrics"]:
                value = got["metrics"].get(f"{m['file']}:{m['key']}")
                if value is not None:
                    per_metric[m["label"]].append(float(value))
            run_rows.append({"name": name, "variant": variant, "seed": seed, "rev": got["rev"],
                             "inputs": {p: got["deps"].get(p) or started_from.get(p) for p in spec.get("provenance", [])}})
        row = {"variant": variant}
        for label, values in per_metric.items():
            mean, sd = mean_sd(values)
            row[label] = mean
            row[f"{label}:sd"] = sd
            row[f"{label}:values"] = values
        rows.append(row)
    return {"study": study, "columns": columns, "rows": rows, "runs": run_rows, "command": command,
            "seeds": spec.get("seeds")}


def merge_studies(previous: list[dict], new: list[dict], order: list[str]) -> dict:
    """results.json from the study tables: the ones run now replace their earlier tables, the other studies'
    earlier tables are kept (`--study X` must not erase another study's results), in params.yaml's order; a study
    no longer in params.yaml is dropped."""
    by_study = {t["study"]: t for t in previous if t.get("study") in order}
    by_study.update({t["study"]: t for t in new})
    tables = [by_study[name] for name in order if name in by_study]
    return {"columns": sorted({c for t in tables for c in t["columns"]}),
            "rows": [{**r, "variant": f"{t['study']}: {r['variant']}"} for t in tables for r in t["rows"]],
            "command": "python -m tools.ablate" if len(tables) != 1 else tables[0]["command"],
            "studies": tables}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=None, help="one study from params.yaml `ablations:` (default: all)")
    ap.add_argument("--collect-only", action="store_true", help="rebuild the table from existing experiments")
    ap.add_argument("--variant", action="append", default=None,
                    help="rerun only this variant of the study (repeatable); the table still collects every variant")
    args = ap.parse_args()
    params = common.load_params()
    studies = params.get("ablations", {})
    if args.study:
        studies = {args.study: studies[args.study]}
    scale = params["scale"]
    tables = []
    for study, spec in studies.items():
        spec = {**spec, "provenance": [p.format(scale=scale) for p in spec.get("provenance", [])]}
        planned = runs(study, spec)
        if unknown := set(args.variant or ()) - set(spec["variants"]):
            raise SystemExit(f"--variant {sorted(unknown)}: not a variant of study {study!r} "
                             f"(params.yaml ablations.{study}.variants: {sorted(spec['variants'])})")
        started_from = workspace_hashes(spec["provenance"])
        if not args.collect_only:
            for name, variant, _, overrides in planned:
                if args.variant is None or variant in args.variant:
                    run_variant(name, overrides, spec["target"])
        command = f"python -m tools.ablate --study {study}"
        tables.append(results_table(study, spec, collect([name for name, *_ in planned]), command, started_from))
    out = REPO / "ablation" / scale
    previous = common.read_manifest(out / "results.json") or {}
    merged = merge_studies(previous.get("studies", []), tables, list(params.get("ablations", {})))
    common.write_json(out / "results.json", merged)
    for t in tables:
        print(f"\n{t['study']}:")
        for r in t["rows"]:
            print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
    print(f"\nwrote {out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
