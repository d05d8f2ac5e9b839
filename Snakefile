# The Nanbeige4-3B pipeline as one DAG. Rules are declarations; the logic lives in stages/.
# `snakemake -c2` runs the `scale` set in params.yaml; `--config scale=small` picks another profile.
# dvc.yaml is generated from this DAG by `python -m tools.gen_dvc` (never edit it by hand).
import json

from stages.common import stage_params

configfile: "params.yaml"

SCALE = config["scale"]
A = f"artifacts/{SCALE}"
LOGS = f"logs/{SCALE}"
BENCH = f"benchmarks/{SCALE}"  # per-job wall time and memory (Snakemake `benchmark:`), read by the report
PY = "python -m"


def slices(*stages):
    """The exact params slices a rule's stage reads, as the JSON its CLI takes (Snakemake reruns when it changes).
    Returned through a function so that braces inside param values are never taken for wildcards."""
    text = json.dumps({s: stage_params(config, s) for s in stages}, sort_keys=True)
    return lambda wildcards: text


include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/eval.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
