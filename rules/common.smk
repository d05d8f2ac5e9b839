# Shared names for the rules: the scale, artifact paths, and the params slice each rule passes to its stage.
import json

from stages.common import stage_params

SCALE = config["scale"]
A = f"artifacts/{SCALE}"
LOGS = f"logs/{SCALE}"
BENCH = f"benchmarks/{SCALE}"  # per-job wall time and memory (Snakemake `benchmark:`), read by the report


def slices(*stages):
    """The exact params slices a rule's stage reads, as the JSON its CLI takes (Snakemake reruns when it changes).
    Returned through a function so that braces inside param values are never taken for wildcards."""
    text = json.dumps({s: stage_params(config, s) for s in stages}, sort_keys=True)
    return lambda wildcards: text
