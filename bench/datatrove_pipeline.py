"""The datatrove baseline of bench/bench_data.py, run as a subprocess inside bench/.venv-datatrove.

datatrove is never imported into the project's .venv (it pins older packages); bench_data.py starts this
script with the baseline venv's python and a JSON config, and measures its CPU time and peak RSS from outside.

Pipeline (datatrove's own steps, LocalPipelineExecutor, the same worker count as ours):
  1. ParquetReader -> the configured filters -> ParquetWriter(kept) -> MinhashDedupSignature
  2. MinhashDedupBuckets   3. MinhashDedupCluster   4. ParquetReader(kept) -> MinhashDedupFilter -> ParquetWriter
Language id: datatrove's LanguageFilter downloads a fastText model at run time, so the offline baseline runs langid
(the library and model our filter uses), with the same languages and threshold, as one of two steps (config filter
name): "langid", stock langid.py in a LambdaFilter (a Python step per byte, about 8 ms a document), or
"vectorized_langid", our own vectorized classifier (stages/filters/langid.py, imported from the repo, batched as ours
runs it), so the two sides can be compared with the same language id.
Word tokenizer (config "tokenizer"): "whitespace" gives the word-tokenizing filters and MinHash str.split words, the
split our filter uses (the equivalent pipeline: both sides then keep the same documents to within a fraction of a
percent); "spacy" is datatrove's stock English tokenizer (spaCy's blank `en`, no download), which also counts
punctuation as words and so drops far more documents under the same Gopher thresholds.

Usage: python bench/datatrove_pipeline.py CONFIG.json  -> prints one JSON line of per-phase times and counts.
       python bench/datatrove_pipeline.py --rule-verdicts CONFIG.json  -> tools/filter_parity.py's datatrove side:
       each configured filter on its own over each document of CONFIG's `docs`, one JSON line of results
       (true: kept; a string: datatrove's drop reason, "error: ..." when the filter raised).
"""
from __future__ import annotations

import json
import re
import resource
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter, LambdaFilter)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.writers import ParquetWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import WordTokenizer

HEURISTIC_FILTERS = {
    "GopherRepetitionFilter": GopherRepetitionFilter,
    "GopherQualityFilter": GopherQualityFilter,
    "C4QualityFilter": C4QualityFilter,
    "FineWebQualityFilter": FineWebQualityFilter,
}
# Pool workers forked from this process are joined by it, so their CPU and peak RSS reach the caller's os.wait4;
# datatrove's default forkserver parents them to a server process that nobody waits for.
START_METHOD = "fork"
WORD_TOKENIZED = {"GopherRepetitionFilter", "GopherQualityFilter", "FineWebQualityFilter"}


class SplitTokenizer(WordTokenizer):
    """str.split words: the `--datatrove-tokenizer whitespace` variant, the word split our filter uses."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in text.splitlines() if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(m.start(), m.end()) for m in re.finditer(r"[^\n]+", text)]


class DomainExempt(BaseFilter):
    """Run `inner` except on documents whose `domain` is in `exempt` (ours skips rules per domain, e.g. code)."""

    def __init__(self, inner: BaseFilter, exempt: list[str]):
        super().__init__()
        self.inner, self.exempt, self.name = inner, frozenset(exempt), inner.name

    def filter(self, doc) -> bool | tuple[bool, str]:
        return doc.metadata.get("domain") in self.exempt or self.inner.filter(doc)


def langid_filter(languages: list[str], min_score: float, max_chars: int) -> LambdaFilter:
    """Keep a document when langid's normalized top language is in `languages` with probability >= min_score."""
    from langid.langid import LanguageIdentifier, model

    identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    wanted = set(languages)

    def keep(doc) -> bool:
        lang, prob = identifier.classify(doc.text[:max_chars] if max_chars else doc.text)
        return lang in wanted and prob >= min_score

    return LambdaFilter(keep)


class VectorizedLangidFilter(BaseFilter):
    """Our vectorized langid (stages/filters/langid.py, same model and probabilities as stock langid), batched."""

    name = "vectorized langid"

    def __init__(self, languages: list[str], min_score: float, max_chars: int):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from stages.filters import langid
        super().__init__(batch_size=langid.LANGID_BATCH)
        langid.langid_model()  # loaded here, before the workers fork, as langid_filter loads stock langid's model
        self.identify, self.wanted, self.min_score, self.max_chars = \
            langid.identify_languages, frozenset(languages), min_score, max_chars

    def filter(self, doc) -> bool:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list) -> list[bool]:
        return [lang in self.wanted and prob >= self.min_score
                for lang, prob in self.identify([doc.text for doc in batch], self.max_chars)]


def build_filters(specs: list[dict], tokenizer) -> list:
    """specs: [{"name", "kwargs", "exempt_domains"}] in pipeline order; word-tokenizing filters get `tokenizer`."""
    steps = []
    for spec in specs:
        name, kwargs = spec["name"], dict(spec["kwargs"])
        if name == "langid":
            step = langid_filter(**kwargs)
        elif name == "vectorized_langid":
            step = VectorizedLangidFilter(**kwargs)
        elif name in HEURISTIC_FILTERS:
            if name in WORD_TOKENIZED:
                kwargs["language"] = tokenizer
            if "top_n_grams" in kwargs:
                kwargs["top_n_grams"] = tuple(map(tuple, kwargs["top_n_grams"]))
                kwargs["dup_n_grams"] = tuple(map(tuple, kwargs["dup_n_grams"]))
            if "stop_chars" in kwargs:
                kwargs["stop_chars"] = tuple(kwargs["stop_chars"])
            step = HEURISTIC_FILTERS[name](**kwargs)
        else:
            raise SystemExit(f"datatrove_pipeline: unknown filter {name!r}")
        steps.append(DomainExempt(step, spec["exempt_domains"]) if spec["exempt_domains"] else step)
    return steps


def cpu_seconds() -> float:
    """CPU of this process plus its finished children (datatrove's worker pool)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def parquet_rows(folder: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(folder.glob("*.parquet")))


def run(cfg: dict) -> dict:
    work = Path(cfg["work_dir"])
    tasks, workers = cfg["tasks"], cfg["workers"]
    mh = cfg["minhash"]
    # "spacy": datatrove's stock English word tokenizer (spaCy's blank `en`, no model download)
    tokenizer = "en" if cfg["tokenizer"] == "spacy" else SplitTokenizer()
    config = MinhashConfig(n_grams=mh["n_grams"], num_buckets=mh["num_buckets"],
                           hashes_per_bucket=mh["hashes_per_bucket"], seed=mh["seed"],
                           hash_config=HashConfig(precision=mh["precision"]), norm_config=TextNormConfig(**mh["norm"]))
    reader = dict(glob_pattern="*.parquet", text_key="text", id_key="id")
    phases = {
        "filter+signatures": LocalPipelineExecutor(
            pipeline=[ParquetReader(cfg["input_dir"], **reader), *build_filters(cfg["filters"], tokenizer),
                      ParquetWriter(str(work / "kept"), output_filename="${rank}.parquet", compression="zstd"),
                      MinhashDedupSignature(output_folder=str(work / "sigs"), config=config,
                                            language=tokenizer)],
            tasks=tasks, workers=workers, start_method=START_METHOD, logging_dir=str(work / "logs/filter")),
        "buckets": LocalPipelineExecutor(
            pipeline=[MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"),
                                          config=config)],
            tasks=mh["num_buckets"], workers=workers, start_method=START_METHOD,
            logging_dir=str(work / "logs/buckets")),
        "cluster": LocalPipelineExecutor(
            pipeline=[MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"),
                                          config=config)],
            tasks=1, workers=1, start_method=START_METHOD, logging_dir=str(work / "logs/cluster")),
        "dedup_filter": LocalPipelineExecutor(
            pipeline=[ParquetReader(str(work / "kept"), **reader),
                      MinhashDedupFilter(input_folder=str(work / "remove")),
                      ParquetWriter(str(work / "deduped"), output_filename="${rank}.parquet", compression="zstd")],
            tasks=tasks, workers=workers, start_method=START_METHOD, logging_dir=str(work / "logs/dedup_filter")),
    }
    out = {"phases": {}}
    for name, executor in phases.items():
        t0, c0 = time.perf_counter(), cpu_seconds()
        executor.run()
        out["phases"][name] = {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0}
    kept_files = len(list((work / "kept").glob("*.parquet")))
    if kept_files != tasks:
        # MinhashDedupFilter matches signatures to documents by rank, so every rank must have written a shard
        raise SystemExit(f"datatrove_pipeline: {kept_files} kept shards for {tasks} tasks")
    out["counts"] = {"kept_after_filters": parquet_rows(work / "kept"),
                     "kept_after_dedup": parquet_rows(work / "deduped")}
    return out


def rule_verdicts(cfg: dict) -> dict[str, list]:
    """{rule: [result per document]} for cfg = {"tokenizer", "docs": [text], "rules": {rule: filter spec}}: each
    spec's filter alone on a fresh Document (C4 rewrites doc.text), its result True or the drop reason."""
    tokenizer = "en" if cfg["tokenizer"] == "spacy" else SplitTokenizer()
    out = {}
    for rule, spec in cfg["rules"].items():
        step, = build_filters([{**spec, "exempt_domains": []}], tokenizer)
        results = []
        for i, text in enumerate(cfg["docs"]):
            try:
                result = step.filter(Document(text=text, id=str(i)))
            except Exception as exc:  # datatrove divides by zero on documents without words or lines
                result = f"error: {type(exc).__name__}"
            if isinstance(result, tuple):
                result = result[1] if not result[0] else True
            results.append(result if result is not False else "dropped")
        out[rule] = results
    return out


def main() -> None:
    if sys.argv[1] == "--rule-verdicts":
        cfg = json.loads(Path(sys.argv[2]).read_text(encoding="utf-8"))
        print(json.dumps(rule_verdicts(cfg)))
        return
    cfg = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    print(json.dumps(run(cfg)))


if __name__ == "__main__":
    main()
