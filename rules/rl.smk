# Multi-stage RL (RECIPE.md, RL): before each stage a pass-rate filter under the previous model keeps the prompts it
# sometimes solves; GRPO trains on them (stages/rl.py). distill -> rl_stem (math verifier) -> rl_code (sandboxed
# tests) -> rl_pref (the pairwise reward model, trained once from the DPD pairs).
RL_RESOURCES = SFT_RESOURCES


def pass_filter_outputs(role):
    d = f"{A}/pass_filter/{role}"
    return dict(kept=f"{d}/kept.parquet", rates=f"{d}/pass_rates.parquet", histogram=f"{d}/histogram.json",
                manifest=f"{d}/manifest.json")


def pass_filter_cli(role):
    flags = {"tasks_dir": path_of("input", "tasks", up=1), "checkpoint": path_of("input", "model", up=1),
             "judge_dir": path_of("input", "judge", up=1), "output_dir": path_of("output", "manifest", up=1)}
    return cli(f"--role {role}", **flags)


def rl_outputs(role):
    return dict(final=f"{A}/{role}/final/model.safetensors", manifest=f"{A}/{role}/manifest.json",
                live=directory(f"dvclive/{role}"))


def rl_cli(role):
    return cli(f"--role {role} --resume-dir checkpoints/{SCALE}/{role}", kept_dir=path_of("input", "kept", up=1),
               init_dir=path_of("input", "init", up=1), judge_dir=path_of("input", "judge", up=1),
               output_dir=path_of("output", "manifest", up=1), live_dir=path_of("output", "live"))


rule pass_filter_stem:
    input:
        tasks=rules.tasks.output.math_train,
        model=rules.distill.output.final,
        code=code_inputs("stages.pass_filter"),
    output:
        **pass_filter_outputs("rl_stem"),
    params:
        cfg=slices("pass_filter"),
        cli=pass_filter_cli("rl_stem"),
    log:
        f"{LOGS}/pass_filter/rl_stem.log",
    benchmark:
        f"{BENCH}/pass_filter/rl_stem.tsv",
    threads: job_threads("pass_filter", RL_RESOURCES)
    resources:
        **RL_RESOURCES,
    shell:
        "python -m stages.pass_filter --params-json {params.cfg:q} {params.cli} 2> {log}"


rule rl_stem:
    input:
        kept=rules.pass_filter_stem.output.kept,
        filter=rules.pass_filter_stem.output.manifest,
        init=rules.distill.output.final,
        code=code_inputs("stages.rl"),
    output:
        **rl_outputs("rl_stem"),
    params:
        cfg=slices("rl_stem"),
        cli=rl_cli("rl_stem"),
    log:
        f"{LOGS}/rl_stem.log",
    benchmark:
        f"{BENCH}/rl_stem/rl_stem.tsv",
    threads: job_threads("rl_stem", RL_RESOURCES)
    resources:
        **RL_RESOURCES,
    shell:
        "python -m stages.rl --params-json {params.cfg:q} {params.cli} 2> {log}"


rule pass_filter_code:
    input:
        tasks=rules.tasks.output.code_train,
        model=rules.rl_stem.output.final,
        code=code_inputs("stages.pass_filter"),
    output:
        **pass_filter_outputs("rl_code"),
    params:
        cfg=slices("pass_filter"),
        cli=pass_filter_cli("rl_code"),
    log:
        f"{LOGS}/pass_filter/rl_code.log",
    benchmark:
        f"{BENCH}/pass_filter/rl_code.tsv",
    threads: job_threads("pass_filter", RL_RESOURCES)
    resources:
        **RL_RESOURCES,
    shell:
        "python -m stages.pass_filter --params-json {params.cfg:q} {params.cli} 2> {log}"


rule rl_code:
    input:
        kept=rules.pass_filter_code.output.kept,
        filter=rules.pass_filter_code.output.manifest,
        init=rules.rl_stem.output.final,
        code=code_inputs("stages.rl"),
    output:
        **rl_outputs("rl_code"),
    params:
        cfg=slices("rl_code"),
        cli=rl_cli("rl_code"),
    log:
        f"{LOGS}/rl_code.log",
    benchmark:
        f"{BENCH}/rl_code/rl_code.tsv",
    threads: job_threads("rl_code", RL_RESOURCES)
    resources:
        **RL_RESOURCES,
    shell:
        "python -m stages.rl --params-json {params.cfg:q} {params.cli} 2> {log}"


# The judge of rl_pref: a pairwise Bradley-Terry reward model on the DPD pairs (verified teacher answers preferred to
# the student's failed ones), initialized from the distilled student.
rule reward_model:
    input:
        pairs=rules.distill_targets.output.pairs,
        init=rules.distill.output.final,
        code=code_inputs("stages.reward_model"),
    output:
        judge=f"{A}/reward_model/judge/model.safetensors",
        metrics=f"{A}/reward_model/metrics.json",
        rejected=f"{A}/reward_model/rejected.parquet",
        manifest=f"{A}/reward_model/manifest.json",
        live=directory("dvclive/reward_model"),
    params:
        cfg=slices("reward_model"),
        cli=cli(f"--resume-dir checkpoints/{SCALE}/reward_model", pairs=path_of("input", "pairs"),
                init_dir=path_of("input", "init", up=1), output_dir=path_of("output", "manifest", up=1),
                live_dir=path_of("output", "live")),
    log:
        f"{LOGS}/reward_model.log",
    benchmark:
        f"{BENCH}/reward_model/reward_model.tsv",
    threads: job_threads("reward_model", RL_RESOURCES)
    resources:
        **RL_RESOURCES,
    shell:
        "python -m stages.reward_model --params-json {params.cfg:q} {params.cli} 2> {log}"


rule pass_filter_pref:
    input:
        tasks=[rules.tasks.output.math_train, rules.tasks.output.code_train],
        model=rules.rl_code.output.final,
        judge=rules.reward_model.output.judge,
        code=code_inputs("stages.pass_filter"),
    output:
        **pass_filter_outputs("rl_pref"),
    params:
        cfg=slices("pass_filter"),
        cli=pass_filter_cli("rl_pref"),
    log:
        f"{LOGS}/pass_filter/rl_pref.log",
    benchmark:
        f"{BENCH}/pass_filter/rl_pref.tsv",
    threads: job_threads("pass_filter", RL_RESOURCES)
    resources:
        **RL_RESOURCES,
    shell:
        "python -m stages.pass_filter --params-json {params.cfg:q} {params.cli} 2> {log}"


rule rl_pref:
    input:
        kept=rules.pass_filter_pref.output.kept,
        filter=rules.pass_filter_pref.output.manifest,
        init=rules.rl_code.output.final,
        judge=rules.reward_model.output.judge,
        code=code_inputs("stages.rl"),
    output:
        **rl_outputs("rl_pref"),
    params:
        cfg=slices("rl_pref"),
        cli=rl_cli("rl_pref"),
    log:
        f"{LOGS}/rl_pref.log",
    benchmark:
        f"{BENCH}/rl_pref/rl_pref.tsv",
    threads: job_threads("rl_pref", RL_RESOURCES)
    resources:
        **RL_RESOURCES,
    shell:
        "python -m stages.rl --params-json {params.cfg:q} {params.cli} 2> {log}"
