"""The artifact contract, shared by every stage.

One place for: params resolution by scale, atomic writes, content hashes, manifests, Parquet shard IO,
the conservation check, and the per-shard driver that lets a killed run redo only the missing shards.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gzip
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
SCALES = ("tiny", "small", "3b")
PARQUET_COMPRESSION = "zstd"
# Row groups small enough to stream a shard without holding it whole in memory.
ROW_GROUP_ROWS = 2048


_UMASK = os.umask(0)
os.umask(_UMASK)


class StageError(RuntimeError):
    """A refusal with a message that names the file (and line) at fault."""


# ----------------------------------------------------------------------------- params

def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_params(path: str | os.PathLike = REPO / "params.yaml") -> dict:
    with open(path, encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    scale = params.get("scale")
    if scale not in SCALES:
        raise StageError(f"{path}: scale must be one of {SCALES}, got {scale!r}")
    validate_params(params, path)
    return params


def validate_params(params: dict, path: str | os.PathLike) -> None:
    """params.yaml against schemas/params.schema.yaml (what the Snakefile checks at DAG load), so a stage run by
    DVC refuses a mistyped key or a wrong type too, naming its dotted path, instead of applying a default."""
    import jsonschema
    schema = yaml.safe_load((REPO / "schemas" / "params.schema.yaml").read_text(encoding="utf-8"))
    lines = []
    for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(params):
        where = [str(k) for k in e.absolute_path]
        if e.validator == "additionalProperties":  # name the mistyped key itself: pretrain.sequence_len
            known = set(e.schema.get("properties", {}))
            lines += [f"{path}: {'.'.join([*where, str(k)])}: unknown key" for k in e.instance if k not in known]
        else:
            lines.append(f"{path}: {'.'.join(where) or '(top level)'}: {e.message}")
    if lines:
        raise StageError("\n".join(sorted(lines)))


def stage_params(params: dict, stage: str) -> dict:
    """The slice a stage reads: `params[stage]` overlaid with `params.scales[scale][stage]`, plus seed and scale.

    The seed is the top-level `seed` unless the stage section sets its own (a seed ablation varies `pretrain.seed`
    and reruns pretraining only). Each rule passes exactly this slice, so Snakemake and DVC rerun a stage exactly
    when it changes.
    """
    scale = params["scale"]
    base = params.get(stage, {}) or {}
    override = (params.get("scales", {}).get(scale, {}) or {}).get(stage, {}) or {}
    out = deep_merge(base, override)
    if out.get("seed") is None:
        out["seed"] = params.get("seed", 0)
    out["scale"] = scale
    return out


def params_hash(p: dict) -> str:
    return hashlib.sha256(json.dumps(p, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- hashing

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_id(text: str) -> str:
    """Document id: the content hash of its normalized text (first 16 bytes of sha256, hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def code_version(*modules: str) -> str:
    """Hash of the source files that implement a stage (stable across commits that do not touch them)."""
    h = hashlib.sha256()
    for name in sorted({"stages.common", *modules}):
        mod = sys.modules.get(name) or __import__(name, fromlist=["_"])
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


# Top-level import packages of this repo and their folders (pyproject's package-dir): the code whose version keys
# a stage's outputs and resume state. kernels/ is imported as nanbeige_kernels (HF's hub owns the name `kernels`).
REPO_PACKAGES = {"stages": "stages", "model": "model", "nanbeige_kernels": "kernels/nanbeige_kernels"}


def _module_file(name: str) -> Path | None:
    """The source file of repo module `name` (a package's __init__.py), or None when it is not a file here."""
    top, *rest = name.split(".")
    base = REPO.joinpath(REPO_PACKAGES[top], *rest)
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imported_names(path: Path, name: str) -> frozenset[str]:
    """Every module name `path` (module `name`) imports anywhere, lazy imports in function bodies included; for
    `from a import b` both `a` and `a.b` (b may be a submodule); relative imports resolved against `name`.
    Parsed once per file version (the Snakefile asks for ~30 stage closures over the same files)."""
    stat = path.stat()
    return _imported_names_of(str(path), name, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _imported_names_of(path_str: str, name: str, _mtime_ns: int, _size: int) -> frozenset[str]:
    import ast
    path = Path(path_str)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    # Imports are statements: walk statement bodies only (ast.walk's every expression node cost ~4x the time).
    stack: list = list(ast.parse(path.read_bytes(), filename=str(path)).body)
    while stack:
        node = stack.pop()
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            stack.extend(getattr(node, field, ()))
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(out)


def repo_imports(*modules: str) -> list[Path]:
    """Repo-relative source files of `modules` and of every module of REPO_PACKAGES they import, transitively
    (static imports found by `ast`, including lazy ones inside functions, and each module's parent package
    __init__.py); sorted. Imports by string (importlib) are not seen. The DAG declares these files as a rule's code
    inputs; code_version_closure hashes them."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in REPO_PACKAGES:
            continue
        path = _module_file(name)
        if path is None:
            if name in modules:
                raise StageError(f"repo_imports: {name!r} is not a module of this repo")
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(_imported_names(path, name))
    return sorted(p.relative_to(REPO) for p in set(seen.values()))


@functools.cache
def code_version_closure(*modules: str) -> str:
    """Hash of (repo-relative path, bytes) of every file in repo_imports(*modules): changes when any code the
    modules import from this repo changes, and only then (not with the checkout's location). Computed once per
    process: the version of the code the process runs, even if a file is edited while it runs."""
    h = hashlib.sha256()
    for rel in repo_imports(*modules):
        h.update(str(rel).encode() + b"\0" + (REPO / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- atomic writes

def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the destination directory; on success fsync it and rename over `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- parquet shards

def write_table(path: str | os.PathLike, table: pa.Table) -> None:
    """Atomic, deterministic Parquet write (zstd, fixed row-group size, no wall-clock metadata)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=PARQUET_COMPRESSION, row_group_size=ROW_GROUP_ROWS,
                       write_statistics=True)


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def iter_batches(path: str | os.PathLike, columns: list[str] | None = None,
                 batch_size: int = ROW_GROUP_ROWS) -> Iterator[list[dict]]:
    """Stream a Parquet shard as lists of row dicts, one row group at a time."""
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        yield batch.to_pylist()


def iter_jsonl(path: str | os.PathLike, text_field: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSON-lines file (gzip when it ends in .gz).
    A UTF-8 byte-order mark opening the file is not part of the first record (utf-8-sig).
    A line that is not a JSON object, or lacks a string `text_field`, is a StageError naming file and line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise StageError(f"{path}:{lineno}: not a JSON object")
            if text_field is not None and not isinstance(record.get(text_field), str):
                raise StageError(f"{path}:{lineno}: record has no string field {text_field!r}")
            yield lineno, record


def input_shard(directory: str | os.PathLike, name: str) -> Path:
    """The Parquet shard `name` of `directory`; a missing one is a StageError naming it."""
    path = Path(directory) / f"{name}.parquet"
    if not path.is_file():
        raise StageError(f"{path}: input shard does not exist")
    return path


def count_rows(path: str | os.PathLike) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def list_shards(directory: str | os.PathLike) -> list[str]:
    """Shard names (file stems) of the `*.parquet` files directly in `directory`, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StageError(f"{directory}: input directory does not exist")
    names = sorted(p.stem for p in directory.glob("*.parquet") if not p.name.startswith("."))
    if not names:
        raise StageError(f"{directory}: input directory holds no *.parquet shards")
    return names


# ----------------------------------------------------------------------------- manifests

def file_entry(path: str | os.PathLike) -> dict:
    path = Path(path)
    entry = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if path.suffix == ".parquet":
        entry["rows"] = count_rows(path)
    return entry


def write_manifest(path: str | os.PathLike, *, stage: str, params: dict, inputs: Iterable[str | os.PathLike],
                   outputs: Iterable[str | os.PathLike], counts: dict, code: str, extra: dict | None = None) -> dict:
    """manifest.json: counts, content hashes of inputs and outputs, the params slice, seed, code version."""
    path = Path(path)
    base = path.parent
    def rel(p):
        p = Path(p)
        with contextlib.suppress(ValueError):
            return str(p.resolve().relative_to(base.resolve()))
        return str(p)
    manifest = {
        "stage": stage,
        "params": params,
        "params_hash": params_hash(params),
        "seed": params.get("seed"),
        "code_version": code,
        "inputs": {str(p): sha256_file(p) for p in sorted(map(str, inputs)) if Path(p).is_file()},
        "outputs": {rel(p): file_entry(p) for p in sorted(map(str, outputs))},
        "counts": counts,
    }
    if extra:
        manifest.update(extra)
    write_json(path, manifest)
    return manifest


def read_manifest(path: str | os.PathLike) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def manifest_is_current(path: str | os.PathLike, params: dict, inputs: Iterable[str | os.PathLike], code: str) -> bool:
    """True when a shard's manifest records these params, these input hashes and this code, and its outputs
    still hash as recorded: the shard is done and a rerun may skip it."""
    m = read_manifest(path)
    if not m or m.get("params_hash") != params_hash(params) or m.get("code_version") != code:
        return False
    want = {str(p): sha256_file(p) for p in sorted(map(str, inputs)) if Path(p).is_file()}
    if m.get("inputs") != want:
        return False
    base = Path(path).parent
    for rel, entry in m.get("outputs", {}).items():
        out = base / rel
        if not out.is_file() or sha256_file(out) != entry["sha256"]:
            return False
    return True


def check_conservation(stage: str, shard: str, n_in: int, **parts: int) -> None:
    """Documents in == sum of the parts out (kept + rejected + ...); anything else is a bug, so stop."""
    total = sum(parts.values())
    if total != n_in:
        raise StageError(f"{stage}[{shard}]: conservation violated: {n_in} in != {total} out {parts}")


def run_sharded(shards: list[str], process: Callable[[str], Any], is_done: Callable[[str], bool],
                desc: str) -> dict[str, str]:
    """Process every shard whose outputs are not already current; returns {shard: 'done'|'skipped'}.

    Each shard's outputs are written atomically and its manifest last, so a killed run leaves complete
    shards (skipped on rerun) and missing ones (redone)."""
    from tqdm import tqdm
    status = {}
    for shard in tqdm(shards, desc=desc, unit="shard", file=sys.stderr, disable=None):
        if is_done(shard):
            status[shard] = "skipped"
            continue
        process(shard)
        status[shard] = "done"
    return status


# ----------------------------------------------------------------------------- CLI

def base_parser(description: str) -> argparse.ArgumentParser:
    """Common CLI: `--params params.yaml` (DVC) or `--params-json '{...}'` (Snakemake passes the resolved slice)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default=str(REPO / "params.yaml"), help="params.yaml to resolve by its `scale`")
    ap.add_argument("--params-json", default=None,
                    help="resolved slices as JSON, {stage: slice, ...} (overrides --params; what Snakemake passes)")
    return ap


def resolve_cli_params(args: argparse.Namespace, stage: str) -> dict:
    """The stage's slice: from `--params-json` ({stage: slice}) when given, else resolved from the params file."""
    if args.params_json:
        payload = json.loads(args.params_json)
        if stage not in payload:
            raise StageError(f"--params-json has no slice for stage {stage!r} (has {sorted(payload)})")
        return payload[stage]
    return stage_params(load_params(args.params), stage)


def fail(exc: StageError) -> None:
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- metrics

def open_live(directory: str | os.PathLike, resume: bool = False):
    """A dvclive logger for a stage's metrics and plots in `directory` (repo-relative `dvclive/<stage>`).

    dvcyaml=False: dvc.yaml is generated from the Snakemake DAG, and dvclive must never append to it.
    save_dvc_exp=False: the DAG runs under `dvc exp run` or Snakemake; dvclive must not start experiments."""
    from dvclive import Live
    return Live(dir=str(directory), resume=resume, dvcyaml=False, save_dvc_exp=False, report=None)


# ----------------------------------------------------------------------------- arrays and arrow batches

def write_npz(path: str | os.PathLike, arrays: dict) -> None:
    """Atomic, byte-deterministic `.npz` that `numpy.load` reads: sorted members, fixed zip timestamps, deflate.

    `numpy.savez` stamps each member with the wall clock, so two identical runs would differ in bytes."""
    import zipfile

    import numpy as np
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(arrays):
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(arrays[name]), allow_pickle=False)


def iter_record_batches(path: str | os.PathLike, columns: list[str] | None = None,
                        batch_size: int = ROW_GROUP_ROWS) -> Iterator[pa.RecordBatch]:
    """Stream a Parquet shard as Arrow record batches (for stages that compute column-wise, not row by row)."""
    yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)


@contextlib.contextmanager
def table_writer(path: str | os.PathLike, schema: pa.Schema) -> Iterator[Callable[[pa.Table], None]]:
    """Stream tables into one Parquet shard with write_table's settings; yields `append(table)`.

    Atomic like write_table: the shard appears at `path` only when the block exits cleanly, so a stage can
    write shard-sized outputs batch by batch without holding them in memory."""
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema, compression=PARQUET_COMPRESSION, write_statistics=True)
        try:
            yield lambda table: writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        finally:
            writer.close()


# ----------------------------------------------------------------------------- atomic directories

@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory next to `final`; on success fsync its files and rename it to `final` (an existing
    `final` is moved aside first, then deleted). A kill leaves the old directory, none, or the whole new one: never
    a half-written `final`. Leftover `.<name>.*.tmp` siblings are debris of killed writes."""
    import shutil
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
