# Evaluation of every checkpoint in the DAG, then the report card.
# To evaluate another checkpoint, add one line to EVAL_CHECKPOINTS: name -> checkpoint directory.
EVAL_CHECKPOINTS = {
    "base": f"{A}/pretrain/final",
    **{f"phase_{name}": f"{A}/pretrain/phases/{name}" for name in PHASES},
}
CHECKPOINTS_ARG = ",".join(f"{name}={path}" for name, path in EVAL_CHECKPOINTS.items())


rule evaluate:
    input:
        lambda w: f"{EVAL_CHECKPOINTS[w.ckpt]}/model.safetensors",
    output:
        metrics=f"{A}/eval/{{ckpt}}/metrics.json",
        manifest=f"{A}/eval/{{ckpt}}/manifest.json",
    params:
        cfg=slices("evaluate"),
        cli=f"--checkpoints {CHECKPOINTS_ARG} --data-root data/eval --output-dir {A}/eval",
    log:
        f"{LOGS}/evaluate/{{ckpt}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{ckpt}}.tsv",
    wildcard_constraints:
        ckpt="|".join(EVAL_CHECKPOINTS),
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m stages.evaluate --params-json {params.cfg:q} {params.cli} --only {wildcards.ckpt} 2> {log}"


rule report:
    input:
        evals=expand(f"{A}/eval/{{ckpt}}/metrics.json", ckpt=EVAL_CHECKPOINTS),
        funnel=rules.funnel.output.funnel,
        pretrain=rules.pretrain.output.manifest,
        pretrain_live=rules.pretrain.output.live,
        plan=rules.schedule.output.plan,
    output:
        report=report(f"{A}/report/report.md", category="Report card"),
        funnel_png=report(f"{A}/report/data_funnel.png", category="Report card"),
        pretrain_png=report(f"{A}/report/pretrain_loss.png", category="Report card"),
        eval_png=report(f"{A}/report/eval_accuracy.png", category="Report card"),
        live=directory("dvclive/eval"),
    params:
        cfg=slices("report"),
        cli=(f"--artifacts {A} --checkpoints {','.join(EVAL_CHECKPOINTS)} --output-dir {A}/report"
             f" --live-dir dvclive/eval --benchmarks-dir {BENCH} --ablation ablation/{SCALE}/results.json"),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report/report.tsv",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m stages.report --params-json {params.cfg:q} {params.cli} 2> {log}"
