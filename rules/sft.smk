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
