"""Exact and MinHash near-duplicate removal over the whole corpus: a band-sharded index, its merge, a per-shard apply.

Documents are the rows of filter/sigs/*.parquet in (shard name, row) order; document i is the i-th of them.

`edges --bands LO-HI` (stage dedup_edges, one job per band range, named LO-HI as by band_ranges: bands LO..HI-1):
  filter/sigs -> dedup_edges/LO-HI.parquet + LO-HI.manifest.json (every range of dedup.band_shards when
  --bands is omitted). Two documents are an LSH candidate pair when one band of LO..HI-1 hashes them alike; with
  b bands of r rows each, a pair of Jaccard similarity J is a candidate (over all bands) with probability
  P(candidate | J) = 1 - (1 - J^r)^b  (b = 14, r = 8: 0.5 at J = 0.685, 0.57 at 0.7, 0.92 at 0.8, 0.99 at 0.85).
  Bounded work per bucket: the members of a bucket, in document order, are each compared with at most the
  `dedup.bucket_window` members just before them (a sliding window: at most window * (n - 1) pairs for n members
  instead of n (n - 1) / 2; consecutive windows still chain a large bucket together); a bucket of more than
  window + 1 members counts in buckets_capped. A candidate pair is a verified edge when its estimated Jaccard
  J^(a, b) = mean_k [h_k(a) == h_k(b)] >= dedup.verify_min_jaccard (null: every candidate pair). Every verified edge
  is written, (a, b) with a < b, sorted. Memory bound: 8 * (HI - LO) + 17 bytes per document (band keys, mask,
  index) and ~40 more while one band is bucketed, 4 * num_perm bytes per document in some candidate pair, ~40 bytes
  per candidate pair; signatures are read one Parquet batch at a time, and only the `bands` and `minhash` columns.
`merge` (stage dedup_index): filter/sigs + the edges of every range of dedup.band_shards -> duplicates.parquet +
  manifest.json. Connected components (scipy.sparse.csgraph: what union-find computes) over all verified edges and
  the exact edges (same exact_hash of the normalized text): a chain a~c, b~c with a !~ b is one component. Each
  component keeps one document, the longest (most approx_tokens), ties by smallest id, then earliest in document
  order; every other member is one row with its reason: rule exact_dup (same exact_hash as the kept one) or
  near_dup, the kept document (id, shard, row) and the component size. The output depends only on the union of the
  edges, so it is byte-identical however the bands are split into ranges. Memory bound: per document its id and
  exact_hash (Arrow strings, ~90 bytes) and ~50 bytes of numbers (tokens, rows, labels), 16 bytes per edge; no
  signatures.
`index`: `edges` (every range, into <output-dir>/edges) then `merge`, in one process (the single-job path).
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
EDGES_STAGE = "dedup_edges"
INDEX_STAGE = "dedup_index"
RULES = ("exact_dup", "near_dup")
EDGES_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64())])
DUPLICATES_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.string()), ("row", pa.int64()),
                               ("rule", pa.string()), ("kept_id", pa.string()), ("kept_shard", pa.string()),
                               ("kept_row", pa.int64()), ("component_size", pa.int64())])
# Candidate pairs verified per vectorized step: bounds the (chunk, num_perm) comparison temporaries (~30 MB at 112).
VERIFY_CHUNK = 1 << 16


# ----------------------------------------------------------------------------- signatures, streamed

class SigsShards:
    """The filter/sigs shards in document order: paths, row offsets, and the MinHash params they all share."""

    def __init__(self, sigs_dir: str | Path, columns: list[str]):
        self.files = [Path(sigs_dir) / f"{name}.parquet" for name in common.list_shards(sigs_dir)]
        self.minhash_params = None
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
        if self.minhash_params is None:
            raise common.StageError(f"{self.files[0]}: sigs shard records no MinHash params")
        self.offsets = np.cumsum([0] + [common.count_rows(path) for path in self.files])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batches(self, columns: list[str]):
        """(path, first document index, record batch) over every shard in document order."""
        for path, start in zip(self.files, self.offsets):
            for batch in common.iter_record_batches(path, columns=columns):
                yield path, int(start), batch
                start += len(batch)

    def shard_of(self, docs: np.ndarray) -> np.ndarray:
        """Index into `files` of each document's shard."""
        return np.searchsorted(self.offsets, docs, side="right") - 1


def _matrix(array: pa.Array, width: int, path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column whose lists are all `width` long or empty -> ((N, width) matrix, non-empty mask)."""
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if not np.isin(lengths, (0, width)).all():
        raise common.StageError(f"{path}: column {name} holds lists of lengths {sorted(set(lengths.tolist()))}, "
                                f"expected {width} or 0")
    has = lengths == width
    values = array.flatten().to_numpy()
    matrix = np.zeros((len(lengths), width), values.dtype)
    matrix[has] = values.reshape(-1, width)
    return matrix, has


# ----------------------------------------------------------------------------- band ranges

def band_ranges(n_bands: int, band_shards: int) -> list[str]:
    """Names "LO-HI" of `band_shards` contiguous ranges of bands 0..n_bands-1 (LO..HI-1), sizes differing by at most
    one, e.g. (14, 2) -> ["00-07", "07-14"]: the edge shards' file names, and the rules' wildcard values."""
    if not 1 <= band_shards <= n_bands:
        raise common.StageError(f"params {STAGE}.band_shards: {band_shards} must be between 1 and the {n_bands} bands")
    bounds = [n_bands * k // band_shards for k in range(band_shards + 1)]
    return [f"{lo:02d}-{hi:02d}" for lo, hi in zip(bounds[:-1], bounds[1:])]


def parse_bands(name: str, n_bands: int) -> tuple[int, int]:
    """"LO-HI" -> (LO, HI), the half-open range of bands LO..HI-1, checked against the signatures' band count."""
    try:
        lo, hi = (int(x) for x in name.split("-"))
    except ValueError:
        raise common.StageError(f"--bands {name!r}: expected LO-HI, e.g. 00-07 (bands 0..6)") from None
    if not 0 <= lo < hi <= n_bands:
        raise common.StageError(f"--bands {name!r}: need 0 <= LO < HI <= {n_bands} (the signatures' bands)")
    return lo, hi


def edge_paths(edges_dir: str | Path, n_bands: int, band_shards: int) -> list[Path]:
    """The edge shards of every range of `band_shards`, in band order."""
    return [Path(edges_dir) / f"{name}.parquet" for name in band_ranges(n_bands, band_shards)]


def edge_manifest_path(edges_path: str | Path) -> Path:
    edges_path = Path(edges_path)
    return edges_path.with_name(f"{edges_path.stem}.manifest.json")


# ----------------------------------------------------------------------------- edges of a band range

def window_pairs(keys: np.ndarray, docs: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Candidate pairs of one band: `docs` (ascending) sharing a key, each member of a bucket paired with the
    `window` members before it. Returns (a, b) with a < b, and the bucket statistics."""
    order = np.argsort(keys, kind="stable")  # stable: docs stay ascending within a bucket
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    sizes = np.diff(np.append(starts, len(keys)))
    multi = sizes >= 2
    stats = {"buckets": int(multi.sum()), "buckets_capped": int((sizes > window + 1).sum()),
             "largest_bucket": int(sizes.max(initial=0))}
    # Only members of buckets of two or more; bucket ids tell consecutive buckets apart.
    members = docs[order][np.repeat(multi, sizes)]
    bucket = np.repeat(np.arange(int(multi.sum())), sizes[multi])
    a, b = [], []
    for offset in range(1, min(window, stats["largest_bucket"] - 1) + 1):
        same = bucket[:-offset] == bucket[offset:]
        a.append(members[:-offset][same])
        b.append(members[offset:][same])
    empty = np.zeros(0, np.int64)
    return np.concatenate(a) if a else empty, np.concatenate(b) if b else empty, stats


def candidate_pairs(sigs: SigsShards, lo: int, hi: int, window: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Unique candidate pairs (a < b, sorted) of bands lo..hi-1, from the `bands` column streamed batch by batch."""
    n, n_bands = len(sigs), sigs.minhash_params["bands"]
    keys = np.zeros((n, hi - lo), np.uint64)
    has = np.zeros(n, bool)
    for path, start, batch in sigs.batches(["bands"]):
        matrix, present = _matrix(batch.column("bands"), n_bands, path, "bands")
        keys[start:start + len(batch)] = matrix[:, lo:hi]
        has[start:start + len(batch)] = present
    docs = np.flatnonzero(has)
    stats = Counter(buckets=0, buckets_capped=0)
    largest, pairs = 0, np.zeros(0, np.int64)
    for band in range(hi - lo):
        a, b, band_stats = window_pairs(keys[docs, band], docs, window)
        largest = max(largest, band_stats.pop("largest_bucket"))
        stats.update(band_stats)
        pairs = np.union1d(pairs, a * n + b)  # one int64 per pair: n^2 < 2^63 up to 3e9 documents
    return pairs // max(n, 1), pairs % max(n, 1), {**stats, "largest_bucket": largest}


def verified(sigs: SigsShards, a: np.ndarray, b: np.ndarray, min_jaccard: float) -> np.ndarray:
    """Mask of the pairs with estimated Jaccard >= min_jaccard; holds the signatures of paired documents only."""
    num_perm = sigs.minhash_params["num_perm"]
    need = np.union1d(a, b)
    minhash = np.zeros((len(need), num_perm), np.uint32)
    for path, start, batch in sigs.batches(["minhash"]):
        first, last = np.searchsorted(need, [start, start + len(batch)])
        if last > first:
            matrix = _matrix(batch.column("minhash"), num_perm, path, "minhash")[0]
            minhash[first:last] = matrix[need[first:last] - start]
    ia, ib = np.searchsorted(need, a), np.searchsorted(need, b)
    keep = np.zeros(len(a), bool)
    for lo in range(0, len(a), VERIFY_CHUNK):
        hi = lo + VERIFY_CHUNK
        keep[lo:hi] = (minhash[ia[lo:hi]] == minhash[ib[lo:hi]]).sum(axis=1) / num_perm >= min_jaccard
    return keep


def band_edges(sigs_dir: str | Path, bands: str, edges_dir: str | Path, p: dict) -> dict:
    """Write edges_dir/<bands>.parquet, the verified edges of the band range `bands` ("LO-HI"), and its manifest;
    returns the manifest."""
    verify = p["verify_min_jaccard"]
    sigs = SigsShards(sigs_dir, ["bands"] + (["minhash"] if verify is not None else []))
    lo, hi = parse_bands(bands, sigs.minhash_params["bands"])
    if int(p["bucket_window"]) < 1:
        raise common.StageError(f"params {STAGE}.bucket_window: {p['bucket_window']} must be at least 1")
    a, b, stats = candidate_pairs(sigs, lo, hi, int(p["bucket_window"]))
    keep = np.ones(len(a), bool) if verify is None else verified(sigs, a, b, verify)
    output_path = Path(edges_dir) / f"{lo:02d}-{hi:02d}.parquet"
    common.write_table(output_path, pa.table({"a": a[keep], "b": b[keep]}, schema=EDGES_SCHEMA))
    counts = {"docs": len(sigs), **stats, "candidate_pairs": len(a), "near_edges": int(keep.sum()),
              "near_pairs_below_jaccard": int((~keep).sum())}
    return common.write_manifest(edge_manifest_path(output_path), stage=EDGES_STAGE, params=p, inputs=sigs.files,
                                 outputs=[output_path], counts=counts, code=common.code_version(f"stages.{STAGE}"),
                                 extra={"minhash": sigs.minhash_params, "bands": [lo, hi]})


# ----------------------------------------------------------------------------- merge: components

def read_edge_shards(sigs: SigsShards, edge_paths: list[Path], p: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """All verified edges (unique, a < b) of ranges that cover every band once, built from these sigs and params."""
    sig_hashes = sorted((path.name, common.sha256_file(path)) for path in sigs.files)
    manifests = []
    for path in edge_paths:
        m = common.read_manifest(edge_manifest_path(path))
        if m is None or m.get("stage") != EDGES_STAGE:
            raise common.StageError(f"{edge_manifest_path(path)}: edge shard manifest missing or unreadable")
        if m["params_hash"] != common.params_hash(p):
            raise common.StageError(f"{path}: built with other {STAGE} params ({m['params']})")
        built_from = sorted((Path(k).name, v) for k, v in m["inputs"].items())
        if built_from != sig_hashes or m["minhash"] != sigs.minhash_params:
            raise common.StageError(f"{path}: built from other signatures than {sigs.files[0].parent}")
        manifests.append((tuple(m["bands"]), path, m["counts"]))
    manifests.sort(key=lambda m: (m[0], str(m[1])))
    covered = [band for (lo, hi), _, _ in manifests for band in range(lo, hi)]
    if covered != list(range(sigs.minhash_params["bands"])):
        raise common.StageError(f"edge shards cover bands {[r for r, _, _ in manifests]}: need every band of "
                                f"0..{sigs.minhash_params['bands'] - 1} exactly once")
    # Summed over ranges: each band is in one range; a pair that is a candidate in two ranges counts twice.
    stats = Counter()
    for _, _, range_counts in manifests:
        stats.update({k: range_counts[k] for k in ("buckets", "buckets_capped", "candidate_pairs",
                                                   "near_pairs_below_jaccard")})
    stats["largest_bucket"] = max(range_counts["largest_bucket"] for _, _, range_counts in manifests)
    tables = [pq.read_table(path) for _, path, _ in manifests]
    a = np.concatenate([t.column("a").to_numpy() for t in tables])
    b = np.concatenate([t.column("b").to_numpy() for t in tables])
    pairs = np.unique(a * len(sigs) + b)  # a pair may be verified in two ranges: once is enough
    stats["near_edges"] = len(pairs)
    return pairs // max(len(sigs), 1), pairs % max(len(sigs), 1), dict(stats)


def component_representatives(labels: np.ndarray, sizes: np.ndarray, tokens: np.ndarray,
                              ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(removed documents ascending, the kept document of each): a component of two or more keeps its first member
    by (most approx_tokens, smallest id, earliest in document order)."""
    members = np.flatnonzero(sizes[labels] >= 2)
    order = pc.sort_indices(pa.table({"label": labels[members], "neg_tokens": -tokens[members],
                                      "id": ids.take(pa.array(members)), "doc": members}),
                            sort_keys=[(k, "ascending") for k in ("label", "neg_tokens", "id", "doc")]).to_numpy()
    by_rank = members[order]
    first = np.ones(len(by_rank), bool)
    first[1:] = labels[by_rank][1:] != labels[by_rank][:-1]
    kept_of = np.full(len(sizes), -1, np.int64)
    kept_of[labels[by_rank[first]]] = by_rank[first]
    removed = members[kept_of[labels[members]] != members]
    return removed, kept_of[labels[removed]]


def merge_edges(sigs_dir: str | Path, edge_paths: list[str | Path], output_dir: str | Path, p: dict) -> dict:
    """Connected components over exact and verified near edges -> duplicates.parquet; returns the manifest."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    out, edge_paths = Path(output_dir), [Path(e) for e in edge_paths]
    sigs = SigsShards(sigs_dir, ["id", "shard", "row", "approx_tokens", "exact_hash"])
    n = len(sigs)
    near_a, near_b, edge_stats = read_edge_shards(sigs, edge_paths, p)
    ids, exact, rows, tokens = [], [], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for path, _, batch in sigs.batches(["id", "shard", "row", "approx_tokens", "exact_hash"]):
        if set(pc.unique(batch.column("shard")).to_pylist()) - {path.stem}:
            raise common.StageError(f"{path}: its `shard` column does not name this shard ({path.stem})")
        ids.append(batch.column("id"))
        exact.append(batch.column("exact_hash"))
        rows.append(batch.column("row").to_numpy())
        tokens.append(batch.column("approx_tokens").to_numpy())
    ids = pa.chunked_array(ids, pa.string()).combine_chunks()
    rows, tokens = np.concatenate(rows), np.concatenate(tokens)
    codes = pc.dictionary_encode(pa.chunked_array(exact, pa.string()).combine_chunks()).indices.to_numpy()
    del exact
    first_with_hash = np.unique(codes, return_index=True)[1][codes]  # codes are 0..k-1, so [1] is indexed by code
    exact_b = np.flatnonzero(first_with_hash != np.arange(n))

    a, b = np.concatenate([first_with_hash[exact_b], near_a]), np.concatenate([exact_b, near_b])
    _, labels = connected_components(coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n)), directed=False)
    sizes = np.bincount(labels)
    removed, kept = component_representatives(labels, sizes, tokens, ids)
    shard_names = np.array([path.stem for path in sigs.files], dtype=object)
    rule = np.where(codes[removed] == codes[kept], "exact_dup", "near_dup")
    table = pa.table({"id": ids.take(pa.array(removed)), "shard": shard_names[sigs.shard_of(removed)].tolist(),
                      "row": rows[removed], "rule": rule.tolist(), "kept_id": ids.take(pa.array(kept)),
                      "kept_shard": shard_names[sigs.shard_of(kept)].tolist(), "kept_row": rows[kept],
                      "component_size": sizes[labels[removed]].astype(np.int64)}, schema=DUPLICATES_SCHEMA)
    common.write_table(out / "duplicates.parquet", table)

    cluster_sizes = Counter(sizes[sizes >= 2].tolist())
    stats = {"docs": n, "clusters": int((sizes >= 2).sum()), "duplicates": len(removed),
             **{r: int((rule == r).sum()) for r in RULES}, "exact_edges": len(exact_b),
             "largest_cluster": int(sizes[sizes >= 2].max(initial=0)),
             "cluster_sizes": {str(size): k for size, k in sorted(cluster_sizes.items())}, **edge_stats}
    return common.write_manifest(out / "manifest.json", stage=INDEX_STAGE, params=p,
                                 inputs=[*sigs.files, *edge_paths, *map(edge_manifest_path, edge_paths)],
                                 outputs=[out / "duplicates.parquet"], counts=stats,
                                 code=common.code_version(f"stages.{STAGE}"),
                                 extra={"minhash": sigs.minhash_params, "band_ranges": len(edge_paths)})


def all_band_edges(sigs_dir: str | Path, edges_dir: str | Path, p: dict) -> list[Path]:
    """The edges of every range of dedup.band_shards, one after the other; returns their paths."""
    n_bands = SigsShards(sigs_dir, []).minhash_params["bands"]
    for name in band_ranges(n_bands, int(p["band_shards"])):
        band_edges(sigs_dir, name, edges_dir, p)
    return edge_paths(edges_dir, n_bands, int(p["band_shards"]))


def dedup_index(sigs_dir: str | Path, output_dir: str | Path, p: dict) -> dict:
    """The single-job path: every range's edges into output_dir/edges, then the merge."""
    return merge_edges(sigs_dir, all_band_edges(sigs_dir, Path(output_dir) / "edges", p), output_dir, p)


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
    index = sub.add_parser("index", help="edges of every band range, then the merge, in one process")
    index.add_argument("--output-dir", required=True, help="artifacts/<scale>/dedup_index")
    edges = sub.add_parser("edges", help="verified LSH edges of a band range (one job per range)")
    edges.add_argument("--output-dir", required=True, help="artifacts/<scale>/dedup_edges")
    edges.add_argument("--bands", default=None, help="one range LO-HI (bands LO..HI-1, a name from band_ranges); "
                                                     "every range of dedup.band_shards when omitted")
    merge = sub.add_parser("merge", help="connected components over every range's edges -> duplicates.parquet")
    merge.add_argument("--edges-dir", required=True, help="artifacts/<scale>/dedup_edges")
    merge.add_argument("--output-dir", required=True, help="artifacts/<scale>/dedup_index")
    for parser in (index, edges, merge):
        parser.add_argument("--sigs-dir", required=True, help="artifacts/<scale>/filter/sigs")
    apply = sub.add_parser("apply", help="drop the listed duplicates from filter/kept shards")
    apply.add_argument("--input-dir", required=True, help="artifacts/<scale>/filter/kept")
    apply.add_argument("--index", required=True, help="artifacts/<scale>/dedup_index/duplicates.parquet")
    apply.add_argument("--output-dir", required=True, help="artifacts/<scale>/dedup")
    apply.add_argument("--shard", default=None, help="one shard name (file stem); all shards when omitted")
    for parser in (index, edges, merge, apply):
        # --params / --params-json may follow the subcommand too; SUPPRESS keeps the top-level value otherwise.
        parser.add_argument("--params", default=argparse.SUPPRESS, help="params.yaml to resolve by its `scale`")
        parser.add_argument("--params-json", default=argparse.SUPPRESS, help="resolved slices as JSON, {stage: slice}")
    args = ap.parse_args()
    try:
        p = common.resolve_cli_params(args, STAGE)
        if args.command == "index":
            dedup_index(args.sigs_dir, args.output_dir, p)
        elif args.command == "edges" and args.bands:
            band_edges(args.sigs_dir, args.bands, args.output_dir, p)
        elif args.command == "edges":
            all_band_edges(args.sigs_dir, args.output_dir, p)
        elif args.command == "merge":
            n_bands = SigsShards(args.sigs_dir, []).minhash_params["bands"]
            merge_edges(args.sigs_dir, edge_paths(args.edges_dir, n_bands, int(p["band_shards"])), args.output_dir, p)
        else:
            dedup_shards(args.input_dir, args.index, args.output_dir, p, args.shard)
    except common.StageError as exc:
        common.fail(exc)


if __name__ == "__main__":
    main()
