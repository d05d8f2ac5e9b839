# Evaluation of every checkpoint in the DAG, then the report card.
# To evaluate another checkpoint, add one line to EVAL_CHECKPOINTS: name -> checkpoint directory (its prompt format,
# benchmarks and generation length are stated in params evaluate.per_checkpoint; names not there: the defaults).
from stages.evaluate import checkpoint_inputs

EVAL_CHECKPOINTS = {
    "base": f"{A}/pretrain/final",
    **{f"phase_{name}": f"{A}/pretrain/phases/{name}" for name in PHASES},
    "teacher": f"{A}/teacher/final",
    "sft_cold": f"{A}/sft_cold/final",
    "sft_full": f"{A}/sft_full/final",
    "distill": f"{A}/distill",
    "rl_stem": f"{A}/rl_stem/final",
    "rl_code": f"{A}/rl_code/final",
    "rl_pref": f"{A}/rl_pref/final",
}
CHECKPOINTS_ARG = ",".join(f"{name}={path}" for name, path in EVAL_CHECKPOINTS.items())
EVAL_DATA = "data/eval"
EVAL_SLICE = stage_params(config, "evaluate")
# benchmark data roots: the shipped eval sets, and the tasks stage's held-out ladder (entries with `root: tasks`)
EVAL_ROOTS = {"eval": Path(EVAL_DATA), "tasks": Path(f"{A}/tasks")}


rule evaluate:
    input:
        checkpoint=lambda w: f"{EVAL_CHECKPOINTS[w.ckpt]}/model.safetensors",
        data=lambda w: [str(f) for f in checkpoint_inputs(EVAL_SLICE, w.ckpt, EVAL_ROOTS)],
        code=code_inputs("stages.evaluate"),
    output:
        metrics=f"{A}/eval/{{ckpt}}/metrics.json",
        scores=f"{A}/eval/{{ckpt}}/scores.json",
        manifest=f"{A}/eval/{{ckpt}}/manifest.json",
    params:
        cfg=slices("evaluate"),
        cli=cli(f"--checkpoints {CHECKPOINTS_ARG} --data-root {EVAL_DATA} --tasks-dir {A}/tasks",
                output_dir=path_of("output", "metrics", up=2)),
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
        scores=expand(f"{A}/eval/{{ckpt}}/scores.json", ckpt=EVAL_CHECKPOINTS),
        funnel=rules.funnel.output.funnel,
        pretrain=rules.pretrain.output.manifest,
        pretrain_live=rules.pretrain.output.live,
        plan=rules.schedule.output.plan,
        sft_data=rules.sft_data.output.metrics,
        pass_filters=[rules.pass_filter_stem.output.manifest, rules.pass_filter_stem.output.histogram,
                      rules.pass_filter_code.output.manifest, rules.pass_filter_code.output.histogram,
                      rules.pass_filter_pref.output.manifest, rules.pass_filter_pref.output.histogram],
        rl=[rules.rl_stem.output.manifest, rules.rl_code.output.manifest, rules.rl_pref.output.manifest],
        rl_live=[rules.rl_stem.output.live, rules.rl_code.output.live, rules.rl_pref.output.live],
        reward_model=rules.reward_model.output.metrics,
        paper="data/paper_results.yaml",
        ablation=files_if_present(f"ablation/{SCALE}/results.json"),
        code=code_inputs("stages.report"),
    output:
        report=report(f"{A}/report/report.md", category="Report card"),
        funnel_png=report(f"{A}/report/data_funnel.png", category="Report card"),
        pretrain_png=report(f"{A}/report/pretrain_loss.png", category="Report card"),
        eval_png=report(f"{A}/report/eval_accuracy.png", category="Report card"),
        rl_filter_png=report(f"{A}/report/rl_pass_filter.png", category="Report card"),
        rl_png=report(f"{A}/report/rl_metrics.png", category="Report card"),
        live=directory("dvclive/eval"),
    params:
        cfg=slices("report"),
        cli=cli(f"--artifacts {A} --checkpoints {','.join(EVAL_CHECKPOINTS)} --benchmarks-dir {BENCH} "
                "--rl-live-root dvclive",
            output_dir=path_of("output", "report", up=1), live_dir=path_of("output", "live"),
            pretrain_live=path_of("input", "pretrain_live"), sft_data=path_of("input", "sft_data"), ablation=path_of("input", "ablation")),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report/report.tsv",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m stages.report --params-json {params.cfg:q} {params.cli} 2> {log}"
