# The Nanbeige4-3B pipeline as one DAG. Rules are declarations; the logic lives in stages/.
# `snakemake -c2` runs the `scale` set in params.yaml; `--config scale=small` picks another profile.
# dvc.yaml is generated from this DAG by `python -m tools.gen_dvc` (never edit it by hand).
from snakemake.utils import validate

from tools.runner_sync import record_in_dvc


configfile: "params.yaml"


validate(config, "schemas/params.schema.yaml")  # a mistyped key or a wrong type fails here, naming its path


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/sft.smk"
include: "rules/distill.smk"
include: "rules/rl.smk"
include: "rules/eval.smk"


rule all:
    default_target: True
    input:
        rules.report.output,


onsuccess:
    # what Snakemake built goes into dvc.lock, so `dvc repro` then has nothing to do
    record_in_dvc(config, {job.rule.name for job in workflow.dag.jobs})
