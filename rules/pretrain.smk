# Tokenizer + packed token streams per bucket, the FG-WSD plan over them, then pretraining to a base checkpoint.
# Resources scale with the profile so `snakemake --profile profiles/slurm` requests what each scale needs.
from stages.training.launch import launch_prefix

PHASES = [phase["name"] for phase in stage_params(config, "schedule")["phases"]]
RESOURCES = {
    "tiny": {"tokenize": dict(mem_mb=4000, runtime=30, cpus_per_task=2, gpu=0),
             "pretrain": dict(mem_mb=8000, runtime=60, cpus_per_task=2, gpu=0)},
    "small": {"tokenize": dict(mem_mb=16000, runtime=120, cpus_per_task=8, gpu=0),
              "pretrain": dict(mem_mb=64000, runtime=24 * 60, cpus_per_task=16, gpu=1)},
    "3b": {"tokenize": dict(mem_mb=256000, runtime=48 * 60, cpus_per_task=64, gpu=0),
           "pretrain": dict(mem_mb=1000000, runtime=14 * 24 * 60, cpus_per_task=96, gpu=8)},
}[SCALE]


rule tokenize:
    input:
        pool=rules.select.output.pool,
        heldout=sorted(map(str, Path("data/heldout").glob("*.jsonl"))),  # what stages.tokenize reads of --heldout
        code=code_inputs("stages.tokenize"),
    output:
        manifest=f"{A}/tokenize/manifest.json",
        tokenizer=f"{A}/tokenize/tokenizer/tokenizer.json",
    params:
        cfg=slices("tokenize"),
        cli=cli(pool_dir=path_of("input", "pool"), heldout=path_of("input", "heldout", up=1),
            output_dir=path_of("output", "manifest", up=1)),
    log:
        f"{LOGS}/tokenize.log",
    benchmark:
        f"{BENCH}/tokenize/tokenize.tsv",
    threads: RESOURCES["tokenize"]["cpus_per_task"]
    resources:
        **RESOURCES["tokenize"],
    shell:
        "python -m stages.tokenize --params-json {params.cfg:q} {params.cli} 2> {log}"


rule schedule:
    input:
        buckets=rules.select.output.buckets,
        tokens=rules.tokenize.output.manifest,  # the real tokens per bucket stream
        code=code_inputs("stages.schedule"),
    output:
        plan=f"{A}/schedule/plan.json",
        manifest=f"{A}/schedule/manifest.json",
    params:
        cfg=slices("schedule"),
        cli=cli(buckets=path_of("input", "buckets"), tokens_manifest=path_of("input", "tokens"),
            output_dir=path_of("output", "manifest", up=1)),
    log:
        f"{LOGS}/schedule.log",
    benchmark:
        f"{BENCH}/schedule/schedule.tsv",
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m stages.schedule --params-json {params.cfg:q} {params.cli} 2> {log}"


rule pretrain:
    input:
        plan=rules.schedule.output.plan,
        tokens=rules.tokenize.output.manifest,
        code=code_inputs("stages.pretrain"),
    output:
        final=f"{A}/pretrain/final/model.safetensors",
        phases=expand(f"{A}/pretrain/phases/{{name}}/model.safetensors", name=PHASES),
        manifest=f"{A}/pretrain/manifest.json",
        live=directory("dvclive/pretrain"),
    params:
        cfg=slices("pretrain", "model"),
        cli=cli(f"--resume-dir checkpoints/{SCALE}/pretrain", plan=path_of("input", "plan"),
            tokens_dir=path_of("input", "tokens", up=1), output_dir=path_of("output", "manifest", up=1)),
    log:
        f"{LOGS}/pretrain.log",
    benchmark:
        f"{BENCH}/pretrain/pretrain.tsv",
    threads: RESOURCES["pretrain"]["cpus_per_task"]
    resources:
        **RESOURCES["pretrain"],
    shell:  # 1 process at tiny; torchrun over the node's GPUs (FSDP2 / Megatron) or srun + torchrun over nodes at 3b
        launch_prefix("stages.pretrain", RESOURCES["pretrain"].get("nodes", 1), RESOURCES["pretrain"]["gpu"])
        + " --params-json {params.cfg:q} {params.cli} 2> {log}"
