"""Generate dvc.yaml from the Snakemake DAG (the single source of truth).

    python -m tools.gen_dvc            # rewrite dvc.yaml
    python -m tools.gen_dvc --check    # exit 1 when dvc.yaml differs from a fresh generation

One DVC stage per Snakemake rule. Snakemake fans per-shard rules out into one job per shard; DVC runs the
same stage CLI once over all shards (the CLI skips shards whose manifest is current), so each DVC stage
tracks whole stage directories:
  cmd    the rule's `python -m stages.<x>` with `--params params.yaml` instead of the resolved JSON slice
  deps   the rule's declared inputs: an upstream output becomes that stage's directory; the stage's import closure
         (rules/common.smk:code_inputs) stays file by file; data files too, or their directory when all its files are
  params `scale`, `seed` and, for each stage slice the rule passes, `<stage>` and `scales.${scale}.<stage>`
  outs   the common directory of the rule's outputs; `dvclive/<x>` outputs become metrics + plots
The default target `all` becomes the stage that records a DVC run in Snakemake's metadata (tools/runner_sync.py);
its deps are every stage's deps, outputs and params, so it runs exactly when some stage may have.
Paths under artifacts/<scale>/ become artifacts/${scale}/ so `dvc exp run -S scale=small` switches profiles.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from stages.common import SCALES, write_text

REPO = Path(__file__).resolve().parent.parent
# after DVC built the DAG: Snakemake's metadata records it (params, input sets; mtimes in DAG order), so
# `snakemake` has nothing to do; --no-hooks skips the onsuccess `dvc commit`, which DVC's own lock would refuse
SNAKEMAKE_RECORD = "snakemake --touch --no-hooks --cores 1 --quiet"
HEADER = ("# GENERATED from the Snakemake DAG by `python -m tools.gen_dvc` -- do not edit by hand.\n"
          "# tests/test_dag.py fails when this file drifts from a fresh generation.\n")


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


def compact(files: set[str], root: Path) -> set[str]:
    """Files -> fewer paths covering exactly them: a directory of several files, all declared, stands for them
    (DVC hashes it whole, less what .dvcignore drops), so a corpus of many small files is one dep and a file
    added to it is seen. A lone file stays itself, so `ablation/<scale>/results.json` keeps its `${scale}`."""
    out = set(files)
    ancestors = {str(p) for f in files for p in Path(f).parents if str(p) != "."}
    for d in sorted(ancestors, key=lambda d: -d.count("/")):
        on_disk = {str(p.relative_to(root)) for p in (root / d).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts}
        if len(on_disk) > 1 and on_disk <= files:
            out = {f for f in out if not f.startswith(d + "/")} | {d}
    return out


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

    def deps_of(name: str) -> list[str]:
        deps, sources = set(), set()
        for job, upstream in by_rule[name]:
            produced = {str(f) for up in upstream for f in up.output}
            for f in map(str, job.input):
                owner = next((r for r, d in out_dir.items() if f == d or f.startswith(d + "/")), None)
                if owner is not None and f in produced:
                    deps.add(out_dir[owner])
                else:
                    sources.add(f)  # source data and the stage's code, as declared by the rule
        code = {f for f in sources if f.endswith(".py")}  # file by file: a module nothing imports is no dep
        return sorted(templ(d) for d in deps | code | compact(sources - code, workdir))

    stages = {}
    record = None
    for name in rule_order:
        if name not in out_dir:  # the default target `all`: DVC's last stage records the run in Snakemake's metadata
            record = name
            continue
        job0 = by_rule[name][0][0]
        shell = job0.rule.shellcmd
        module = re.search(r"stages\.\w+", shell).group(0)
        cfg = json.loads(job0.params.cfg)
        cmd = f"python -m {module} --params params.yaml {job0.params.cli}"
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
        stage = {"cmd": templ(cmd), "deps": deps_of(name), "params": stage_params,
                 "outs": [templ(out_dir[name])]}
        for live in live_dir[name]:
            stage.setdefault("metrics", []).append({f"{live}/metrics.json": {"cache": False}})
            stage.setdefault("plots", []).append({f"{live}/plots": {"cache": False}})
        stages[name] = stage
    if record is not None:
        # It must run whenever any stage did (a rerun with byte-identical outputs still leaves Snakemake's params
        # metadata and mtimes behind), and only then: its deps are every stage's deps, outputs and params.
        deps = set(deps_of(record))
        for stage in stages.values():
            deps |= set(stage["deps"]) | set(stage["outs"])
        stage_params = sorted({q for stage in stages.values() for q in stage["params"]},
                              key=lambda q: (q not in ("scale", "seed"), q))
        stages[record] = {"cmd": SNAKEMAKE_RECORD, "deps": sorted(deps), "params": stage_params}
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
