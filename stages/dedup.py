"""Exact and MinHash near-duplicate removal over the whole corpus: a global index, then a per-shard apply.

`index` (global, stage dedup_index): filter/sigs/*.parquet -> dedup_index/duplicates.parquet + manifest.json.
  Nodes are the kept documents of every shard. Edges: the same exact_hash (normalized text), or a shared LSH band
  hash (a candidate pair) whose estimated Jaccard J^(a, b) = mean_k [h_k(a) == h_k(b)] >= dedup.verify_min_jaccard
  (verification needs the full signatures in sigs; verify_min_jaccard: null takes every candidate pair). Clusters are
  the connected components (union-find). Each cluster keeps one document, the longest (most approx_tokens), ties by
  smallest (id, shard, row); every other member is listed as exact_dup (same exact_hash as the kept one) or near_dup.
  Memory holds signatures only, never texts.
`apply` (per shard, stage dedup): filter/kept/<shard>.parquet + duplicates.parquet -> dedup/kept, dedup/rejected
  (rule exact_dup | near_dup, detail "duplicate of <kept_id>"), dedup/<shard>.manifest.json, written last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import common

STAGE = "dedup"
INDEX_STAGE = "dedup_index"
RULES = ("exact_dup", "near_dup")
DUPLICATES_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.string()), ("row", pa.int64()),
                               ("rule", pa.string()), ("kept_id", pa.string()), ("kept_shard", pa.string())])


# ----------------------------------------------------------------------------- signatures in memory

class Signatures:
    """The sigs of every shard, column-wise: id, shard, row, approx_tokens, exact_hash, band hashes (N, bands)
    with a mask of documents that have them, and optionally the full MinHash signatures (N, num_perm)."""

    def __init__(self, sigs_dir: str | Path, with_signatures: bool):
        self.files = [Path(sigs_dir) / f"{name}.parquet" for name in common.list_shards(sigs_dir)]
        columns = ["id", "shard", "row", "approx_tokens", "exact_hash", "bands"]
        columns += ["minhash"] if with_signatures else []
        self.minhash_params = None
        ids, shards, rows, tokens, exact, bands, has_bands, minhash = [], [], [], [], [], [], [], []
        for path in self.files:
            schema = pq.read_schema(path)
            missing = [c for c in columns if c not in schema.names]
            if missing:
                hint = " (set filter.minhash.store_signature: true, or dedup.verify_min_jaccard: null)" \
                    if "minhash" in missing else ""
                raise common.StageError(f"{path}: sigs shard lacks columns {missing}{hint}")
            params = json.loads((schema.metadata or {}).get(b"minhash", b"null"))
            if self.minhash_params is None:
                self.minhash_params = params
            elif params != self.minhash_params:
                raise common.StageError(f"{path}: MinHash params {params} differ from {self.files[0]}'s "
                                        f"{self.minhash_params}: signatures are not comparable")
            table = pq.read_table(path, columns=columns)
            if set(table.column("shard").unique().to_pylist()) - {path.stem}:
                raise common.StageError(f"{path}: its `shard` column does not name this shard ({path.stem})")
            ids += table.column("id").to_pylist()
            shards += [path.stem] * table.num_rows
            rows.append(table.column("row").to_numpy())
            tokens.append(table.column("approx_tokens").to_numpy())
            exact += table.column("exact_hash").to_pylist()
            b, has = _matrix(table.column("bands"), self.minhash_params["bands"], path, "bands")
            bands.append(b)
            has_bands.append(has)
            if with_signatures:
                minhash.append(_matrix(table.column("minhash"), self.minhash_params["num_perm"], path, "minhash")[0])
        self.ids, self.shards, self.exact = ids, shards, exact
        self.rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
        n_bands = self.minhash_params["bands"] if self.minhash_params else 0
        self.bands = np.concatenate(bands).astype(np.uint64) if bands else np.zeros((0, n_bands), np.uint64)
        self.has_bands = np.concatenate(has_bands) if has_bands else np.zeros(0, bool)
        self.minhash = np.concatenate(minhash) if minhash else None

    def __len__(self) -> int:
        return len(self.ids)

    def keep_key(self, i: int) -> tuple:
        """The cluster keeps the document with the smallest key: the longest, then smallest (id, shard, row)."""
        return -int(self.tokens[i]), self.ids[i], self.shards[i], int(self.rows[i])

    def jaccard(self, i: int, j: int) -> float:
        """Estimated Jaccard similarity of two documents' shingle sets: the fraction of equal MinHash values."""
        return float(np.mean(self.minhash[i] == self.minhash[j]))


def _matrix(column: pa.ChunkedArray, width: int, path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column whose lists are all `width` long or empty -> ((N, width) matrix, non-empty mask)."""
    array = column.combine_chunks()
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if not np.isin(lengths, (0, width)).all():
        raise common.StageError(f"{path}: column {name} holds lists of lengths {sorted(set(lengths.tolist()))}, "
                                f"expected {width} or 0")
    has = lengths == width
    values = array.flatten().to_numpy()
    matrix = np.zeros((len(lengths), width), values.dtype)
    matrix[has] = values.reshape(-1, width)
    return matrix, has


# ----------------------------------------------------------------------------- clustering

class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> bool:
        ri, rj = self.find(i), self.find(j)
        if ri == rj:
            return False
        self.parent[max(ri, rj)] = min(ri, rj)
        return True


def _buckets(keys: np.ndarray, members: np.ndarray):
    """Groups of two or more `members` (ascending) that share a key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_members = keys[order], members[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    ends = np.append(starts[1:], len(sorted_keys))
    for lo, hi in zip(starts[ends - starts >= 2], ends[ends - starts >= 2]):
        yield sorted_members[lo:hi].tolist()


def duplicate_clusters(sigs: Signatures, verify_min_jaccard: float | None) -> tuple[UnionFind, dict]:
    """Union-find over exact-hash groups and (verified) LSH candidate pairs; returns it with pair statistics."""
    uf = UnionFind(len(sigs))
    first_with_hash: dict[str, int] = {}
    for i, h in enumerate(sigs.exact):
        uf.union(first_with_hash.setdefault(h, i), i)

    stats = Counter(near_pairs_joined=0, near_pairs_below_jaccard=0)
    similar: dict[tuple[int, int], bool] = {}

    def is_similar(j: int, i: int) -> bool:
        if verify_min_jaccard is None:
            return True
        if (j, i) not in similar:
            similar[(j, i)] = sigs.jaccard(i, j) >= verify_min_jaccard
            stats["near_pairs_below_jaccard"] += not similar[(j, i)]
        return similar[(j, i)]

    members = np.flatnonzero(sigs.has_bands)
    for band in range(sigs.bands.shape[1]):
        for bucket in _buckets(sigs.bands[members, band], members):
            for k, i in enumerate(bucket[1:], start=1):
                # Join i to the first earlier member it is similar to; nothing to check once they share a cluster.
                for j in bucket[:k]:
                    if uf.find(i) == uf.find(j):
                        break
                    if is_similar(j, i):
                        uf.union(i, j)
                        stats["near_pairs_joined"] += 1
                        break
    return uf, dict(stats)


def duplicates_table(sigs: Signatures, uf: UnionFind) -> tuple[pa.Table, dict]:
    """One row per removed document (sorted by shard, row) and the cluster statistics."""
    roots = np.fromiter((uf.find(i) for i in range(len(sigs))), np.int64, len(sigs))
    clusters: dict[int, list[int]] = {}
    for i, root in enumerate(roots.tolist()):
        clusters.setdefault(root, []).append(i)
    rows = []
    sizes: Counter = Counter()
    for members in clusters.values():
        if len(members) < 2:
            continue
        sizes[len(members)] += 1
        kept = min(members, key=sigs.keep_key)
        for i in members:
            if i != kept:
                rule = "exact_dup" if sigs.exact[i] == sigs.exact[kept] else "near_dup"
                rows.append({"id": sigs.ids[i], "shard": sigs.shards[i], "row": int(sigs.rows[i]), "rule": rule,
                             "kept_id": sigs.ids[kept], "kept_shard": sigs.shards[kept]})
    rows.sort(key=lambda r: (r["shard"], r["row"]))
    by_rule = Counter(r["rule"] for r in rows)
    stats = {"docs": len(sigs), "clusters": sum(sizes.values()), "duplicates": len(rows),
             **{rule: by_rule[rule] for rule in RULES},
             "largest_cluster": max(sizes, default=0),
             "cluster_sizes": {str(size): n for size, n in sorted(sizes.items())}}
    return common.rows_to_table(rows, DUPLICATES_SCHEMA), stats


def dedup_index(sigs_dir: str | Path, output_dir: str | Path, p: dict) -> dict:
    """Build duplicates.parquet from every shard's signatures; returns the manifest (stats under counts)."""
    out = Path(output_dir)
    verify = p.get("verify_min_jaccard")
    sigs = Signatures(sigs_dir, with_signatures=verify is not None)
    uf, pair_stats = duplicate_clusters(sigs, verify)
    table, stats = duplicates_table(sigs, uf)
    common.write_table(out / "duplicates.parquet", table)
    return common.write_manifest(out / "manifest.json", stage=INDEX_STAGE, params=p, inputs=sigs.files,
                                 outputs=[out / "duplicates.parquet"], counts={**stats, **pair_stats},
                                 code=common.code_version(f"stages.{STAGE}"),
                                 extra={"minhash": sigs.minhash_params})


# ----------------------------------------------------------------------------- apply per shard

def shard_paths(output_dir: str | Path, shard: str) -> dict[str, Path]:
    out = Path(output_dir)
    return {"kept": out / "kept" / f"{shard}.parquet", "rejected": out / "rejected" / f"{shard}.parquet",
            "manifest": out / f"{shard}.manifest.json"}


def dedup_shard(input_path: str | Path, index_path: str | Path, output_dir: str | Path, shard: str, p: dict) -> dict:
    """Drop the shard's documents listed in the index; returns the manifest. kept + rejected == input, checked."""
    from tqdm import tqdm
    input_path, index_path = Path(input_path), Path(index_path)
    listed = pq.read_table(index_path, columns=["id", "row", "rule", "kept_id"], filters=[("shard", "=", shard)])
    by_row = {row: (doc_id, rule, kept_id) for doc_id, row, rule, kept_id in
              zip(*(listed.column(c).to_pylist() for c in ("id", "row", "rule", "kept_id")))}
    schema = pq.read_schema(input_path)
    if "id" not in schema.names or "approx_tokens" not in schema.names:
        raise common.StageError(f"{input_path}: missing columns id / approx_tokens (has {schema.names})")
    rejected_schema = schema.append(pa.field("rule", pa.string())).append(pa.field("detail", pa.string()))
    paths = shard_paths(output_dir, shard)
    docs, tokens = Counter({r: 0 for r in RULES}), Counter({r: 0 for r in RULES})
    n_in = tokens_in = 0

    with contextlib.ExitStack() as stack:
        write_kept = stack.enter_context(common.table_writer(paths["kept"], schema))
        write_rejected = stack.enter_context(common.table_writer(paths["rejected"], rejected_schema))
        bar = stack.enter_context(tqdm(total=common.count_rows(input_path), desc=f"dedup {shard}", unit="doc",
                                       file=sys.stderr, disable=None, leave=False))
        for batch in common.iter_record_batches(input_path):
            rows = range(n_in, n_in + len(batch))
            drop = [row in by_row for row in rows]
            ids = batch.column("id").to_pylist()
            batch_tokens = batch.column("approx_tokens").to_pylist()
            rules, details = [], []
            for row, doc_id, t, dropped in zip(rows, ids, batch_tokens, drop):
                if not dropped:
                    continue
                listed_id, rule, kept_id = by_row[row]
                if listed_id != doc_id:
                    raise common.StageError(f"{input_path}: row {row} is {doc_id}, but {index_path} lists {listed_id} "
                                            f"there: the index was built from other filter output")
                rules.append(rule)
                details.append(f"duplicate of {kept_id}")
                docs[rule] += 1
                tokens[rule] += t
            mask = pa.array(drop)
            write_kept(pa.Table.from_batches([batch.filter(pc.invert(mask))], schema=schema))
            write_rejected(pa.Table.from_batches([batch.filter(mask)], schema=schema)
                           .append_column("rule", pa.array(rules, pa.string()))
                           .append_column("detail", pa.array(details, pa.string())))
            n_in += len(batch)
            tokens_in += sum(batch_tokens)
            bar.update(len(batch))

    past_end = sorted(row for row in by_row if row >= n_in)
    if past_end:
        raise common.StageError(f"{index_path}: lists rows {past_end[:5]} of shard {shard}, which has {n_in} rows: "
                                f"the index was built from other filter output")
    n_kept = common.count_rows(paths["kept"])
    common.check_conservation(STAGE, shard, n_in, kept=n_kept, rejected=common.count_rows(paths["rejected"]))
    counts = {"in": n_in, "kept": n_kept, "rejected": dict(docs), "approx_tokens_in": tokens_in,
              "approx_tokens_kept": tokens_in - sum(tokens.values()), "approx_tokens_rejected": dict(tokens)}
    return common.write_manifest(paths["manifest"], stage=STAGE, params=p, inputs=[input_path, index_path],
                                 outputs=[paths["kept"], paths["rejected"]], counts=counts,
                                 code=common.code_version(f"stages.{STAGE}"))


def dedup_shards(input_dir: str | Path, index_path: str | Path, output_dir: str | Path, p: dict,
                 shard: str | None = None) -> dict[str, str]:
    """Apply the index to one shard (`shard`) or to every shard of `input_dir` whose outputs are not current."""
    input_dir, index_path = Path(input_dir), Path(index_path)
    if not index_path.is_file():
        raise common.StageError(f"{index_path}: duplicates index does not exist (run `python -m stages.dedup index`)")
    shards = [shard] if shard else common.list_shards(input_dir)
    code = common.code_version(f"stages.{STAGE}")

    def process(name: str) -> None:
        path = common.input_shard(input_dir, name)
        dedup_shard(path, index_path, output_dir, name, p)

    def is_done(name: str) -> bool:
        return shard is None and common.manifest_is_current(
            shard_paths(output_dir, name)["manifest"], p, [input_dir / f"{name}.parquet", index_path], code)

    return common.run_sharded(shards, process, is_done, desc=STAGE)


# ----------------------------------------------------------------------------- CLI

def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    index = sub.add_parser("index", help="build dedup_index/duplicates.parquet from filter/sigs")
    index.add_argument("--sigs-dir", required=True, help="artifacts/<scale>/filter/sigs")
    index.add_argument("--output-dir", required=True, help="artifacts/<scale>/dedup_index")
    apply = sub.add_parser("apply", help="drop the listed duplicates from filter/kept shards")
    apply.add_argument("--input-dir", required=True, help="artifacts/<scale>/filter/kept")
    apply.add_argument("--index", required=True, help="artifacts/<scale>/dedup_index/duplicates.parquet")
    apply.add_argument("--output-dir", required=True, help="artifacts/<scale>/dedup")
    apply.add_argument("--shard", default=None, help="one shard name (file stem); all shards when omitted")
    for parser in (index, apply):
        # --params / --params-json may follow the subcommand too; SUPPRESS keeps the top-level value otherwise.
        parser.add_argument("--params", default=argparse.SUPPRESS, help="params.yaml to resolve by its `scale`")
        parser.add_argument("--params-json", default=argparse.SUPPRESS, help="resolved slices as JSON, {stage: slice}")
    args = ap.parse_args()
    try:
        p = common.resolve_cli_params(args, STAGE)
        if args.command == "index":
            dedup_index(args.sigs_dir, args.output_dir, p)
        else:
            dedup_shards(args.input_dir, args.index, args.output_dir, p, args.shard)
    except common.StageError as exc:
        common.fail(exc)


if __name__ == "__main__":
    main()
