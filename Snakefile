# The Nanbeige4-3B pipeline as one DAG. Rules are declarations; the logic lives in stages/.
# `snakemake -c2` runs the `scale` set in params.yaml; `--config scale=small` picks another profile.
# dvc.yaml is generated from this DAG by `python -m tools.gen_dvc` (never edit it by hand).
configfile: "params.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/eval.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
