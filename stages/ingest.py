"""Ingest: raw input units -> normalized document shards (NFC, control characters stripped, id = content hash).

One input unit -> one shard, named after the unit with its extensions stripped:
  *.jsonl, *.jsonl.gz      one record {"text", "domain"?, "source"?, ...} per line (blank lines are not records)
  *.parquet                one record per row (columns text, domain?, source?)
  *.txt, *.md, *.rst       the whole file is one document
  a directory              a Hugging Face `datasets` save_to_disk directory (dataset_info.json / state.json), or
                           else a text directory: every .txt/.md/.rst file under it, sorted, one document each
Outputs per shard, under --output-dir (artifacts/<scale>/ingest):
  <shard>.parquet             id, source, domain, text, n_chars, approx_tokens (= ceil(utf-8 bytes / 4))
  quarantine/<shard>.parquet  source, domain, text (a preview of at most 2000 chars), rule, detail ("file:line: why")
  <shard>.manifest.json       written last; counts records_in == kept + quarantined (checked)
Ingest only reads, normalizes and validates: exact duplicates stay (the dedup stage removes them).
"""
from __future__ import annotations

import contextlib
import gzip
import json
import re
import sys
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import common

STAGE = "ingest"
DOC_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                        ("text", pa.string()), ("n_chars", pa.int64()), ("approx_tokens", pa.int64())])
QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("domain", pa.string()), ("text", pa.string()),
                               ("rule", pa.string()), ("detail", pa.string())])
PREVIEW_CHARS = 2000
# JSON escaping makes a string at most 6x its UTF-8 bytes (a control byte becomes \u00XX), so a longer line cannot
# hold a document within max_doc_bytes; the envelope leaves room for the record's other fields.
JSON_ESCAPE_FACTOR = 6
RECORD_ENVELOPE_BYTES = 1 << 16
# Flush a row group early once this many characters are buffered, so a shard of big documents stays bounded.
BUFFER_CHARS = 64 << 20
TEXT_SUFFIXES = (".txt", ".md", ".rst")
FILE_UNIT_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet") + TEXT_SUFFIXES
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
NEWLINES = re.compile("\r\n?|[\x85\u2028\u2029]")
CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f]")


@dataclass(frozen=True)
class RawRecord:
    """One record as a reader found it: its fields, or the reader's own verdict (rule, detail) when unreadable."""
    where: str                    # "file:line", "file:row N" or "file": what a quarantine detail names
    fields: dict | None
    rule: str | None = None
    detail: str = ""
    preview: str = ""


# ----------------------------------------------------------------------------- input units

def unit_kind(path: Path) -> str:
    """jsonl | parquet | text_file | datasets | text_dir; StageError for anything else."""
    if path.is_dir():
        return "datasets" if any((path / m).is_file() for m in DATASETS_MARKERS) else "text_dir"
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text_file"
    raise common.StageError(f"{path}: unknown input type (expected *.jsonl, *.jsonl.gz, *.parquet, *.txt, *.md, "
                            f"*.rst, a text directory or a datasets directory)")


def shard_name(path: Path) -> str:
    """The unit's name with its known extension stripped: wiki.jsonl.gz -> wiki, news/ -> news."""
    name = path.name
    for suffix in FILE_UNIT_SUFFIXES:
        if path.is_file() and name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_units(input_dir: str | Path) -> dict[str, Path]:
    """{shard name: unit path} for every entry of `input_dir` (hidden entries skipped), sorted by name.

    Cheap (no unit is read): the Snakefile calls it to know the shards when it builds the DAG."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise common.StageError(f"{input_dir}: input directory does not exist")
    units: dict[str, Path] = {}
    for path in sorted(p for p in input_dir.iterdir() if not p.name.startswith(".")):
        unit_kind(path)
        name = shard_name(path)
        if name in units:
            raise common.StageError(f"{input_dir}: {units[name].name} and {path.name} both map to shard {name!r}")
        units[name] = path
    if not units:
        raise common.StageError(f"{input_dir}: input directory holds no input units")
    return dict(sorted(units.items()))


def text_dir_files(unit: Path) -> list[Path]:
    """The documents of a text directory: .txt/.md/.rst files at any depth, sorted by relative path."""
    files = []
    for path in sorted(unit.rglob("*"), key=lambda q: q.relative_to(unit).as_posix()):
        rel = path.relative_to(unit)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        if not path.name.lower().endswith(TEXT_SUFFIXES):
            raise common.StageError(f"{path}: unknown file type in text directory {unit} (expected .txt, .md, .rst)")
        files.append(path)
    return files


def unit_files(unit: Path) -> list[Path]:
    """Every file a unit is made of: what its manifest hashes, so any change to them redoes the shard."""
    if unit.is_file():
        return [unit]
    if unit_kind(unit) == "text_dir":
        return text_dir_files(unit)
    return sorted((p for p in unit.rglob("*") if p.is_file() and not p.name.startswith(".")),
                  key=lambda q: q.relative_to(unit).as_posix())


# ----------------------------------------------------------------------------- readers

def _preview_bytes(raw: bytes) -> str:
    return raw[: PREVIEW_CHARS * 4].decode("utf-8", errors="replace")


def read_jsonl(path: Path, p: dict) -> Iterator[RawRecord]:
    """Records of a JSON-lines file (gzip'd or not), line by line; a line too long to hold an admissible
    document is skipped in 1 MiB chunks, never held whole."""
    cap = int(p["max_doc_bytes"]) * JSON_ESCAPE_FACTOR + RECORD_ENVELOPE_BYTES
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as fh:
            while line := fh.readline(cap + 1):
                lineno += 1
                if lineno == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM opens the file, not a record (utf-8-sig)
                where = f"{path}:{lineno}"
                if len(line) > cap and not line.endswith(b"\n"):
                    total, head = len(line), line[: PREVIEW_CHARS * 4]
                    del line
                    while chunk := fh.readline(1 << 20):
                        total += len(chunk)
                        if chunk.endswith(b"\n"):
                            break
                    yield RawRecord(where, None, "too_large",
                                    f"line of {total} bytes cannot hold a document within max_doc_bytes="
                                    f"{p['max_doc_bytes']} (limit {cap} bytes)", _preview_bytes(head))
                    continue
                if not line.strip():
                    continue
                try:
                    line_text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield RawRecord(where, None, "invalid_utf8", f"invalid UTF-8 at byte {exc.start}",
                                    _preview_bytes(line))
                    continue
                try:
                    obj = json.loads(line_text.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    yield RawRecord(where, None, "invalid_json", f"invalid JSON, column {exc.colno}: {exc.msg}",
                                    line_text[:PREVIEW_CHARS])
                    continue
                if not isinstance(obj, dict):
                    yield RawRecord(where, None, "not_an_object", f"a JSON {type(obj).__name__} is not a record",
                                    line_text[:PREVIEW_CHARS])
                    continue
                yield RawRecord(where, obj)
    except (OSError, EOFError, zlib.error) as exc:
        raise common.StageError(f"{path}:{lineno + 1}: unreadable ({exc})") from None


def arrow_records(batch: pa.RecordBatch | pa.Table, where: str, first_row: int, p: dict) -> Iterator[RawRecord]:
    """Records of one Arrow batch. Oversized texts are measured and previewed in Arrow, never copied to Python."""
    names = batch.schema.names
    n = batch.num_rows
    text = batch.column("text") if "text" in names else None
    too_large: dict[int, tuple[int, str]] = {}
    if text is not None and (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        lengths = pc.binary_length(text).to_pylist()
        over = [size is not None and size > int(p["max_doc_bytes"]) for size in lengths]
        if any(over):
            mask = pa.array(over)
            previews = pc.utf8_slice_codeunits(pc.filter(text, mask), 0, PREVIEW_CHARS).to_pylist()
            too_large = {i: (lengths[i], preview) for i, preview in zip((i for i in range(n) if over[i]), previews)}
            text = pc.if_else(mask, pa.scalar(None, text.type), text)
    columns = {name: batch.column(name).to_pylist() for name in ("domain", "source") if name in names}
    if text is not None:
        columns["text"] = text.to_pylist()
    for i in range(n):
        loc = f"{where}:row {first_row + i}"
        if i in too_large:
            size, preview = too_large[i]
            yield RawRecord(loc, None, "too_large", f"document of {size} bytes exceeds max_doc_bytes="
                            f"{p['max_doc_bytes']}", preview)
        else:
            yield RawRecord(loc, {k: v[i] for k, v in columns.items()})


def read_parquet(path: Path, p: dict) -> Iterator[RawRecord]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise common.StageError(f"{path}: not a readable Parquet file ({exc})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=common.ROW_GROUP_ROWS):
        yield from arrow_records(batch, str(path), row, p)
        row += batch.num_rows


def read_datasets(path: Path, p: dict) -> Iterator[RawRecord]:
    """Rows of a `datasets` save_to_disk directory (memory-mapped Arrow); a DatasetDict's splits in name order."""
    import datasets
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises a zoo of types for a broken directory; all mean the same here
        raise common.StageError(f"{path}: not a loadable datasets directory ({type(exc).__name__}: {exc})") from None
    splits = [(str(path), loaded)] if isinstance(loaded, datasets.Dataset) else \
        [(f"{path}[{name}]", loaded[name]) for name in sorted(loaded)]
    for where, ds in splits:
        row = 0
        for table in ds.with_format("arrow").iter(batch_size=common.ROW_GROUP_ROWS):
            yield from arrow_records(table, where, row, p)
            row += table.num_rows


def read_text_file(path: Path, p: dict) -> RawRecord:
    """A whole file as one document; one larger than max_doc_bytes is only previewed, never read whole."""
    size = path.stat().st_size
    if size > int(p["max_doc_bytes"]):
        with open(path, "rb") as fh:
            head = fh.read(PREVIEW_CHARS * 4)
        return RawRecord(str(path), None, "too_large",
                         f"document of {size} bytes exceeds max_doc_bytes={p['max_doc_bytes']}", _preview_bytes(head))
    raw = path.read_bytes()
    try:
        return RawRecord(str(path), {"text": raw.decode("utf-8")})
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return RawRecord(f"{path}:{line}", None, "invalid_utf8", f"invalid UTF-8 at byte {exc.start}",
                         _preview_bytes(raw))


def read_unit(unit: Path, p: dict) -> Iterator[RawRecord]:
    kind = unit_kind(unit)
    if kind == "jsonl":
        yield from read_jsonl(unit, p)
    elif kind == "parquet":
        yield from read_parquet(unit, p)
    elif kind == "datasets":
        yield from read_datasets(unit, p)
    elif kind == "text_file":
        yield read_text_file(unit, p)
    else:
        for path in text_dir_files(unit):
            yield read_text_file(path, p)


# ----------------------------------------------------------------------------- normalize and validate

def normalize_text(text: str) -> str:
    """NFC; newlines (\\r\\n, \\r, NEL, U+2028, U+2029) -> \\n; C0/C1 control characters other than \\n and \\t
    (NUL included) removed; a leading byte-order mark dropped."""
    text = CONTROL_CHARS.sub("", NEWLINES.sub("\n", text)).removeprefix("\ufeff")
    return unicodedata.normalize("NFC", text)


def _clean_preview(text: str) -> str:
    """A quarantine preview: normalized like a document, at most PREVIEW_CHARS, always encodable."""
    return normalize_text(text[: PREVIEW_CHARS * 2]).encode("utf-8", errors="replace").decode("utf-8")[:PREVIEW_CHARS]


def admit(rec: RawRecord, unit: str, p: dict) -> tuple[str, dict]:
    """('kept', document row) or ('quarantined', quarantine row) for one raw record.

    Rules: the reader's own (invalid_utf8, invalid_json, not_an_object, too_large), then missing_text,
    wrong_type (text, domain or source not a string), invalid_unicode (lone surrogates), too_large
    (utf-8 bytes > max_doc_bytes), empty (whitespace only), too_short (< min_doc_chars non-space chars)."""
    fields = rec.fields or {}
    default_domain = (p.get("unit_domains") or {}).get(unit, p["default_domain"])
    source = fields.get("source") if isinstance(fields.get("source"), str) and fields.get("source") else unit
    domain = fields.get("domain") if isinstance(fields.get("domain"), str) and fields.get("domain") else default_domain

    def quarantine(rule: str, detail: str, preview: str) -> tuple[str, dict]:
        return "quarantined", {"source": source, "domain": domain, "text": _clean_preview(preview), "rule": rule,
                               "detail": f"{rec.where}: {detail}"}

    if rec.rule:
        return quarantine(rec.rule, rec.detail, rec.preview)
    text = fields.get("text")
    if text is None:
        return quarantine("missing_text", "record has no 'text' field" if "text" not in fields else "'text' is null",
                          json.dumps(fields, ensure_ascii=False, default=str)[:PREVIEW_CHARS])
    for name in ("text", "domain", "source"):
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            return quarantine("wrong_type", f"field {name!r} is {type(value).__name__}, expected a string",
                              json.dumps(value, ensure_ascii=False, default=str)[:PREVIEW_CHARS])
    if len(text) > int(p["max_doc_bytes"]):
        return quarantine("too_large", f"document of at least {len(text)} bytes exceeds max_doc_bytes="
                          f"{p['max_doc_bytes']}", text[:PREVIEW_CHARS])
    text = normalize_text(text)
    try:
        n_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return quarantine("invalid_unicode", f"lone surrogate at character {exc.start}", text)
    if n_bytes > int(p["max_doc_bytes"]):
        return quarantine("too_large", f"document of {n_bytes} bytes exceeds max_doc_bytes={p['max_doc_bytes']}",
                          text)
    visible = len(text.strip())
    if visible == 0:
        return quarantine("empty", "document is empty or whitespace only", text)
    if visible < int(p["min_doc_chars"]):
        return quarantine("too_short", f"{visible} non-space characters < min_doc_chars={p['min_doc_chars']}", text)
    return "kept", {"id": common.content_id(text), "source": source, "domain": domain, "text": text,
                    "n_chars": len(text), "approx_tokens": (n_bytes + 3) // 4}


# ----------------------------------------------------------------------------- shards

def shard_paths(output_dir: str | Path, shard: str) -> dict[str, Path]:
    out = Path(output_dir)
    return {"docs": out / f"{shard}.parquet", "quarantine": out / "quarantine" / f"{shard}.parquet",
            "manifest": out / f"{shard}.manifest.json"}


@contextlib.contextmanager
def row_writer(path: Path, schema: pa.Schema) -> Iterator[Callable[[dict], None]]:
    """Append row dicts to a streamed Parquet shard, one row group per ROW_GROUP_ROWS rows (or BUFFER_CHARS)."""
    with common.table_writer(path, schema) as append:
        rows: list[dict] = []
        chars = 0

        def flush() -> None:
            nonlocal chars
            if rows:
                append(common.rows_to_table(rows, schema))
                rows.clear()
                chars = 0

        def write(row: dict) -> None:
            nonlocal chars
            rows.append(row)
            chars += len(row["text"])
            if len(rows) >= common.ROW_GROUP_ROWS or chars >= BUFFER_CHARS:
                flush()

        yield write
        flush()


def ingest_unit(unit: str | Path, output_dir: str | Path, shard: str, p: dict) -> dict:
    """Read, normalize and validate one input unit into its shard; returns the manifest written last."""
    from tqdm import tqdm
    unit = Path(unit)
    paths = shard_paths(output_dir, shard)
    by_rule: Counter = Counter()
    by_domain: Counter = Counter()
    n_in = kept_chars = kept_tokens = 0
    with row_writer(paths["docs"], DOC_SCHEMA) as write_doc, \
            row_writer(paths["quarantine"], QUARANTINE_SCHEMA) as write_quarantine:
        for rec in tqdm(read_unit(unit, p), desc=f"ingest {shard}", unit="doc", file=sys.stderr, disable=None,
                        leave=False):
            n_in += 1
            verdict, row = admit(rec, shard, p)
            if verdict == "kept":
                write_doc(row)
                by_domain[row["domain"]] += 1
                kept_chars += row["n_chars"]
                kept_tokens += row["approx_tokens"]
            else:
                write_quarantine(row)
                by_rule[row["rule"]] += 1
    n_kept, n_quarantined = common.count_rows(paths["docs"]), common.count_rows(paths["quarantine"])
    common.check_conservation(STAGE, shard, n_in, kept=n_kept, quarantined=n_quarantined)
    counts = {"records_in": n_in, "kept": n_kept, "quarantined": n_quarantined,
              "quarantined_by_rule": dict(sorted(by_rule.items())), "kept_by_domain": dict(sorted(by_domain.items())),
              "kept_chars": kept_chars, "kept_approx_tokens": kept_tokens}
    return common.write_manifest(paths["manifest"], stage=STAGE, params=p, inputs=unit_files(unit),
                                 outputs=[paths["docs"], paths["quarantine"]], counts=counts,
                                 code=common.code_version(f"stages.{STAGE}"))


def ingest_units(input_dir: str | Path, output_dir: str | Path, p: dict, shard: str | None = None) -> dict[str, str]:
    """Ingest one unit (`shard`, always redone: the scheduler decided) or every unit whose shard is not current."""
    units = list_units(input_dir)
    if shard is not None and shard not in units:
        raise common.StageError(f"{input_dir}: no input unit for shard {shard!r} (units: {', '.join(units)})")
    code = common.code_version(f"stages.{STAGE}")

    def is_done(name: str) -> bool:
        return shard is None and common.manifest_is_current(shard_paths(output_dir, name)["manifest"], p,
                                                            unit_files(units[name]), code)

    return common.run_sharded([shard] if shard else list(units),
                              lambda name: ingest_unit(units[name], output_dir, name, p), is_done, desc=STAGE)


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--input-dir", default=None, help="directory of input units (default: ingest.input_dir)")
    ap.add_argument("--output-dir", required=True, help="artifacts/<scale>/ingest")
    ap.add_argument("--shard", default=None, help="one shard (unit name without extension); all when omitted")
    args = ap.parse_args()
    try:
        p = common.resolve_cli_params(args, STAGE)
        ingest_units(args.input_dir or p["input_dir"], args.output_dir, p, args.shard)
    except common.StageError as exc:
        common.fail(exc)


if __name__ == "__main__":
    main()
