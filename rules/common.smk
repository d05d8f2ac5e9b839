# Shared names for the rules: the scale, artifact paths, and the params slice each rule passes to its stage.
import json
from pathlib import Path

from stages.common import repo_imports, stage_params

SCALE = config["scale"]
A = f"artifacts/{SCALE}"
LOGS = f"logs/{SCALE}"
BENCH = f"benchmarks/{SCALE}"  # per-job wall time and memory (Snakemake `benchmark:`), read by the report


def slices(*stages):
    """The exact params slices a rule's stage reads, as the JSON its CLI takes (Snakemake reruns when it changes).
    Returned through a function so that braces inside param values are never taken for wildcards."""
    text = json.dumps({s: stage_params(config, s) for s in stages}, sort_keys=True)
    return lambda wildcards: text


def code_inputs(module):
    """Source files the stage module runs (stages.common.repo_imports: its imports within our packages,
    transitively): a rule input, so an edit reruns exactly the stages that import the file, under both runners."""
    return [str(path) for path in repo_imports(module)]


def files_if_present(*paths):
    """Inputs that exist only sometimes (an ablation study not yet run): declared when present, so running
    the study later reruns its reader (Snakemake's input-set trigger; DVC via the regenerated dvc.yaml)."""
    return [p for p in paths if Path(p).exists()]


def path_of(io, name, up=0):
    """A path the job declares (`io`: "input" or "output"; a list entry gives its first path; an entry the rule does
    not declare gives None, so `cli` omits its flag), or its `up`-th parent directory: what a stage CLI flag takes,
    read off the rule's own declaration, so each path is written once."""
    def get(input, output):
        value = {"input": input, "output": output}[io].get(name)
        value = value if value is None or isinstance(value, str) else next(iter(value), None)
        return None if value is None else str(Path(value).parents[up - 1]) if up else str(value)
    return get


def cli(*fixed, **flags):
    """The stage CLI's arguments: `fixed` words, then `--flag-name path` for each `path_of` (omitted when the
    declared entry is empty). gen_dvc runs the same string over all shards, so directory flags are shard-free."""
    def render(wildcards, input, output):
        paths = {flag.replace("_", "-"): ref(input, output) for flag, ref in flags.items()}
        return " ".join([*fixed, *(f"--{flag} {path}" for flag, path in paths.items() if path is not None)])
    return render


def job_threads(stage, resources):
    """Cores a job of `stage` holds. On a CPU-only scale (resources gpu 0) that is what the stage runs at once: its
    torch threads (params cpu_threads) or its sandbox workers, whichever is more, at most cpus_per_task; so a 2-core
    machine runs a 1-thread generation stage beside a 1-thread evaluation instead of leaving a core idle. With GPUs,
    cpus_per_task (data loading, verifiers) as the resources say."""
    p = stage_params(config, stage)
    if resources.get("gpu", 0) or not p.get("cpu_threads"):
        return resources["cpus_per_task"]
    return max(1, min(resources["cpus_per_task"], max(int(p["cpu_threads"]), int(p.get("sandbox_workers") or 0))))
