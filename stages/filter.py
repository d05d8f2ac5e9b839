"""Hybrid filtering, part 1 (the stage driver): heuristic quality rules, language id, and MinHash signatures.

Per shard: ingest/<shard>.parquet -> filter/kept/<shard>.parquet, filter/rejected/<shard>.parquet (+ rule, detail),
filter/sigs/<shard>.parquet (one row per kept document) and filter/<shard>.manifest.json, written last.

The rules live in stages/filters/ (one module per family: Gopher quality and repetition, C4, FineWeb, language id,
MinHash), applied in the order of `filter.rules`; the first that fires is the recorded reason.
`filter.rules_exempt_by_domain` lists the rules a domain skips (code keeps its braces and symbols) and
`filter.thresholds_by_domain` loosens thresholds for a domain (worked math is short and half numbers).
Language id runs last, batched, only over documents that survived the cheap rules.
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import common
from stages.filters import Doc, RulePlan, Verdict, first_failing_rule
from stages.filters.langid import language_verdicts
from stages.filters.minhash import minhash_params, signature_table, sigs_schema

STAGE = "filter"
REQUIRED_COLUMNS = ("id", "domain", "text", "approx_tokens")


def code_version() -> str:
    """The source of this driver and everything of ours it imports (the filters package): what decides its outputs."""
    return common.code_version_closure(f"stages.{STAGE}")


def shard_paths(output_dir: str | Path, shard: str) -> dict[str, Path]:
    out = Path(output_dir)
    return {"kept": out / "kept" / f"{shard}.parquet", "rejected": out / "rejected" / f"{shard}.parquet",
            "sigs": out / "sigs" / f"{shard}.parquet", "manifest": out / f"{shard}.manifest.json"}


def _check_input(path: Path) -> pa.Schema:
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (OSError, pa.ArrowException) as exc:
        raise common.StageError(f"{path}: not a readable Parquet shard ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise common.StageError(f"{path}: missing columns {missing} (has {schema.names})")
    return schema


def filter_verdicts(texts: list, domains: list, p: dict, plan: RulePlan, path: Path, first_row: int) -> list[Verdict]:
    """One verdict per document: None (kept) or (rule, detail) from the first rule that fires, language last."""
    verdicts, ask_language = [], []
    for i, (text, domain) in enumerate(zip(texts, domains)):
        if text is None:
            raise common.StageError(f"{path}: row {first_row + i}: text is null")
        rules, runs_language, rule_params = plan.for_domain(domain)
        verdict = first_failing_rule(Doc(text), rules, rule_params)
        verdicts.append(verdict)
        if verdict is None and runs_language:
            ask_language.append(i)
    if ask_language:
        for i, verdict in zip(ask_language, language_verdicts([texts[i] for i in ask_language], p)):
            verdicts[i] = verdict
    return verdicts


def filter_shard(input_path: str | Path, output_dir: str | Path, shard: str, p: dict) -> dict:
    """Filter one ingest shard; returns its manifest. kept + rejected == input, checked."""
    from tqdm import tqdm
    input_path = Path(input_path)
    schema = _check_input(input_path)
    plan = RulePlan(p)
    mp = minhash_params(p)
    store_signature = bool(p["minhash"]["store_signature"])
    paths = shard_paths(output_dir, shard)
    rejected_schema = schema.append(pa.field("rule", pa.string())).append(pa.field("detail", pa.string()))
    rule_names = plan.names()
    docs = Counter({r: 0 for r in rule_names})
    tokens = Counter({r: 0 for r in rule_names})
    n_in = n_kept = tokens_in = tokens_kept = 0

    with contextlib.ExitStack() as stack:
        write_kept = stack.enter_context(common.table_writer(paths["kept"], schema))
        write_rejected = stack.enter_context(common.table_writer(paths["rejected"], rejected_schema))
        write_sigs = stack.enter_context(common.table_writer(paths["sigs"], sigs_schema(mp, store_signature)))
        bar = stack.enter_context(tqdm(total=common.count_rows(input_path), desc=f"filter {shard}", unit="doc",
                                       file=sys.stderr, disable=None, leave=False))
        for batch in common.iter_record_batches(input_path):
            texts = batch.column("text").to_pylist()
            verdicts = filter_verdicts(texts, batch.column("domain").to_pylist(), p, plan, input_path, n_in)
            keep = pa.array([v is None for v in verdicts])
            kept = batch.filter(keep)
            rejected = batch.filter(pc.invert(keep))
            fired = [v for v in verdicts if v is not None]
            rejected = pa.Table.from_batches([rejected]).append_column(
                "rule", pa.array([v[0] for v in fired], pa.string())).append_column(
                "detail", pa.array([v[1] for v in fired], pa.string()))
            write_kept(pa.Table.from_batches([kept], schema=schema))
            write_rejected(rejected)
            write_sigs(signature_table(kept, shard, n_kept, mp, store_signature))

            batch_tokens = batch.column("approx_tokens").to_pylist()
            for verdict, t in zip(verdicts, batch_tokens):
                if verdict is not None:
                    docs[verdict[0]] += 1
                    tokens[verdict[0]] += t
            n_in += len(batch)
            n_kept += len(kept)
            tokens_in += sum(batch_tokens)
            tokens_kept += pc.sum(kept.column("approx_tokens")).as_py() or 0
            bar.update(len(batch))

    common.check_conservation(STAGE, shard, n_in, kept=common.count_rows(paths["kept"]),
                              rejected=common.count_rows(paths["rejected"]))
    counts = {"in": n_in, "kept": n_kept, "rejected": dict(sorted(docs.items())),
              "approx_tokens_in": tokens_in, "approx_tokens_kept": tokens_kept,
              "approx_tokens_rejected": dict(sorted(tokens.items()))}
    return common.write_manifest(paths["manifest"], stage=STAGE, params=p, inputs=[input_path],
                                 outputs=[paths["kept"], paths["rejected"], paths["sigs"]], counts=counts,
                                 code=code_version(), extra={"minhash": mp})


def filter_shards(input_dir: str | Path, output_dir: str | Path, p: dict, shard: str | None = None) -> dict[str, str]:
    """Filter one shard (`shard`) or every shard of `input_dir` whose outputs are not current."""
    input_dir = Path(input_dir)
    shards = [shard] if shard else common.list_shards(input_dir)
    code = code_version()

    def process(name: str) -> None:
        path = common.input_shard(input_dir, name)
        filter_shard(path, output_dir, name, p)

    def is_done(name: str) -> bool:
        return shard is None and common.manifest_is_current(
            shard_paths(output_dir, name)["manifest"], p, [input_dir / f"{name}.parquet"], code)

    return common.run_sharded(shards, process, is_done, desc=STAGE)


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--input-dir", required=True, help="artifacts/<scale>/ingest")
    ap.add_argument("--output-dir", required=True, help="artifacts/<scale>/filter")
    ap.add_argument("--shard", default=None, help="one shard name (file stem); all shards when omitted")
    args = ap.parse_args()
    try:
        filter_shards(args.input_dir, args.output_dir, common.resolve_cli_params(args, STAGE), args.shard)
    except common.StageError as exc:
        common.fail(exc)


if __name__ == "__main__":
    main()
