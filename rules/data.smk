# Data curation: raw corpus -> filter -> dedup -> hybrid quality scoring -> selection -> FG-WSD plan.
# Per-shard rules fan out one job per input unit; global rules see only small per-shard summaries.
from stages.ingest import list_units

INPUT_DIR = stage_params(config, "ingest")["input_dir"]
UNITS = {name: str(path) for name, path in list_units(INPUT_DIR).items()}
SHARDS = sorted(UNITS)


rule ingest:
    input:
        lambda w: UNITS[w.shard],
    output:
        shard=f"{A}/ingest/{{shard}}.parquet",
        quarantine=f"{A}/ingest/quarantine/{{shard}}.parquet",
        manifest=f"{A}/ingest/{{shard}}.manifest.json",
    params:
        cfg=slices("ingest"),
        cli=f"--input-dir {INPUT_DIR} --output-dir {A}/ingest",
    log:
        f"{LOGS}/ingest/{{shard}}.log",
    benchmark:
        f"{BENCH}/ingest/{{shard}}.tsv",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m stages.ingest --params-json {params.cfg:q} {params.cli} --shard {wildcards.shard} 2> {log}"


rule filter:
    input:
        f"{A}/ingest/{{shard}}.parquet",
    output:
        kept=f"{A}/filter/kept/{{shard}}.parquet",
        rejected=f"{A}/filter/rejected/{{shard}}.parquet",
        sigs=f"{A}/filter/sigs/{{shard}}.parquet",
        manifest=f"{A}/filter/{{shard}}.manifest.json",
    params:
        cfg=slices("filter"),
        cli=f"--input-dir {A}/ingest --output-dir {A}/filter",
    log:
        f"{LOGS}/filter/{{shard}}.log",
    benchmark:
        f"{BENCH}/filter/{{shard}}.tsv",
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m stages.filter --params-json {params.cfg:q} {params.cli} --shard {wildcards.shard} 2> {log}"


rule dedup_index:
    input:
        expand(f"{A}/filter/sigs/{{shard}}.parquet", shard=SHARDS),
    output:
        duplicates=f"{A}/dedup_index/duplicates.parquet",
        manifest=f"{A}/dedup_index/manifest.json",
    params:
        cfg=slices("dedup"),
        cli=f"index --sigs-dir {A}/filter/sigs --output-dir {A}/dedup_index",
    log:
        f"{LOGS}/dedup_index.log",
    benchmark:
        f"{BENCH}/dedup_index/dedup_index.tsv",
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m stages.dedup --params-json {params.cfg:q} {params.cli} 2> {log}"


rule dedup:
    input:
        kept=f"{A}/filter/kept/{{shard}}.parquet",
        index=rules.dedup_index.output.duplicates,
    output:
        kept=f"{A}/dedup/kept/{{shard}}.parquet",
        rejected=f"{A}/dedup/rejected/{{shard}}.parquet",
        manifest=f"{A}/dedup/{{shard}}.manifest.json",
    params:
        cfg=slices("dedup"),
        cli=f"apply --input-dir {A}/filter/kept --index {A}/dedup_index/duplicates.parquet --output-dir {A}/dedup",
    log:
        f"{LOGS}/dedup/{{shard}}.log",
    benchmark:
        f"{BENCH}/dedup/{{shard}}.tsv",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m stages.dedup --params-json {params.cfg:q} {params.cli} --shard {wildcards.shard} 2> {log}"


rule quality_model:
    input:
        seed="data/reference/seed.jsonl",
        corpus=expand(f"{A}/dedup/kept/{{shard}}.parquet", shard=SHARDS),
    output:
        classifier=f"{A}/quality_model/classifier.npz",
        retrieval=f"{A}/quality_model/retrieval.npz",
        metrics=f"{A}/quality_model/metrics.json",
        manifest=f"{A}/quality_model/manifest.json",
    params:
        cfg=slices("quality_model"),
        cli=f"--seed-file data/reference/seed.jsonl --corpus-dir {A}/dedup/kept --output-dir {A}/quality_model",
    log:
        f"{LOGS}/quality_model.log",
    benchmark:
        f"{BENCH}/quality_model/quality_model.tsv",
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m stages.quality_model --params-json {params.cfg:q} {params.cli} 2> {log}"


rule score:
    input:
        kept=f"{A}/dedup/kept/{{shard}}.parquet",
        model=rules.quality_model.output.manifest,
    output:
        scored=f"{A}/score/{{shard}}.parquet",
        manifest=f"{A}/score/{{shard}}.manifest.json",
    params:
        cfg=slices("score"),
        cli=f"--input-dir {A}/dedup/kept --model-dir {A}/quality_model --output-dir {A}/score",
    log:
        f"{LOGS}/score/{{shard}}.log",
    benchmark:
        f"{BENCH}/score/{{shard}}.tsv",
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m stages.score --params-json {params.cfg:q} {params.cli} --shard {wildcards.shard} 2> {log}"


rule select:
    input:
        expand(f"{A}/score/{{shard}}.parquet", shard=SHARDS),
    output:
        pool=directory(f"{A}/select/pool"),
        rejected=directory(f"{A}/select/rejected"),
        buckets=f"{A}/select/buckets.json",
        manifest=f"{A}/select/manifest.json",
    params:
        cfg=slices("select"),
        cli=f"--input-dir {A}/score --output-dir {A}/select",
    log:
        f"{LOGS}/select.log",
    benchmark:
        f"{BENCH}/select/select.tsv",
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m stages.select --params-json {params.cfg:q} {params.cli} 2> {log}"


rule schedule:
    input:
        rules.select.output.buckets,
    output:
        plan=f"{A}/schedule/plan.json",
        manifest=f"{A}/schedule/manifest.json",
    params:
        cfg=slices("schedule"),
        cli=f"--buckets {A}/select/buckets.json --output-dir {A}/schedule",
    log:
        f"{LOGS}/schedule.log",
    benchmark:
        f"{BENCH}/schedule/schedule.tsv",
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m stages.schedule --params-json {params.cfg:q} {params.cli} 2> {log}"


rule funnel:
    input:
        ingest=expand(f"{A}/ingest/{{shard}}.manifest.json", shard=SHARDS),
        filter=expand(f"{A}/filter/{{shard}}.manifest.json", shard=SHARDS),
        dedup=expand(f"{A}/dedup/{{shard}}.manifest.json", shard=SHARDS),
        score=expand(f"{A}/score/{{shard}}.parquet", shard=SHARDS),
        select=rules.select.output.manifest,
        quality=rules.quality_model.output.metrics,
        plan=rules.schedule.output.plan,
    output:
        funnel=f"{A}/funnel/funnel.json",
        live=directory("dvclive/data"),
    params:
        cfg=slices("funnel"),
        cli=f"--artifacts {A} --output-dir {A}/funnel --live-dir dvclive/data",
    log:
        f"{LOGS}/funnel.log",
    benchmark:
        f"{BENCH}/funnel/funnel.tsv",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m stages.funnel --params-json {params.cfg:q} {params.cli} 2> {log}"
