# Post-training data: the graded task ladder (math levels, code tasks built backwards), disjoint train / held-out.
# Its held-out splits feed evaluation per level; its train splits feed SFT data, distillation and RL.


rule tasks:
    input:
        code=code_inputs("stages.tasks"),
    output:
        math_train=f"{A}/tasks/math_train.parquet",
        math_heldout=f"{A}/tasks/math_heldout.parquet",
        code_train=f"{A}/tasks/code_train.parquet",
        code_heldout=f"{A}/tasks/code_heldout.parquet",
        manifest=f"{A}/tasks/manifest.json",
    params:
        cfg=slices("tasks"),
        cli=cli(output_dir=path_of("output", "manifest", up=1)),
    log:
        f"{LOGS}/tasks.log",
    benchmark:
        f"{BENCH}/tasks/tasks.tsv",
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m stages.tasks --params-json {params.cfg:q} {params.cli} 2> {log}"


# SFT roles share one stage module (stages/sft.py) and one rule shape: data -> final/ checkpoint + rejected rows.
TEACHER = stage_params(config, "teacher")
SFT_RESOURCES = {
    "tiny": dict(mem_mb=4000, runtime=30, cpus_per_task=2, gpu=0),
    "small": dict(mem_mb=64000, runtime=12 * 60, cpus_per_task=16, gpu=1),
    "3b": dict(mem_mb=1000000, runtime=3 * 24 * 60, cpus_per_task=96, gpu=8),
}[SCALE]


def sft_outputs(role):
    return dict(final=f"{A}/{role}/final/model.safetensors", rejected=f"{A}/{role}/rejected.parquet",
                manifest=f"{A}/{role}/manifest.json", live=directory(f"dvclive/{role}"))


def sft_cli(role, **flags):
    return cli(f"--role {role} --resume-dir checkpoints/{SCALE}/{role}", tokens_dir=path_of("input", "tokens", up=1),
               output_dir=path_of("output", "manifest", up=1), live_dir=path_of("output", "live"), **flags)


# The teacher: `teacher.checkpoint` adopts an existing HF checkpoint (3b); else trained here on the ladder's train
# splits, from scratch when `teacher.model` gives a shape, else from the base checkpoint (tiny: trained ~5x longer
# than the student, so it beats it clearly; README "Post-training").
rule teacher:
    input:
        tasks=[] if TEACHER["checkpoint"] else [rules.tasks.output.math_train, rules.tasks.output.code_train],
        init=[] if TEACHER["checkpoint"] or TEACHER["model"] else [rules.pretrain.output.final],
        tokens=rules.tokenize.output.manifest,
        code=code_inputs("stages.sft"),
    output:
        **sft_outputs("teacher"),
    params:
        cfg=slices("teacher"),
        cli=sft_cli("teacher", tasks_dir=path_of("input", "tasks", up=1), init_dir=path_of("input", "init", up=1)),
    log:
        f"{LOGS}/teacher.log",
    benchmark:
        f"{BENCH}/teacher/teacher.tsv",
    threads: job_threads("teacher", SFT_RESOURCES)
    resources:
        **SFT_RESOURCES,
    shell:
        "python -m stages.sft --params-json {params.cfg:q} {params.cli} 2> {log}"


# Refined SFT data: teacher and current-model candidates, checklist, critique + revision, CoT reconstruction.
rule sft_data:
    input:
        tasks=[rules.tasks.output.math_train, rules.tasks.output.code_train],
        teacher=rules.teacher.output.final,
        student=rules.pretrain.output.final,
        code=code_inputs("stages.sft_data"),
    output:
        sft=f"{A}/sft_data/sft.parquet",
        rejected=f"{A}/sft_data/rejected.parquet",
        metrics=f"{A}/sft_data/metrics.json",
        manifest=f"{A}/sft_data/manifest.json",
        live=directory("dvclive/sft_data"),
    params:
        cfg=slices("sft_data"),
        cli=cli(tasks_dir=path_of("input", "tasks", up=1), teacher=path_of("input", "teacher", up=1),
                student=path_of("input", "student", up=1), output_dir=path_of("output", "manifest", up=1),
                live_dir=path_of("output", "live")),
    log:
        f"{LOGS}/sft_data.log",
    benchmark:
        f"{BENCH}/sft_data/sft_data.tsv",
    threads: job_threads("sft_data", SFT_RESOURCES)
    resources:
        **SFT_RESOURCES,
    shell:
        "python -m stages.sft_data --params-json {params.cfg:q} {params.cli} 2> {log}"


# Cold-start SFT: the base checkpoint on the refined data.
rule sft_cold:
    input:
        data=rules.sft_data.output.sft,
        init=rules.pretrain.output.final,
        tokens=rules.tokenize.output.manifest,
        code=code_inputs("stages.sft"),
    output:
        **sft_outputs("sft_cold"),
    params:
        cfg=slices("sft_cold"),
        cli=sft_cli("sft_cold", data=path_of("input", "data"), init_dir=path_of("input", "init", up=1)),
    log:
        f"{LOGS}/sft_cold.log",
    benchmark:
        f"{BENCH}/sft_cold/sft_cold.tsv",
    threads: job_threads("sft_cold", SFT_RESOURCES)
    resources:
        **SFT_RESOURCES,
    shell:
        "python -m stages.sft --params-json {params.cfg:q} {params.cli} 2> {log}"


# Full SFT: the cold-start checkpoint on the refined data and the task ladder's train splits.
rule sft_full:
    input:
        data=rules.sft_data.output.sft,
        tasks=[rules.tasks.output.math_train, rules.tasks.output.code_train],
        init=rules.sft_cold.output.final,
        tokens=rules.tokenize.output.manifest,
        code=code_inputs("stages.sft"),
    output:
        **sft_outputs("sft_full"),
    params:
        cfg=slices("sft_full"),
        cli=sft_cli("sft_full", data=path_of("input", "data"), tasks_dir=path_of("input", "tasks", up=1),
                    init_dir=path_of("input", "init", up=1)),
    log:
        f"{LOGS}/sft_full.log",
    benchmark:
        f"{BENCH}/sft_full/sft_full.tsv",
    threads: job_threads("sft_full", SFT_RESOURCES)
    resources:
        **SFT_RESOURCES,
    shell:
        "python -m stages.sft --params-json {params.cfg:q} {params.cli} 2> {log}"
