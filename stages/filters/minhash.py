"""Signatures for dedup: exact hashes and MinHash (Broder 1997) with LSH bands, over word n-gram shingles.

exact_hash = xxh3-128 of the normalized text (lowercased, punctuation stripped, whitespace collapsed);
MinHash over the word n-gram shingles of that normalized text, h_k(S) = min_{s in S} (a_k * x(s) + b_k) mod p with
p = 2^31 - 1, and LSH band hashes, one per band of `rows` consecutive minima.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import xxhash

from stages import common
from stages.filters.base import POLY

MERSENNE_31 = np.uint64((1 << 31) - 1)
POLY_INV = pow(POLY, -1, 1 << 64)
BAND_POLY = np.uint64(0x9E3779B97F4A7C15)
# Bytes per shingling pass and shingles per MinHash slab: bound the temporary arrays, not the shard.
SHINGLE_CHUNK_BYTES = 1 << 20
MINHASH_SLAB_ROWS = 8192
PUNCTUATION_RE = re.compile(r"[^\w\s]")


def normalize_for_dedup(text: str) -> str:
    """Lowercased, punctuation stripped, whitespace collapsed to single spaces: trivial variants collide."""
    return " ".join(PUNCTUATION_RE.sub("", text.lower()).split())


def exact_hash(normalized: str) -> str:
    return xxhash.xxh3_128_hexdigest(normalized.encode("utf-8"))


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: every input bit flips about half the output bits."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _powers(base: int, n: int) -> np.ndarray:
    """base^k mod 2^64 for k < n (numpy integer products wrap mod 2^64)."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, dtype=np.uint64)


def _mod_mersenne_31(v: np.ndarray) -> np.ndarray:
    """v mod p for p = 2^31 - 1 and v < 2^62, without division: 2^31 = 1 (mod p), so v = (v & p) + (v >> 31)
    (mod p); two folds bring v below p + 1, one subtraction below p."""
    shift = np.uint64(31)
    r = (v & MERSENNE_31) + (v >> shift)
    r = (r & MERSENNE_31) + (r >> shift)
    return np.where(r >= MERSENNE_31, r - MERSENNE_31, r)


def shingle_hashes(normalized: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes x(s) in [0, p) of every word n-gram shingle s of each normalized text, and the owning text's index.

    Vectorized over the whole list: texts are joined by newlines, a shingle is the byte span from the start of
    word i to the end of word i+n-1 of the same text, hashed as fmix64(sum_k byte_k * POLY^k mod 2^64) mod p via
    prefix sums (POLY is odd, so a span's hash is shifted to position 0 by POLY^-start). A text with fewer than n
    words has one shingle, all its words; an empty text has none."""
    data = "\n".join(normalized).encode("utf-8")
    if not data.strip():
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    b = np.frombuffer(data, np.uint8)
    sep = (b == 0x20) | (b == 0x0A)
    word_start = np.flatnonzero(~sep & np.concatenate(([True], sep[:-1])))
    word_end = np.flatnonzero(~sep & np.concatenate((sep[1:], [True]))) + 1
    word_doc = np.searchsorted(np.flatnonzero(b == 0x0A), word_start)

    last = np.arange(len(word_start)) + ngram - 1
    full = np.flatnonzero(last < len(word_start))
    full = full[word_doc[last[full]] == word_doc[full]]
    words_per_doc = np.bincount(word_doc, minlength=len(normalized))
    short_docs = np.flatnonzero((words_per_doc > 0) & (words_per_doc < ngram))
    doc_first_word = np.concatenate(([0], np.cumsum(words_per_doc)))[:-1]
    span_start = np.concatenate((word_start[full], word_start[doc_first_word[short_docs]]))
    span_end = np.concatenate((word_end[full + ngram - 1],
                               word_end[doc_first_word[short_docs] + words_per_doc[short_docs] - 1]))
    span_doc = np.concatenate((word_doc[full], short_docs))
    order = np.argsort(span_doc, kind="stable")
    span_start, span_end, span_doc = span_start[order], span_end[order], span_doc[order]

    prefix = np.concatenate((np.zeros(1, np.uint64), np.cumsum(b * _powers(POLY, len(b)), dtype=np.uint64)))
    h = (prefix[span_end] - prefix[span_start]) * _powers(POLY_INV, len(b))[span_start]
    return _mod_mersenne_31(_fmix64(h) >> np.uint64(2)), span_doc


def minhash_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a_k, b_k), k < num_perm, drawn from the seed: a_k in [1, p), b_k in [0, p), so a_k x + b_k < 2^62 for x < p."""
    rng = np.random.default_rng(seed)
    p = int(MERSENNE_31)
    a = rng.integers(1, p, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, p, size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signatures(normalized: list[str], mp: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(signatures (D, num_perm) uint64, has_shingles (D,) bool): h_k(S_d) = min_{s in S_d} (a_k x(s) + b_k) mod p;
    a document without shingles keeps the all-ones signature and has_shingles False."""
    a, b = minhash_permutations(mp["num_perm"], seed)
    sig = np.full((len(normalized), mp["num_perm"]), np.iinfo(np.uint64).max, dtype=np.uint64)
    has = np.zeros(len(normalized), bool)
    lo = 0
    while lo < len(normalized):
        hi, size = lo, 0
        while hi < len(normalized) and (hi == lo or size + len(normalized[hi]) <= SHINGLE_CHUNK_BYTES):
            size += len(normalized[hi]) + 1
            hi += 1
        x, doc = shingle_hashes(normalized[lo:hi], mp["ngram"])
        doc = doc + lo
        has[doc] = True
        for r0 in range(0, len(x), MINHASH_SLAB_ROWS):
            xs, ds = x[r0: r0 + MINHASH_SLAB_ROWS], doc[r0: r0 + MINHASH_SLAB_ROWS]
            values = _mod_mersenne_31(xs[:, None] * a[None, :] + b[None, :])
            group = np.flatnonzero(np.concatenate(([True], ds[1:] != ds[:-1])))
            docs = ds[group]
            sig[docs] = np.minimum(sig[docs], np.minimum.reduceat(values, group, axis=0))
        lo = hi
    return sig, has


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(D, bands) uint64: band j's hash folds its rows' minima, fmix64(... fmix64(j * C + m_1) * C + m_2 ...)."""
    h = np.broadcast_to(np.arange(bands, dtype=np.uint64), (len(sig), bands)).copy()
    blocks = sig[:, : bands * rows].reshape(len(sig), bands, rows)
    for r in range(rows):
        h = _fmix64(h * BAND_POLY + blocks[:, :, r])
    return h


def minhash_params(p: dict) -> dict:
    """The MinHash settings signatures depend on (recorded with them): num_perm, bands, rows, ngram, seed."""
    mp = {k: int(p["minhash"][k]) for k in ("num_perm", "bands", "rows", "ngram")}
    if mp["bands"] * mp["rows"] > mp["num_perm"]:
        raise common.StageError(f"params filter.minhash: bands * rows = {mp['bands'] * mp['rows']} "
                                f"> num_perm = {mp['num_perm']}")
    mp["seed"] = int(p["seed"])
    return mp


def sigs_schema(mp: dict, store_signature: bool) -> pa.Schema:
    fields = [("id", pa.string()), ("shard", pa.string()), ("row", pa.int64()), ("approx_tokens", pa.int64()),
              ("exact_hash", pa.string()), ("bands", pa.list_(pa.uint64()))]
    if store_signature:
        fields.append(("minhash", pa.list_(pa.uint32())))
    # The MinHash params travel with the signatures, so dedup_index can refuse shards that cannot be compared.
    return pa.schema(fields, metadata={b"minhash": json.dumps(mp, sort_keys=True).encode()})


def _list_column(matrix: np.ndarray, keep: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """Row i of `matrix` as a list, or an empty list where keep[i] is False."""
    lengths = np.where(keep, matrix.shape[1], 0)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    values = matrix[keep].ravel().astype(value_type.to_pandas_dtype())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, value_type))


def signature_table(batch: pa.RecordBatch, shard: str, first_row: int, mp: dict, store_signature: bool) -> pa.Table:
    """Sigs rows for the kept documents in `batch`, numbered from `first_row` within the kept shard."""
    texts = batch.column("text").to_pylist()
    normalized = [normalize_for_dedup(t) for t in texts]
    sig, has = minhash_signatures(normalized, mp, mp["seed"])
    columns = {
        "id": batch.column("id"),
        "shard": pa.array([shard] * len(normalized), pa.string()),
        "row": pa.array(np.arange(first_row, first_row + len(normalized), dtype=np.int64)),
        "approx_tokens": batch.column("approx_tokens").cast(pa.int64()),
        # Text that normalizes to nothing (punctuation only) is compared as written, not as the empty string.
        "exact_hash": pa.array([exact_hash(n or raw) for n, raw in zip(normalized, texts)], pa.string()),
        "bands": _list_column(band_hashes(sig, mp["bands"], mp["rows"]), has, pa.uint64()),
    }
    if store_signature:
        columns["minhash"] = _list_column(sig, has, pa.uint32())  # values < p = 2^31 - 1
    return pa.Table.from_pydict(columns, schema=sigs_schema(mp, store_signature))
