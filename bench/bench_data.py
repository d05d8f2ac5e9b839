"""Data-stage throughput: documents/s per core and peak memory of ours (filter + dedup [+ score]) vs datatrove.

A benchmark script, never a timed test. `python bench/bench_data.py` (or `make bench`):

1. Workload. The tiny corpus (ingested by `stages.ingest` into OUT/ingest, or --ingest-dir) replicated to --docs
   documents, written as shards of --shard-docs documents (a bigger corpus means more shards, never bigger ones).
   Replica 0 is the corpus itself; every later replica k of document j is, by a draw seeded with (seed, k, j):
     exact  (EXACT_FRAC)  the same text: an exact duplicate;
     near   (NEAR_FRAC)   adjacent words swapped at rate NEAR_SWAP_RATE plus one appended sentence naming k:
                          a near duplicate (word 5-gram Jaccard: median 0.78, lower for short documents);
     novel  (the rest)    adjacent words swapped at rate NOVEL_SWAP_RATE: the same words, lines and line ends (so
                          the heuristic rules see the same document) but Jaccard median 0.14: new to dedup.
   The last word of a line never moves, so line-ending rules judge every variant as they judge the original.
2. Ours: `python -m stages.filter`, `stages.dedup index`, `stages.dedup apply`, then `stages.quality_model` (one-off
   training, reported apart and left out of every ratio) and `stages.score`, each a subprocess, into fresh output
   directories (a current manifest would make a stage skip its shard). --workers 1 runs each stage once over all
   shards (what DVC runs); --workers W > 1 runs W `--shard` processes at a time (what Snakemake -jW runs).
3. Baseline: datatrove in its own venv (bench/.venv-datatrove, created on first use from
   bench/requirements-datatrove.txt: datatrove pins packages our .venv must not take), running
   bench/datatrove_pipeline.py over the same shards with the same workers: reader -> the datatrove filters that
   implement our rules, with our thresholds -> writer -> MinHash signatures -> buckets -> clusters -> dedup filter.
   --datatrove-tokenizer whitespace (default) gives datatrove our word split, so both sides keep the same documents
   (the equivalent pipeline); `spacy` is datatrove's stock tokenizer: slower, and it drops far more documents.
4. Per side and stage: wall time, CPU seconds and peak RSS from os.wait4 (the command and the descendants it waited
   for; peak RSS is per process, not summed over workers, and includes the ~8 MB launcher it is spawned from),
   documents/s and documents per CPU-second (per core). Ours also runs at --memory-docs to show its peak RSS does
   not grow with the corpus.
5. Ratios, ours / datatrove in documents per CPU-second of filter+dedup, three ways (LANGID_MODES): rules only (no
   language id on either side), rules + the same language id (our vectorized langid.py as a datatrove step too: the
   headline, like for like), and the full pipeline as run today (datatrove with stock langid.py, a Python step per
   byte). Each run repeats --repeats times, interleaved with the others (the order rotates each round); the
   medians are reported, since the machine is shared and noisy.

Both sides run with one BLAS/OpenMP thread per process and the hub offline.
Writes bench/out/bench_data.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages import common  # noqa: E402  (the repo root is put on the path just above)

BENCH = REPO / "bench"
DATATROVE_REQUIREMENTS = BENCH / "requirements-datatrove.txt"
DATATROVE_SCRIPT = BENCH / "datatrove_pipeline.py"
DOC_COLUMNS = ("id", "source", "domain", "text", "n_chars", "approx_tokens")

EXACT_FRAC = 0.15
NEAR_FRAC = 0.35
NEAR_SWAP_RATE = 0.01
NOVEL_SWAP_RATE = 0.3
APPENDED_SENTENCE = "This closing sentence was appended to copy {k} of the document for the deduplication benchmark."

# One thread per process on both sides, so CPU-seconds measure one core's work; no hub, ever.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1",
             "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "PYTHONHASHSEED": "0"}


# ----------------------------------------------------------------------------- workload

def swap_adjacent_words(text: str, rate: float, rng: random.Random) -> str:
    """Swap word i with word i+1 with probability `rate` (then skip i+1), within each line, never the last word."""
    lines = text.split("\n")
    for li, line in enumerate(lines):
        words = line.split(" ")
        i = 0
        while i < len(words) - 2:
            if words[i] and words[i + 1] and rng.random() < rate:
                words[i], words[i + 1] = words[i + 1], words[i]
                i += 2
            else:
                i += 1
        lines[li] = " ".join(words)
    return "\n".join(lines)


def replica_text(text: str, k: int, j: int, seed: int) -> tuple[str, str]:
    """(text, variant) of replica k of base document j; variant is original | exact | near | novel."""
    if k == 0:
        return text, "original"
    rng = random.Random(f"{seed}:{k}:{j}")
    u = rng.random()
    if u < EXACT_FRAC:
        return text, "exact"
    if u < EXACT_FRAC + NEAR_FRAC:
        return swap_adjacent_words(text, NEAR_SWAP_RATE, rng) + "\n" + APPENDED_SENTENCE.format(k=k), "near"
    return swap_adjacent_words(text, NOVEL_SWAP_RATE, rng), "novel"


def read_base_corpus(ingest_dir: str | Path) -> list[dict]:
    """Every document of the ingest shards (the tiny corpus: a few MB), in shard order."""
    docs = []
    for shard in common.list_shards(ingest_dir):
        path = Path(ingest_dir) / f"{shard}.parquet"
        for batch in common.iter_record_batches(path, columns=["source", "domain", "text"]):
            docs += batch.to_pylist()
    if not docs:
        raise common.StageError(f"{ingest_dir}: the ingest shards hold no documents")
    return docs


def build_workload(ingest_dir: str | Path, out_dir: str | Path, n_docs: int, shard_docs: int, seed: int) -> dict:
    """Write n_docs documents (the ingest schema) as ceil(n_docs / shard_docs) shards `part-NNNNN.parquet` in
    out_dir, replica-major (replica 0 = all base documents, then replica 1, ...), so duplicates span shards.
    Streams shard by shard; returns the summary (counts per variant, bytes of text)."""
    base = read_base_corpus(ingest_dir)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()), ("text", pa.string()),
                        ("n_chars", pa.int64()), ("approx_tokens", pa.int64())])
    variants = {"original": 0, "exact": 0, "near": 0, "novel": 0}
    text_bytes = 0
    n_shards = math.ceil(n_docs / shard_docs)
    for s in range(n_shards):
        lo, hi = s * shard_docs, min(n_docs, (s + 1) * shard_docs)
        with common.table_writer(out_dir / f"part-{s:05d}.parquet", schema) as append:
            for start in range(lo, hi, common.ROW_GROUP_ROWS):
                rows = []
                for i in range(start, min(hi, start + common.ROW_GROUP_ROWS)):
                    k, j = divmod(i, len(base))
                    text, variant = replica_text(base[j]["text"], k, j, seed)
                    variants[variant] += 1
                    size = len(text.encode("utf-8"))
                    text_bytes += size
                    rows.append({"id": common.content_id(text), "source": base[j]["source"],
                                 "domain": base[j]["domain"], "text": text, "n_chars": len(text),
                                 "approx_tokens": -(-size // 4)})
                append(common.rows_to_table(rows, schema))
    return {"docs": n_docs, "shards": n_shards, "shard_docs": shard_docs, "base_docs": len(base),
            "replicas": round(n_docs / len(base), 2), "variants": variants, "text_mb": round(text_bytes / 2**20, 1),
            "seed": seed}


# ----------------------------------------------------------------------------- measuring a child process

@dataclass
class Measure:
    wall_s: float
    cpu_s: float
    peak_rss_mb: float


# A small launcher spawns each command and reports its rusage: a child forked from this (large) process would count
# our own resident pages in its peak RSS (Linux keeps the pre-exec high-water mark in ru_maxrss).
LAUNCHER = ("import os, sys\n"
            "pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)\n"
            "_, status, ru = os.wait4(pid, 0)\n"
            "open(sys.argv[1], 'w').write(f'{ru.ru_utime + ru.ru_stime} {ru.ru_maxrss}')\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_measured(cmd: list[str], log: Path) -> Measure:
    """Run `cmd`, output to `log`; wall time, CPU (user + sys) and peak RSS of the command and the descendants it
    waited for (os.wait4 in a minimal launcher, `python -S`). A failing command stops the benchmark with its log's
    tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    usage = log.with_name(f".{log.name}.rusage")
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        fh.write(("$ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        rc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(usage), *cmd], stdout=fh,
                            stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **CHILD_ENV}).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"bench: command failed ({rc}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    cpu, maxrss_kb = usage.read_text(encoding="utf-8").split()
    usage.unlink()
    return Measure(wall, float(cpu), int(maxrss_kb) / 1024)


def run_per_shard(cmd: list[str], shards: list[str], workers: int, log_dir: Path) -> Measure:
    """One process per shard (`cmd + --shard S`), `workers` at a time: wall of the whole set, CPU summed, RSS max."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(lambda s: run_measured(cmd + ["--shard", s], log_dir / f"{s}.log"), shards))
    return Measure(time.perf_counter() - t0, sum(m.cpu_s for m in parts), max(m.peak_rss_mb for m in parts))


# ----------------------------------------------------------------------------- ours

def run_ours(workload: Path, work: Path, params_file: Path, workers: int, seed_file: Path,
             model_dir: Path | None, score: bool = True) -> dict:
    """filter -> dedup index -> dedup apply [-> quality_model -> score] into fresh dirs under `work`.

    With `score`, quality_model trains only when `model_dir` is None (then into work/quality_model); its measure is
    kept apart."""
    if work.exists():
        shutil.rmtree(work)
    py, par = sys.executable, ["--params", str(params_file)]
    shards = common.list_shards(workload)
    f, idx, dd, qm, sc = (work / n for n in ("filter", "dedup_index", "dedup", "quality_model", "score"))

    def sharded(name: str, cmd: list[str]) -> Measure:
        if workers == 1:
            return run_measured(cmd, work / "logs" / f"{name}.log")
        return run_per_shard(cmd, shards, workers, work / "logs" / name)

    steps = {
        "filter": sharded("filter", [py, "-m", "stages.filter", *par, "--input-dir", str(workload),
                                     "--output-dir", str(f)]),
        "dedup_index": run_measured([py, "-m", "stages.dedup", "index", *par, "--sigs-dir", str(f / "sigs"),
                                     "--output-dir", str(idx)], work / "logs" / "dedup_index.log"),
        "dedup_apply": sharded("dedup_apply", [py, "-m", "stages.dedup", "apply", *par, "--input-dir", str(f / "kept"),
                                               "--index", str(idx / "duplicates.parquet"), "--output-dir", str(dd)]),
    }
    one_off = {}
    counts = {"kept_after_filters": rows_in(f / "kept"), "kept_after_dedup": rows_in(dd / "kept")}
    if not score:
        return {"steps": {k: asdict(v) for k, v in steps.items()}, "one_off": {}, "counts": counts}
    if model_dir is None:
        model_dir = qm
        one_off["quality_model"] = run_measured(
            [py, "-m", "stages.quality_model", *par, "--seed-file", str(seed_file), "--corpus-dir", str(dd / "kept"),
             "--output-dir", str(qm)], work / "logs" / "quality_model.log")
    steps["score"] = sharded("score", [py, "-m", "stages.score", *par, "--input-dir", str(dd / "kept"),
                                       "--model-dir", str(model_dir), "--output-dir", str(sc)])
    counts["scored"] = rows_in(sc)
    return {"steps": {k: asdict(v) for k, v in steps.items()}, "one_off": {k: asdict(v) for k, v in one_off.items()},
            "counts": counts, "model_dir": str(model_dir)}


def rows_in(directory: Path) -> int:
    return sum(common.count_rows(directory / f"{s}.parquet") for s in common.list_shards(directory))


# ----------------------------------------------------------------------------- datatrove

def ensure_datatrove_venv(venv: Path) -> Path:
    """The baseline's python: venv/bin/python, created and installed from requirements-datatrove.txt when missing."""
    python = venv / "bin" / "python"
    if python.is_file() and subprocess.run([str(python), "-c", "import datatrove, spacy, langid, pyarrow, scipy"],
                                           capture_output=True).returncode == 0:
        return python
    base = getattr(sys, "_base_executable", sys.executable)
    print(f"bench: creating {venv} (datatrove baseline; PyPI only)", file=sys.stderr)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(DATATROVE_REQUIREMENTS)], check=True)
    return python


def package_version(python: Path, name: str) -> str:
    out = subprocess.run([str(python), "-c", f"from importlib.metadata import version; print(version({name!r}))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


# Our rules -> the datatrove filter that implements them (binary_garbage has none).
DATATROVE_FILTER_OF_RULE = {
    "word_count": "GopherQualityFilter", "mean_word_length": "GopherQualityFilter",
    "hash_ratio": "GopherQualityFilter", "ellipsis_ratio": "GopherQualityFilter", "bullet_lines": "GopherQualityFilter",
    "ellipsis_lines": "GopherQualityFilter", "alpha_words": "GopherQualityFilter", "stop_words": "GopherQualityFilter",
    "lorem_ipsum": "C4QualityFilter", "curly_braces": "C4QualityFilter", "boilerplate": "C4QualityFilter",
    "line_punctuation": "FineWebQualityFilter", "short_lines": "FineWebQualityFilter",
    "duplicate_paragraphs": "GopherRepetitionFilter", "duplicate_paragraph_chars": "GopherRepetitionFilter",
    "duplicate_lines": "GopherRepetitionFilter", "duplicate_line_chars": "GopherRepetitionFilter",
    "top_ngram": "GopherRepetitionFilter", "duplicate_ngram": "GopherRepetitionFilter",
    "language": "langid",
}
# The three ways the filter+dedup ratio is reported: mode -> (ours runs language id, datatrove's language-id step).
LANGID_MODES = {
    "rules only": (False, None),
    "rules + same langid": (True, "vectorized_langid"),
    "full pipeline": (True, "langid"),
}
HEADLINE_MODE = "rules + same langid"
HEADLINE_WHY = ("like for like: both sides run the same rules with the same thresholds and the same language-id "
                "code (our vectorized langid.py, batched, as a datatrove step), so the ratio measures the pipelines, "
                "not one classifier swap; 'full pipeline' also credits ours' vectorized langid against stock "
                "langid.py (a Python step per byte), 'rules only' leaves language id out on both sides")


def datatrove_filter_kwargs(name: str, fp: dict) -> dict:
    """Our `filter` thresholds in the datatrove filter's arguments; checks ours has no counterpart to are turned off
    (None / -1) where datatrove allows it, else set so they never fire (they still run: noted in the output)."""
    if name == "GopherQualityFilter":
        return {"min_doc_words": fp["min_words"], "max_doc_words": fp["max_words"],
                "min_avg_word_length": fp["min_mean_word_length"], "max_avg_word_length": fp["max_mean_word_length"],
                # datatrove has one threshold for its two symbol ratios (hash, ellipsis); ours has one each
                "max_symbol_word_ratio": fp["max_hash_word_ratio"],
                "max_bullet_lines_ratio": fp["max_bullet_lines_frac"],
                "max_ellipsis_lines_ratio": fp["max_ellipsis_lines_frac"],
                "max_non_alpha_words_ratio": fp["min_alpha_words_frac"], "min_stop_words": fp["min_stop_words"],
                "stop_words": list(fp["stop_words"])}
    if name == "C4QualityFilter":
        return {"split_paragraph": True, "remove_citations": False, "filter_no_terminal_punct": False,
                "min_num_sentences": -1, "min_words_per_line": -1, "max_word_length": -1, "filter_lorem_ipsum": True,
                "filter_javascript": True, "filter_curly_bracket": True, "filter_policy": True}
    if name == "FineWebQualityFilter":
        return {"line_punct_thr": fp["min_line_punctuation_frac"], "stop_chars": list(fp["terminal_punctuation"]),
                "short_line_length": fp["short_line_chars"], "short_line_thr": fp["max_short_lines_frac"],
                "char_duplicates_ratio": 1.0, "new_line_ratio": 1e9}
    if name == "GopherRepetitionFilter":
        return {"dup_para_frac": fp["max_dup_paragraphs_frac"], "dup_para_char_frac": fp["max_dup_paragraph_chars_frac"],
                "dup_line_frac": fp["max_dup_lines_frac"],
                "dup_line_char_frac": fp["max_dup_line_chars_frac"], "top_n_grams": fp["max_top_ngram_chars_frac"],
                "dup_n_grams": fp["max_dup_ngram_chars_frac"]}
    if name == "langid":
        return {"languages": list(fp["languages"]), "min_score": fp["lang_min_prob"], "max_chars": fp["lang_max_chars"]}
    raise ValueError(name)


def datatrove_filter_specs(fp: dict, langid_step: str | None = "langid") -> list[dict]:
    """The datatrove filters for our rules, in the order our rules first name them (language last, as ours, run by
    `langid_step`: "langid" (stock langid.py), "vectorized_langid" (ours), None (no language id)).

    A filter is skipped for a domain exempt from any rule it covers, so the baseline never does more per-domain
    work than ours (ours still runs that domain's other rules)."""
    rules = list(fp["rules"]) + (["language"] if fp["languages"] and langid_step else [])
    exempt = {d: set(r) for d, r in (fp.get("rules_exempt_by_domain") or {}).items()}
    specs: dict[str, dict] = {}
    for rule in rules:
        name = DATATROVE_FILTER_OF_RULE.get(rule)
        if name and name not in specs:
            covered = {r for r, n in DATATROVE_FILTER_OF_RULE.items() if n == name}
            specs[name] = {"name": langid_step if name == "langid" else name,
                           "kwargs": datatrove_filter_kwargs(name, fp),
                           "exempt_domains": sorted(d for d, rs in exempt.items() if rs & covered)}
    return list(specs.values())


def run_datatrove(python: Path, workload: Path, work: Path, workers: int, fp: dict, tokenizer: str,
                  langid_step: str | None) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    mp = fp["minhash"]
    cfg = {"input_dir": str(workload), "work_dir": str(work), "tasks": len(common.list_shards(workload)),
           "workers": workers, "tokenizer": tokenizer, "filters": datatrove_filter_specs(fp, langid_step),
           "minhash": {"n_grams": mp["ngram"], "num_buckets": mp["bands"], "hashes_per_bucket": mp["rows"],
                       "seed": fp["seed"], "precision": 64,
                       # ours normalizes case, punctuation and whitespace only: numbers and accents stay
                       "norm": {"norm_numbers": False, "norm_unicode_diacritics": False}}}
    (work / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    log = work / "datatrove.log"
    total = run_measured([str(python), str(DATATROVE_SCRIPT), str(work / "config.json")], log)
    result = json.loads(log.read_text(encoding="utf-8").strip().splitlines()[-1])
    return {"total": asdict(total), "phases": result["phases"], "counts": result["counts"], "config": cfg}


# ----------------------------------------------------------------------------- report

def summarize(docs: int, steps: dict[str, dict], names: list[str], workers: int) -> dict:
    wall = sum(steps[n]["wall_s"] for n in names)
    cpu = sum(steps[n]["cpu_s"] for n in names)
    return {"steps": names, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "docs_per_s": round(docs / wall, 1),
            "docs_per_s_per_worker": round(docs / wall / workers, 1), "docs_per_cpu_s": round(docs / cpu, 1),
            "peak_rss_mb": round(max(steps[n]["peak_rss_mb"] for n in names), 1)}


def print_table(report: dict) -> None:
    w = report["workload"]
    print(f"\nworkload: {w['docs']:,} docs ({w['base_docs']:,} base docs x {w['replicas']} replicas; variants "
          f"{w['variants']}), {w['shards']} shards of <= {w['shard_docs']:,} docs, {w['text_mb']} MB of text; "
          f"workers={report['workers']}")
    header = f"{'side':<44} {'wall s':>8} {'cpu s':>8} {'docs/s':>9} {'docs/cpu-s':>11} {'peak RSS MB':>12}"
    print(header + "\n" + "-" * len(header))
    for label, row in report["rows"].items():
        print(f"{label:<44} {row['wall_s']:>8.1f} {row['cpu_s']:>8.1f} {row['docs_per_s']:>9.1f} "
              f"{row['docs_per_cpu_s']:>11.1f} {row['peak_rss_mb']:>12.1f}")
    for line in report["notes"]:
        print(f"  * {line}")
    if "comparison" in report:
        print(f"\nfilter+dedup, median docs per cpu-s over interleaved rounds (language id: ours / datatrove)")
        for mode, c in report["comparison"].items():
            print(f"  {mode:<22} ours {c['ours_docs_per_cpu_s']:>8.1f}  datatrove {c['datatrove_docs_per_cpu_s']:>8.1f}"
                  f"  ratio {c['ratio_cpu']:.2f}x cpu, {c['ratio_wall']:.2f}x wall  "
                  f"({c['ours_language_id']} / {c['datatrove_language_id']})")
        h = report["headline"]
        print(f"headline ratio: {h['mode']}, {h['ratio_cpu']:.2f}x; why: {h['why']}")
    for name, r in report["ratios"].items():
        print(f"ratio {name}: {r:.2f}x")
    if "memory" in report:
        m = report["memory"]
        print(f"memory (ours, filter+dedup+score): peak RSS {m['small_peak_rss_mb']:.1f} MB at "
              f"{m['small_docs']:,} docs "
              f"-> {m['large_peak_rss_mb']:.1f} MB at {m['large_docs']:,} docs (x{m['growth']:.2f} for "
              f"x{m['large_docs'] / m['small_docs']:.1f} docs)")
    print(f"caveat: {report['caveat']}")
    print(f"target >= 3x datatrove (docs per CPU-second, filter+dedup, the headline like-for-like ratio): "
          f"{'MET' if report['target_met'] else 'NOT MET'}\nwritten: {report['json']}")


def params_without_langid(params_file: Path, out: Path) -> Path:
    """A copy of the params file with language id off (filter.languages: []), for the rules-only runs of ours."""
    raw = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    raw["filter"]["languages"] = []
    scale_filter = ((raw.get("scales") or {}).get(raw["scale"]) or {}).get("filter") or {}
    if "languages" in scale_filter:
        scale_filter["languages"] = []
    path = out / "params-no-langid.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def compare_with_datatrove(args, python: Path, workload: Path, out: Path, fp: dict) -> dict:
    """filter+dedup of ours and datatrove under each of LANGID_MODES, `args.repeats` rounds of every run, the order
    rotated each round (interleaved, so drift in a shared machine's load hits every run alike); per mode the median
    docs per cpu-s and per wall-s of each side and their ratio."""
    ours_params = {True: Path(args.params), False: params_without_langid(Path(args.params), out)}
    runs = [("ours", lang) for lang in sorted({lang for lang, _ in LANGID_MODES.values()})] + \
           [("datatrove", step) for _, step in LANGID_MODES.values()]
    samples: dict[tuple, list[dict]] = {run: [] for run in runs}
    counts: dict[tuple, dict] = {}
    for r in range(args.repeats):
        for side, key in runs[r % len(runs):] + runs[: r % len(runs)]:
            print(f"bench: round {r + 1}/{args.repeats}: {side} ({key})", file=sys.stderr)
            if side == "ours":
                result = run_ours(workload, out / "ours-compare", ours_params[key], args.workers,
                                  Path(args.seed_file), None, score=False)
                m = summarize(args.docs, result["steps"], ["filter", "dedup_index", "dedup_apply"], args.workers)
                m["cpu_s_by_step"] = {k: round(v["cpu_s"], 2) for k, v in result["steps"].items()}
            else:
                result = run_datatrove(python, workload, out / "datatrove", args.workers, fp,
                                       args.datatrove_tokenizer, key)
                m = summarize(args.docs, {"datatrove": result["total"]}, ["datatrove"], args.workers)
                m["cpu_s_by_step"] = {k: round(v["cpu_s"], 2) for k, v in result["phases"].items()}
            samples[(side, key)].append(m)
            counts[(side, key)] = result["counts"]

    def median(run: tuple, field: str) -> float:
        return statistics.median(m[field] for m in samples[run])

    comparison = {}
    for mode, (lang, step) in LANGID_MODES.items():
        ours, theirs = ("ours", lang), ("datatrove", step)
        comparison[mode] = {
            "ours_docs_per_cpu_s": median(ours, "docs_per_cpu_s"), "datatrove_docs_per_cpu_s": median(theirs, "docs_per_cpu_s"),
            "ratio_cpu": median(ours, "docs_per_cpu_s") / median(theirs, "docs_per_cpu_s"),
            "ratio_wall": median(ours, "docs_per_s") / median(theirs, "docs_per_s"),
            "ours_runs": samples[ours], "datatrove_runs": samples[theirs],
            "ours_counts": counts[ours], "datatrove_counts": counts[theirs],
            "ours_language_id": "vectorized langid" if lang else "off",
            "datatrove_language_id": {"langid": "stock langid.py", "vectorized_langid": "our vectorized langid",
                                      None: "off"}[step]}
    return comparison


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--ingest-dir", default=None,
                    help="ingest shards of the base corpus (default: stages.ingest of params' corpus into OUT/ingest)")
    ap.add_argument("--seed-file", default=str(REPO / "data" / "reference" / "seed.jsonl"))
    ap.add_argument("--docs", type=int, default=100_000, help="workload size (>= 100k for the issue's figure)")
    ap.add_argument("--memory-docs", type=int, default=50_000, help="second, smaller run of ours (0: skip)")
    ap.add_argument("--shard-docs", type=int, default=12_500, help="documents per workload shard")
    ap.add_argument("--workers", type=int, default=1, help="processes per side")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every filter+dedup run (medians reported)")
    ap.add_argument("--baseline", choices=["datatrove", "none"], default="datatrove")
    ap.add_argument("--datatrove-tokenizer", choices=["whitespace", "spacy"], default="whitespace",
                    help="whitespace: str.split words, as ours (the equivalent pipeline); spacy: datatrove's stock "
                         "English tokenizer (about 2.5x slower, and it drops far more documents)")
    ap.add_argument("--datatrove-venv", default=str(BENCH / ".venv-datatrove"))
    ap.add_argument("--out", default=str(BENCH / "out"))
    args = ap.parse_args(argv)

    params = common.load_params(args.params)
    fp = common.stage_params(params, "filter")
    seed = int(params.get("seed", 0))
    out = Path(args.out)
    if args.ingest_dir:
        ingest_dir = Path(args.ingest_dir)
    else:
        ingest_dir = out / "ingest"
        run_measured([sys.executable, "-m", "stages.ingest", "--params", args.params, "--output-dir", str(ingest_dir)],
                     out / "logs" / "ingest.log")

    workload = out / "workload"
    t0 = time.perf_counter()
    wl = build_workload(ingest_dir, workload, args.docs, args.shard_docs, seed)
    print(f"bench: workload of {wl['docs']:,} docs built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    ours = run_ours(workload, out / "ours", Path(args.params), args.workers, Path(args.seed_file), None)
    rows = {"ours: filter+dedup": summarize(args.docs, ours["steps"], ["filter", "dedup_index", "dedup_apply"],
                                            args.workers),
            "ours: filter+dedup+score": summarize(args.docs, ours["steps"],
                                                  ["filter", "dedup_index", "dedup_apply", "score"], args.workers)}
    qm = ours["one_off"]["quality_model"]
    notes = [f"ours quality_model training (one-off, in no ratio): {qm['wall_s']:.1f} s wall, {qm['cpu_s']:.1f} s cpu, "
             f"{qm['peak_rss_mb']:.0f} MB",
             f"ours kept {ours['counts']['kept_after_filters']:,} after filters, "
             f"{ours['counts']['kept_after_dedup']:,} after dedup"]
    report = {"workload": wl, "workers": args.workers, "params_filter": fp, "ours": ours, "rows": rows, "notes": notes,
              "ratios": {}, "target_met": False, "json": str(out / "bench_data.json"),
              "caveat": "measured on a shared machine: rerun on an idle one for the figures of record"}

    if args.baseline == "datatrove":
        python = ensure_datatrove_venv(Path(args.datatrove_venv))
        version = package_version(python, "datatrove")
        report["comparison"] = compare_with_datatrove(args, python, workload, out, fp)
        report["datatrove"] = {"version": version}
        notes += [f"baseline: datatrove {version} (spaCy {package_version(python, 'spacy')}, langid "
                  f"{package_version(python, 'langid')}), LocalPipelineExecutor: ParquetReader -> "
                  f"{', '.join(s['name'] for s in datatrove_filter_specs(fp))} -> ParquetWriter -> "
                  f"MinhashDedupSignature/Buckets/Cluster/Filter -> ParquetWriter; word tokenizer: "
                  f"{args.datatrove_tokenizer}",
                  "asymmetry: datatrove's LanguageFilter downloads a fastText model, so the baseline's language id "
                  "is langid.py (stock, or our vectorized classifier as a step); ours' binary_garbage rule and "
                  "exact-hash pass have no datatrove step; FineWebQualityFilter's char-dup and list ratios and "
                  "GopherQualityFilter's full word statistics still run (never firing); datatrove skips a filter "
                  "for any domain exempt from one of its rules; ours verifies LSH candidates by estimated Jaccard "
                  "(dedup.verify_min_jaccard), datatrove takes every band collision",
                  f"each side and mode ran {args.repeats} times, interleaved (the order rotates every round), on a "
                  f"shared machine: figures are medians of docs per cpu-s (and per wall-s) of filter+dedup"]
        for mode, c in report["comparison"].items():
            report["ratios"][f"{mode}: filter+dedup, ours / datatrove (docs per cpu-s, median)"] = c["ratio_cpu"]
            report["ratios"][f"{mode}: filter+dedup, ours / datatrove (docs per wall-s, median)"] = c["ratio_wall"]
            notes.append(f"{mode}: ours kept {c['ours_counts']['kept_after_filters']:,} after filters, "
                         f"{c['ours_counts']['kept_after_dedup']:,} after dedup; datatrove kept "
                         f"{c['datatrove_counts']['kept_after_filters']:,} / {c['datatrove_counts']['kept_after_dedup']:,}")
        report["headline"] = {"mode": HEADLINE_MODE, "why": HEADLINE_WHY,
                              "ratio_cpu": report["comparison"][HEADLINE_MODE]["ratio_cpu"]}
        report["target_met"] = report["headline"]["ratio_cpu"] >= 3.0

    if args.memory_docs:
        small_workload = out / "workload-memory"
        small = build_workload(ingest_dir, small_workload, args.memory_docs, args.shard_docs, seed)
        run = run_ours(small_workload, out / "ours-memory", Path(args.params), args.workers, Path(args.seed_file),
                       Path(ours["model_dir"]))
        shutil.rmtree(small_workload)
        label = f"ours at {args.memory_docs:,} docs: filter+dedup+score"
        rows[label] = summarize(args.memory_docs, run["steps"], ["filter", "dedup_index", "dedup_apply", "score"],
                                args.workers)
        large = rows["ours: filter+dedup+score"]["peak_rss_mb"]
        report["memory"] = {"small_docs": small["docs"], "small_peak_rss_mb": rows[label]["peak_rss_mb"],
                            "large_docs": args.docs, "large_peak_rss_mb": large,
                            "growth": large / rows[label]["peak_rss_mb"], "small_run": run}

    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "bench_data.json", report)
    print_table(report)


if __name__ == "__main__":
    main()
