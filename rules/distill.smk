# Dual Preference Distillation: the pairs and teacher targets once (distill_targets), then training (distill), so a
# change of a loss weight, beta or the KL direction reruns only training.


rule distill_targets:
    input:
        tasks=[rules.tasks.output.math_train, rules.tasks.output.code_train],
        teacher=rules.teacher.output.final,
        student=rules.sft_full.output.final,
        code=code_inputs("stages.distill_targets"),
    output:
        pairs=f"{A}/distill_targets/pairs.parquet",
        rejected=f"{A}/distill_targets/rejected.parquet",
        manifest=f"{A}/distill_targets/manifest.json",
    params:
        cfg=slices("distill_targets"),
        cli=cli(tasks_dir=path_of("input", "tasks", up=1), teacher=path_of("input", "teacher", up=1),
                student=path_of("input", "student", up=1), output_dir=path_of("output", "manifest", up=1)),
    log:
        f"{LOGS}/distill_targets.log",
    benchmark:
        f"{BENCH}/distill_targets/distill_targets.tsv",
    threads: job_threads("distill_targets", SFT_RESOURCES)
    resources:
        **SFT_RESOURCES,
    shell:
        "python -m stages.distill_targets --params-json {params.cfg:q} {params.cli} 2> {log}"


rule distill:
    input:
        pairs=rules.distill_targets.output.pairs,
        targets=rules.distill_targets.output.manifest,
        student=rules.sft_full.output.final,
        code=code_inputs("stages.distill"),
    output:
        final=f"{A}/distill/model.safetensors",
        manifest=f"{A}/distill/manifest.json",
        live=directory("dvclive/distill"),
    params:
        cfg=slices("distill"),
        cli=cli(f"--resume-dir checkpoints/{SCALE}/distill", targets_dir=path_of("input", "targets", up=1),
                student=path_of("input", "student", up=1), output_dir=path_of("output", "manifest", up=1),
                live_dir=path_of("output", "live")),
    log:
        f"{LOGS}/distill.log",
    benchmark:
        f"{BENCH}/distill/distill.tsv",
    threads: job_threads("distill", SFT_RESOURCES)
    resources:
        **SFT_RESOURCES,
    shell:
        "python -m stages.distill --params-json {params.cfg:q} {params.cli} 2> {log}"
