# Data curation: raw corpus -> filter -> dedup -> hybrid quality scoring -> selection, and the data funnel.
# Per-shard rules fan out one job per input unit; global rules see only small per-shard summaries.
from stages.dedup import band_ranges
from stages.ingest import list_units, unit_files

INPUT_DIR = stage_params(config, "ingest")["input_dir"]
UNITS = {name: str(path) for name, path in list_units(INPUT_DIR).items()}
SHARDS = sorted(UNITS)
# dedup's LSH index is sharded by band: one edges job per band range, then one merge
BAND_RANGES = band_ranges(stage_params(config, "filter")["minhash"]["bands"], stage_params(config, "dedup")["band_shards"])


rule ingest:
    input:
        unit=lambda w: [str(p) for p in unit_files(Path(UNITS[w.shard]))],  # every file of a directory unit
        code=code_inputs("stages.ingest"),
    output:
        shard=f"{A}/ingest/{{shard}}.parquet",
        quarantine=f"{A}/ingest/quarantine/{{shard}}.parquet",
        manifest=f"{A}/ingest/{{shard}}.manifest.json",
    params:
        cfg=slices("ingest"),
        cli=cli(f"--input-dir {INPUT_DIR}", output_dir=path_of("output", "shard", up=1)),
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
        shard=rules.ingest.output.shard,
        code=code_inputs("stages.filter"),
    output:
        kept=f"{A}/filter/kept/{{shard}}.parquet",
        rejected=f"{A}/filter/rejected/{{shard}}.parquet",
        sigs=f"{A}/filter/sigs/{{shard}}.parquet",
        manifest=f"{A}/filter/{{shard}}.manifest.json",
    params:
        cfg=slices("filter"),
        cli=cli(input_dir=path_of("input", "shard", up=1), output_dir=path_of("output", "manifest", up=1)),
    log:
        f"{LOGS}/filter/{{shard}}.log",
    benchmark:
        f"{BENCH}/filter/{{shard}}.tsv",
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m stages.filter --params-json {params.cfg:q} {params.cli} --shard {wildcards.shard} 2> {log}"


rule dedup_edges:
    input:
        sigs=expand(rules.filter.output.sigs, shard=SHARDS),
        code=code_inputs("stages.dedup"),
    output:
        edges=f"{A}/dedup_edges/{{bands}}.parquet",
        manifest=f"{A}/dedup_edges/{{bands}}.manifest.json",
    wildcard_constraints:
        bands=r"\d+-\d+",
    params:
        cfg=slices("dedup"),
        cli=cli("edges", sigs_dir=path_of("input", "sigs", up=1), output_dir=path_of("output", "edges", up=1)),
    log:
        f"{LOGS}/dedup_edges/{{bands}}.log",
    benchmark:
        f"{BENCH}/dedup_edges/{{bands}}.tsv",
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m stages.dedup --params-json {params.cfg:q} {params.cli} --bands {wildcards.bands} 2> {log}"


rule dedup_index:
    input:
        sigs=expand(rules.filter.output.sigs, shard=SHARDS),
        edges=expand(rules.dedup_edges.output.edges, bands=BAND_RANGES),
        edge_manifests=expand(rules.dedup_edges.output.manifest, bands=BAND_RANGES),
        code=code_inputs("stages.dedup"),
    output:
        duplicates=f"{A}/dedup_index/duplicates.parquet",
        manifest=f"{A}/dedup_index/manifest.json",
    params:
        cfg=slices("dedup"),
        cli=cli("merge", sigs_dir=path_of("input", "sigs", up=1), edges_dir=path_of("input", "edges", up=1),
                output_dir=path_of("output", "manifest", up=1)),
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
        kept=rules.filter.output.kept,
        index=rules.dedup_index.output.duplicates,
        code=code_inputs("stages.dedup"),
    output:
        kept=f"{A}/dedup/kept/{{shard}}.parquet",
        rejected=f"{A}/dedup/rejected/{{shard}}.parquet",
        manifest=f"{A}/dedup/{{shard}}.manifest.json",
    params:
        cfg=slices("dedup"),
        cli=cli("apply", input_dir=path_of("input", "kept", up=1), index=path_of("input", "index"),
            output_dir=path_of("output", "manifest", up=1)),
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
        corpus=expand(rules.dedup.output.kept, shard=SHARDS),
        code=code_inputs("stages.quality_model"),
    output:
        classifier=f"{A}/quality_model/classifier.npz",
        retrieval=f"{A}/quality_model/retrieval.npz",
        metrics=f"{A}/quality_model/metrics.json",
        manifest=f"{A}/quality_model/manifest.json",
    params:
        cfg=slices("quality_model"),
        cli=cli(seed_file=path_of("input", "seed"), corpus_dir=path_of("input", "corpus", up=1),
            output_dir=path_of("output", "manifest", up=1)),
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
        kept=rules.dedup.output.kept,
        classifier=rules.quality_model.output.classifier,
        retrieval=rules.quality_model.output.retrieval,
        model=rules.quality_model.output.manifest,
        code=code_inputs("stages.score"),
    output:
        scored=f"{A}/score/{{shard}}.parquet",
        manifest=f"{A}/score/{{shard}}.manifest.json",
    params:
        cfg=slices("score"),
        cli=cli(input_dir=path_of("input", "kept", up=1), model_dir=path_of("input", "model", up=1),
            output_dir=path_of("output", "manifest", up=1)),
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
        scored=expand(rules.score.output.scored, shard=SHARDS),
        code=code_inputs("stages.select"),
    output:
        pool=directory(f"{A}/select/pool"),
        rejected=directory(f"{A}/select/rejected"),
        buckets=f"{A}/select/buckets.json",
        manifest=f"{A}/select/manifest.json",
    params:
        cfg=slices("select"),
        cli=cli(input_dir=path_of("input", "scored", up=1), output_dir=path_of("output", "manifest", up=1)),
    log:
        f"{LOGS}/select.log",
    benchmark:
        f"{BENCH}/select/select.tsv",
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m stages.select --params-json {params.cfg:q} {params.cli} 2> {log}"


rule funnel:
    input:
        ingest=expand([rules.ingest.output.shard, rules.ingest.output.quarantine], shard=SHARDS),
        filter=expand([rules.filter.output.kept, rules.filter.output.rejected], shard=SHARDS),
        dedup=expand([rules.dedup.output.kept, rules.dedup.output.rejected], shard=SHARDS),
        score=expand(rules.score.output.scored, shard=SHARDS),
        select=[rules.select.output.pool, rules.select.output.rejected],
        quality=rules.quality_model.output.metrics,
        code=code_inputs("stages.funnel"),
    output:
        funnel=f"{A}/funnel/funnel.json",
        live=directory("dvclive/data"),
    params:
        cfg=slices("funnel"),
        cli=cli(f"--artifacts {A}", output_dir=path_of("output", "funnel", up=1), live_dir=path_of("output", "live")),
    log:
        f"{LOGS}/funnel.log",
    benchmark:
        f"{BENCH}/funnel/funnel.tsv",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m stages.funnel --params-json {params.cfg:q} {params.cli} 2> {log}"
