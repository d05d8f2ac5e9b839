"""ingest: every input format, the bad-input table, streaming of huge documents, determinism, resume, CLI."""
import gzip
import hashlib
import json
import math
import subprocess
import sys
import tracemalloc
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import common, ingest

REPO = common.REPO


def params(**override) -> dict:
    p = common.stage_params(common.load_params(), "ingest")
    p.update(override)
    return p


def write_lines(path, lines: list[bytes]) -> None:
    payload = b"\n".join(lines) + b"\n"
    if path.name.endswith(".gz"):
        with gzip.GzipFile(path, "wb", mtime=0) as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def jline(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def read_rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def run_one(unit, tmp_path, **override) -> tuple[list[dict], list[dict], dict]:
    """Ingest one unit; (kept rows, quarantined rows, manifest)."""
    out = tmp_path / "out"
    name = ingest.shard_name(unit)
    manifest = ingest.ingest_unit(unit, out, name, params(**override))
    paths = ingest.shard_paths(out, name)
    return read_rows(paths["docs"]), read_rows(paths["quarantine"]), manifest


# ----------------------------------------------------------------------------- units and readers

def make_all_formats(root):
    """One unit of every kind, two documents each."""
    import datasets
    root.mkdir(parents=True, exist_ok=True)
    write_lines(root / "plain.jsonl", [jline({"text": "plain one", "domain": "news"}), jline({"text": "plain two"})])
    write_lines(root / "zipped.jsonl.gz", [jline({"text": "zipped one", "source": "crawl-7"}),
                                           jline({"text": "zipped two", "domain": "code", "url": "http://x"})])
    pq.write_table(pa.table({"text": ["table one", "table two"], "domain": ["books", None]}), root / "table.parquet")
    (root / "single.txt").write_text("a single text file", encoding="utf-8")
    (root / "notes.md").write_text("# a markdown file", encoding="utf-8")
    (root / "docs" / "sub").mkdir(parents=True)
    (root / "docs" / "b.rst").write_text("second by path", encoding="utf-8")
    (root / "docs" / "sub" / "a.txt").write_text("third by path", encoding="utf-8")
    (root / "docs" / "a.md").write_text("first by path", encoding="utf-8")
    (root / "docs" / ".hidden.png").write_bytes(b"\x89PNG")
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": ["hf one", "hf two"], "domain": ["wiki", "wiki"]}).save_to_disk(
        str(root / "hf"))
    (root / ".DS_Store").write_bytes(b"\x00")


def test_list_units_maps_every_format_to_one_shard(tmp_path):
    make_all_formats(tmp_path / "in")
    units = ingest.list_units(tmp_path / "in")
    assert list(units) == ["docs", "hf", "notes", "plain", "single", "table", "zipped"]
    kinds = {name: ingest.unit_kind(path) for name, path in units.items()}
    assert kinds == {"docs": "text_dir", "hf": "datasets", "notes": "text_file", "plain": "jsonl",
                     "single": "text_file", "table": "parquet", "zipped": "jsonl"}


def test_readers_for_every_format(tmp_path):
    make_all_formats(tmp_path / "in")
    out = tmp_path / "out"
    p = params(unit_domains={"docs": "reference"})
    status = ingest.ingest_units(tmp_path / "in", out, p)
    assert set(status.values()) == {"done"} and len(status) == 7
    got = {name: read_rows(out / f"{name}.parquet") for name in status}
    assert [(r["text"], r["domain"], r["source"]) for r in got["plain"]] == [
        ("plain one", "news", "plain"), ("plain two", "web", "plain")]
    assert [(r["text"], r["domain"], r["source"]) for r in got["zipped"]] == [
        ("zipped one", "web", "crawl-7"), ("zipped two", "code", "zipped")]
    assert [(r["text"], r["domain"]) for r in got["table"]] == [("table one", "books"), ("table two", "web")]
    assert [r["text"] for r in got["single"]] == ["a single text file"]
    assert [r["text"] for r in got["notes"]] == ["# a markdown file"]
    assert [(r["text"], r["domain"]) for r in got["docs"]] == [
        ("first by path", "reference"), ("second by path", "reference"), ("third by path", "reference")]
    assert [(r["text"], r["domain"], r["source"]) for r in got["hf"]] == [("hf one", "wiki", "hf"), ("hf two", "wiki", "hf")]
    for rows in got.values():
        for r in rows:
            assert r["id"] == common.content_id(r["text"])
            assert r["n_chars"] == len(r["text"])
            assert r["approx_tokens"] == math.ceil(len(r["text"].encode("utf-8")) / 4)
    assert pq.read_schema(out / "hf.parquet").remove_metadata().equals(ingest.DOC_SCHEMA)
    assert pq.read_schema(out / "quarantine" / "hf.parquet").remove_metadata().equals(ingest.QUARANTINE_SCHEMA)


def test_datasets_dict_splits_are_read_in_name_order(tmp_path):
    import datasets
    datasets.disable_progress_bars()
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
                               "test": datasets.Dataset.from_dict({"text": ["e1"]})})
    dd.save_to_disk(str(tmp_path / "hf"))
    kept, _, _ = run_one(tmp_path / "hf", tmp_path)
    assert [r["text"] for r in kept] == ["e1", "t1", "t2"]


def test_normalization_nfc_newlines_control_characters():
    raw = "\ufeffCafe\u0301\r\nline\rtwo\u2028three\x85four\x00 nul\x07 bell\tand tab\x0c\x9b"
    assert ingest.normalize_text(raw) == "Café\nline\ntwo\nthree\nfour nul bell\tand tab"
    assert unicodedata.is_normalized("NFC", ingest.normalize_text("e\u0301" * 3))


def test_normalized_text_is_what_is_hashed(tmp_path):
    unit = tmp_path / "u.jsonl"
    write_lines(unit, [jline({"text": "Cafe\u0301\r\n"}), jline({"text": "Café\n"})])
    kept, _, _ = run_one(unit, tmp_path)
    assert [r["text"] for r in kept] == ["Café\n", "Café\n"]
    assert kept[0]["id"] == kept[1]["id"] == common.content_id("Café\n")  # duplicates stay: dedup's job


# ----------------------------------------------------------------------------- bad input

BAD_JSONL = [
    # (bad line, rule, detail fragment)
    (b'{"text": "caf\xe9 au lait"}', "invalid_utf8", "invalid UTF-8 at byte 13"),
    (b'{"text": "a crawler cut this record off in the mid', "invalid_json", "invalid JSON"),
    (b'{"text": ""}', "empty", "empty or whitespace only"),
    (b'{"text": " \\n\\t "}', "empty", "empty or whitespace only"),
    (b'{"body": "no text field"}', "missing_text", "no 'text' field"),
    (b'{"text": null}', "missing_text", "'text' is null"),
    (b'{"text": 12345}', "wrong_type", "field 'text' is int"),
    (b'{"text": ["a", "list"]}', "wrong_type", "field 'text' is list"),
    (b'{"text": "fine", "domain": 7}', "wrong_type", "field 'domain' is int"),
    (b'["not", "a", "record"]', "not_an_object", "a JSON list is not a record"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_unicode", "lone surrogate"),
]


@pytest.mark.parametrize("bad, rule, fragment", BAD_JSONL, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(BAD_JSONL)])
def test_bad_jsonl_record_is_quarantined_with_file_and_line(tmp_path, bad, rule, fragment):
    unit = tmp_path / "x.jsonl.gz"
    write_lines(unit, [jline({"text": "good one"}), b"", bad, jline({"text": "good two"})])
    kept, quarantined, manifest = run_one(unit, tmp_path)
    assert [r["text"] for r in kept] == ["good one", "good two"]
    assert len(quarantined) == 1
    q = quarantined[0]
    assert q["rule"] == rule
    assert q["detail"].startswith(f"{unit}:3: ") and fragment in q["detail"]
    assert len(q["text"]) <= ingest.PREVIEW_CHARS
    assert manifest["counts"]["records_in"] == 3 and manifest["counts"]["quarantined_by_rule"] == {rule: 1}


def test_truncated_last_line_is_quarantined(tmp_path):
    unit = tmp_path / "cut.jsonl"
    unit.write_bytes(jline({"text": "whole"}) + b"\n" + b'{"text": "the file ends in the mid')
    kept, quarantined, _ = run_one(unit, tmp_path)
    assert [r["text"] for r in kept] == ["whole"]
    assert quarantined[0]["rule"] == "invalid_json"
    assert quarantined[0]["detail"].startswith(f"{unit}:2: invalid JSON") and "Unterminated string" in quarantined[0]["detail"]


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.jsonl.gz"])
def test_utf8_bom_opening_a_jsonl_file_is_not_part_of_the_first_record(tmp_path, name):
    """Editors on Windows write a UTF-8 byte-order mark; common.iter_jsonl (utf-8-sig) reads past it."""
    unit = tmp_path / name
    write_lines(unit, [b"\xef\xbb\xbf" + jline({"text": "first"}), jline({"text": "second \ufeff inside"})])
    assert [r["text"] for _, r in common.iter_jsonl(unit, text_field="text")] == ["first", "second \ufeff inside"]


def test_utf8_bom_opening_a_jsonl_unit_is_ingested_not_quarantined(tmp_path):
    unit = tmp_path / "bom.jsonl"
    write_lines(unit, [b"\xef\xbb\xbf" + jline({"text": "first"}), jline({"text": "second"})])
    kept, quarantined, _ = run_one(unit, tmp_path)
    assert [r["text"] for r in kept] == ["first", "second"] and quarantined == []


def test_bad_parquet_rows_are_quarantined_with_row_numbers(tmp_path):
    pq.write_table(pa.table({"text": ["ok", None, "   "], "domain": ["web", "web", "web"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": [["x"], ["y", "z"]]}), tmp_path / "c.parquet")
    pq.write_table(pa.table({"body": ["no text column"]}), tmp_path / "d.parquet")
    kept, quarantined, _ = run_one(tmp_path / "a.parquet", tmp_path)
    assert [r["text"] for r in kept] == ["ok"]
    assert [(q["rule"], q["detail"]) for q in quarantined] == [
        ("missing_text", f"{tmp_path / 'a.parquet'}:row 1: 'text' is null"),
        ("empty", f"{tmp_path / 'a.parquet'}:row 2: document is empty or whitespace only")]
    for name, rule, fragment in (("b", "wrong_type", "'text' is int"), ("c", "wrong_type", "'text' is list"),
                                 ("d", "missing_text", "no 'text' field")):
        kept, quarantined, _ = run_one(tmp_path / f"{name}.parquet", tmp_path / name)
        assert kept == [] and {q["rule"] for q in quarantined} == {rule}
        assert quarantined[0]["detail"] == f"{tmp_path / (name + '.parquet')}:row 0: " + \
            {"b": "field 'text' is int, expected a string", "c": "field 'text' is list, expected a string",
             "d": "record has no 'text' field"}[name]
        assert fragment in quarantined[-1]["detail"]


def test_text_dir_invalid_utf8_names_file_and_line(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(b"line one\nline two has caf\xe9\n")
    (tmp_path / "docs" / "b.txt").write_text("fine", encoding="utf-8")
    kept, quarantined, _ = run_one(tmp_path / "docs", tmp_path)
    assert [r["text"] for r in kept] == ["fine"]
    assert quarantined[0]["rule"] == "invalid_utf8"
    assert quarantined[0]["detail"] == f"{tmp_path / 'docs' / 'a.txt'}:2: invalid UTF-8 at byte 25"


def test_documents_over_max_doc_bytes_are_quarantined_in_every_reader(tmp_path):
    import datasets
    datasets.disable_progress_bars()
    big = "x" * 1500
    write_lines(tmp_path / "j.jsonl", [jline({"text": big}), jline({"text": "small"})])
    pq.write_table(pa.table({"text": [big, "small"]}), tmp_path / "t.parquet")
    datasets.Dataset.from_dict({"text": [big, "small"]}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "f.txt").write_text(big, encoding="utf-8")
    for name in ("j.jsonl", "t.parquet", "hf", "f.txt"):
        kept, quarantined, _ = run_one(tmp_path / name, tmp_path / name.replace(".", "_"), max_doc_bytes=1000)
        assert [r["text"] for r in kept] == ([] if name == "f.txt" else ["small"])
        assert [q["rule"] for q in quarantined] == ["too_large"]
        assert "1500 bytes exceeds max_doc_bytes=1000" in quarantined[0]["detail"]


def test_fifty_megabyte_document_is_quarantined_without_reading_it_whole(tmp_path):
    """A 50 MB document in each reader: quarantined as too_large, and Python never holds it (peak << 50 MB)."""
    size = 50 * 1024 * 1024
    body = b"a" * size
    (tmp_path / "big.jsonl").write_bytes(b'{"text": "' + body + b'"}\n' + jline({"text": "after"}) + b"\n")
    pq.write_table(pa.table({"text": [body.decode(), "after"]}), tmp_path / "big.parquet", compression="zstd")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "big.txt").write_bytes(body)
    del body
    for name in ("big.jsonl", "big.parquet", "dir"):
        tracemalloc.start()
        kept, quarantined, _ = run_one(tmp_path / name, tmp_path / f"out_{name}")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 16 * 1024 * 1024, (name, peak)
        assert [r["text"] for r in kept] == ([] if name == "dir" else ["after"])
        assert [q["rule"] for q in quarantined] == ["too_large"]
        assert f"{size}" in quarantined[0]["detail"] or name == "big.jsonl"
        assert 0 < len(quarantined[0]["text"]) <= ingest.PREVIEW_CHARS


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: None, "input directory holds no input units"),
    (lambda d: (d / "notes.csv").write_text("a,b"), "notes.csv: unknown input type"),
    (lambda d: ((d / "a.jsonl").write_text("{}"), (d / "a.parquet").write_text("")), "both map to shard 'a'"),
])
def test_list_units_refuses_bad_input_dirs(tmp_path, setup, fragment):
    d = tmp_path / "in"
    d.mkdir()
    setup(d)
    with pytest.raises(common.StageError, match=fragment) as err:
        ingest.list_units(d)
    assert str(d) in str(err.value)


def test_missing_input_dir_and_unknown_file_in_text_dir(tmp_path):
    with pytest.raises(common.StageError, match=f"{tmp_path / 'nope'}: input directory does not exist"):
        ingest.list_units(tmp_path / "nope")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(common.StageError, match="image.png: unknown file type in text directory"):
        run_one(tmp_path / "docs", tmp_path)


def test_unreadable_units_raise_and_leave_no_output(tmp_path):
    good = gzip.compress(b'{"text": "one"}\n' * 200, mtime=0)
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(common.StageError, match="cut.jsonl.gz:.*unreadable"):
        run_one(tmp_path / "cut.jsonl.gz", tmp_path)
    with pytest.raises(common.StageError, match="junk.parquet: not a readable Parquet file"):
        run_one(tmp_path / "junk.parquet", tmp_path)
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


# ----------------------------------------------------------------------------- contract

def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_conservation_and_manifest(tmp_path):
    unit = tmp_path / "u.jsonl"
    write_lines(unit, [jline({"text": "a"}), b'{"text": 1}', jline({"text": "b", "domain": "math"}), b"{oops"])
    kept, quarantined, manifest = run_one(unit, tmp_path)
    c = manifest["counts"]
    assert (c["records_in"], c["kept"], c["quarantined"]) == (4, 2, 2)
    assert c["quarantined_by_rule"] == {"invalid_json": 1, "wrong_type": 1}
    assert c["kept_by_domain"] == {"math": 1, "web": 1}
    assert set(manifest["outputs"]) == {"u.parquet", "quarantine/u.parquet"}
    assert manifest["inputs"] == {str(unit): sha(unit)}
    paths = ingest.shard_paths(tmp_path / "out", "u")
    assert common.manifest_is_current(paths["manifest"], params(), [unit], common.code_version("stages.ingest"))


def test_rerun_is_byte_identical(tmp_path):
    make_all_formats(tmp_path / "in")
    for run in ("a", "b"):
        ingest.ingest_units(tmp_path / "in", tmp_path / run, params())
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 7 * 3
    for rel in files:
        assert sha(tmp_path / "a" / rel) == sha(tmp_path / "b" / rel), rel


def test_resume_redoes_only_missing_or_changed_shards(tmp_path):
    make_all_formats(tmp_path / "in")
    out = tmp_path / "out"
    p = params()
    assert set(ingest.ingest_units(tmp_path / "in", out, p).values()) == {"done"}
    before = sha(out / "table.parquet")
    (out / "plain.parquet").unlink()
    (out / "plain.manifest.json").unlink()
    (out / "quarantine" / "zipped.parquet").unlink()
    status = ingest.ingest_units(tmp_path / "in", out, p)
    assert {k for k, v in status.items() if v == "done"} == {"plain", "zipped"}
    assert {k for k, v in status.items() if v == "skipped"} == {"docs", "hf", "notes", "single", "table"}
    (tmp_path / "in" / "docs" / "sub" / "a.txt").write_text("edited", encoding="utf-8")
    status = ingest.ingest_units(tmp_path / "in", out, p)
    assert [k for k, v in status.items() if v == "done"] == ["docs"]
    assert set(ingest.ingest_units(tmp_path / "in", out, params(min_doc_chars=2)).values()) == {"done"}
    assert sha(out / "table.parquet") == before
    assert ingest.ingest_units(tmp_path / "in", out, p, shard="notes") == {"notes": "done"}
    with pytest.raises(common.StageError, match="no input unit for shard 'nope'"):
        ingest.ingest_units(tmp_path / "in", out, p, shard="nope")


def test_committed_corpus_exercises_every_reader():
    units = ingest.list_units(REPO / "data" / "corpus")
    kinds = {ingest.unit_kind(path) for path in units.values()}
    assert kinds == {"jsonl", "parquet", "text_dir", "datasets"}
    assert 6 <= len(units) <= 12


def test_cli_smoke(tmp_path):
    (tmp_path / "in").mkdir()
    write_lines(tmp_path / "in" / "u.jsonl", [jline({"text": "hello"}), b"{bad"])
    cmd = [sys.executable, "-m", "stages.ingest", "--params-json", json.dumps({"ingest": params()}),
           "--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "u.manifest.json").read_text())
    assert manifest["counts"]["kept"] == 1 and manifest["counts"]["quarantined"] == 1
    (tmp_path / "in" / "notes.csv").write_text("a,b")
    done = subprocess.run(cmd + ["--shard", "u"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "notes.csv: unknown input type" in done.stderr
