"""Generate dvc.yaml from the Snakemake DAG (the single source of truth).

    python -m tools.gen_dvc            # rewrite dvc.yaml
    python -m tools.gen_dvc --check    # exit 1 when dvc.yaml differs from a fresh generation

One DVC stage per Snakemake rule. Snakemake fans per-shard rules out into one job per shard; DVC runs the
same stage CLI once over all shards (the CLI skips shards whose manifest is current), so each DVC stage
tracks whole stage directories:
  cmd    the rule's `python -m stages.<x>` with `--params params.yaml` instead of the resolved JSON slice
  deps   the stage's own source files (transitive imports inside this repo) + the directories its jobs read
  params `scale`, `seed` and, for each stage slice the rule passes, `<stage>` and `scales.${scale}.<stage>`
  outs   the common directory of the rule's outputs; `dvclive/<x>` outputs become metrics + plots
Paths under artifacts/<scale>/ become artifacts/${scale}/ so `dvc exp run -S scale=small` switches profiles.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from stages.common import SCALES, write_text

REPO = Path(__file__).resolve().parent.parent
HEADER = ("# GENERATED from the Snakemake DAG by `python -m tools.gen_dvc` -- do not edit by hand.\n"
          "# tests/test_dag.py fails when this file drifts from a fresh generation.\n")
OWN_PACKAGES = ("stages", "model", "kernels")


def build_jobs(snakefile: Path, workdir: Path) -> list:
    """All jobs of the DAG for the default target, as if every output were missing (forceall)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, DeploymentSettings, OutputSettings,
                                          ResourceSettings, StorageSettings, WorkflowSettings)
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf_api = api.workflow(snakefile=snakefile, workdir=workdir, resource_settings=ResourceSettings(),
                              config_settings=ConfigSettings(), storage_settings=StorageSettings(),
                              workflow_settings=WorkflowSettings(), deployment_settings=DeploymentSettings())
        wf_api.dag(DAGSettings(forceall=True))
        wf = wf_api._workflow
        wf._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        wf._build_dag()
        dag = wf.dag
        order = list(dag.toposorted())
        jobs = [job for level in order for job in sorted(level, key=lambda j: (j.rule.name, str(j.wildcards)))]
        deps = {job: set(dag.dependencies[job]) for job in jobs}
        return [(job, deps[job]) for job in jobs]


def module_files(module: str) -> list[str]:
    """Source files of `module` and of every module of ours it imports, transitively (repo-relative)."""
    seen: set[str] = set()
    stack = [module]
    while stack:
        name = stack.pop()
        path = REPO / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = REPO / name.replace(".", "/") / "__init__.py"
        if not path.is_file() or str(path) in seen:
            continue
        seen.add(str(path))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            stack.extend(n for n in names if n.split(".")[0] in OWN_PACKAGES)
    return sorted(str(Path(p).relative_to(REPO)) for p in seen)


def generate(snakefile: Path = REPO / "Snakefile", workdir: Path = REPO) -> str:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    scale = params["scale"]

    def templ(p: str) -> str:
        """artifacts/<scale>/..., checkpoints/<scale>/... -> .../${scale}/...: one dvc.yaml serves every scale."""
        return re.sub(rf"(?<=\w)/{re.escape(scale)}(?=[/\s,]|$)", "/${scale}", p)

    jobs = build_jobs(snakefile, workdir)
    by_rule: dict[str, list] = defaultdict(list)
    rule_order: list[str] = []
    for job, deps in jobs:
        if job.rule.name not in by_rule:
            rule_order.append(job.rule.name)
        by_rule[job.rule.name].append((job, deps))

    out_dir: dict[str, str] = {}
    live_dir: dict[str, list[str]] = defaultdict(list)
    for name in rule_order:
        files = [str(f) for job, _ in by_rule[name] for f in job.output]
        data = [f for f in files if not f.startswith("dvclive/")]
        live_dir[name] = sorted({f.rstrip("/") for f in files if f.startswith("dvclive/")})
        if data:
            common_dir = os.path.commonpath(data)
            out_dir[name] = str(Path(common_dir).parent) if common_dir in data else common_dir

    stages = {}
    for name in rule_order:
        if name not in out_dir:
            continue  # aggregation targets such as `all`
        job0 = by_rule[name][0][0]
        shell = job0.rule.shellcmd
        module = re.search(r"stages\.\w+", shell).group(0)
        cfg = json.loads(job0.params.cfg)
        cmd = f"python -m {module} --params params.yaml {job0.params.cli}"
        deps = set(module_files(module))
        for job, upstream in by_rule[name]:
            produced = {str(f) for up in upstream for f in up.output}
            for f in map(str, job.input):
                owner = next((r for r, d in out_dir.items() if f == d or f.startswith(d + "/")), None)
                if owner is not None and f in produced:
                    deps.add(out_dir[owner])
                elif job.wildcards:
                    deps.add(str(Path(f).parent))  # a per-shard input unit: track its directory
                else:
                    deps.add(f)
        stage_params = ["scale", "seed"]
        for s in sorted(cfg):
            if s in params:
                stage_params.append(s)
            present = [s in (params["scales"].get(sc) or {}) for sc in SCALES]
            if all(present):
                stage_params.append(f"scales.${{scale}}.{s}")
            elif any(present):
                # DVC refuses a missing params key, so `-S scale=<other>` would break: all scales or none
                raise SystemExit(f"params.yaml: scales.<scale>.{s} exists for some scales only; "
                                 f"give every scale one ({{}} when empty)")
        stage = {"cmd": templ(cmd), "deps": sorted(templ(d) for d in deps), "params": stage_params,
                 "outs": [templ(out_dir[name])]}
        for live in live_dir[name]:
            stage.setdefault("metrics", []).append({f"{live}/metrics.json": {"cache": False}})
            stage.setdefault("plots", []).append({f"{live}/plots": {"cache": False}})
        stages[name] = stage
    body = yaml.safe_dump({"stages": stages}, sort_keys=False, width=1000)
    return HEADER + body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is stale")
    args = ap.parse_args()
    fresh = generate()
    target = REPO / "dvc.yaml"
    if args.check:
        if not target.is_file() or target.read_text() != fresh:
            print("dvc.yaml is stale: run `python -m tools.gen_dvc`", file=sys.stderr)
            raise SystemExit(1)
        print("dvc.yaml is up to date")
        return
    write_text(target, fresh)
    print(f"wrote {target.relative_to(REPO)} ({len(yaml.safe_load(fresh)['stages'])} stages)")


if __name__ == "__main__":
    main()
