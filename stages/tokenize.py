"""Tokenize: train the byte-level BPE tokenizer, then pack every bucket of the selected pool into its own stream.

One stream per bucket (not per phase): the FG-WSD mixture switches at phase boundaries inside pretrain, decoupled
from the LR, so the FG-WSD / WSD / cosine ablation reruns only pretrain, never tokenize.

Outputs under artifacts/<scale>/tokenize/:
  tokenizer/            tokenizer.json + tokenizer_config.json (ChatML chat_template) + special_tokens_map.json,
                        loadable by transformers' AutoTokenizer / PreTrainedTokenizerFast
  buckets/<b>.bin       the bucket's documents in a seeded shuffle, each followed by <|endoftext|>, as flat token ids
                        (uint16 when every id fits, else uint32); `b` is the bucket name with "/" -> "__"
  buckets/<b>.idx.npy   int64 document offsets into the .bin: doc i is bin[idx[i]:idx[i+1]] (n_docs + 1 entries)
  heldout/<name>.bin    the held-out eval texts (data/heldout/<name>.jsonl, file order), same layout
  manifest.json         tokens per bucket / source / domain, dtype, vocab size, special token ids, hashes
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from array import array
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from stages import common

STAGE = "tokenize"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Ids 0..5 in this order: documents end with id 0 at every scale.
SPECIAL_TOKENS = [EOS, *CHAT_TOKENS, PAD]
# Qwen2-style pre-tokenization: single digits (numbers tokenize uniformly, which helps arithmetic), letters with
# one leading non-letter, punctuation runs, newlines, whitespace; then GPT-2 byte-level mapping (no unknown bytes).
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# ChatML; an assistant turn's optional `reasoning_content` is rendered as <think>...</think> before the answer.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and message.reasoning_content is defined and message.reasoning_content %}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
POOL_COLUMNS = ["id", "source", "domain", "text", "bucket"]


# ----------------------------------------------------------------------------- names and dtypes

def bucket_filename(bucket: str) -> str:
    """File stem of a bucket's stream: "top/math" -> "top__math"."""
    return bucket.replace("/", "__")


def stream_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id (< vocab_size) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def read_stream(bin_path: str | Path, dtype: str | np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A packed stream as (read-only memmap of token ids, int64 document offsets)."""
    bin_path = Path(bin_path)
    tokens = np.memmap(bin_path, dtype=np.dtype(dtype), mode="r")
    offsets = np.load(bin_path.with_suffix(".idx.npy"))
    if offsets[-1] != len(tokens):
        raise common.StageError(f"{bin_path}: index ends at {offsets[-1]} but the stream holds {len(tokens)} tokens")
    return tokens, offsets


def _uniform(seed: int, key: str) -> int:
    """A 64-bit hash of (seed, key): the seeded, input-order-independent draw behind sampling and shuffling."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")


# ----------------------------------------------------------------------------- the tokenizer

def pool_shards(pool_dir: str | Path) -> list[Path]:
    pool_dir = Path(pool_dir)
    shards = [pool_dir / f"{name}.parquet" for name in common.list_shards(pool_dir)]
    for shard in shards:
        missing = {*POOL_COLUMNS, "n_chars"} - set(pq.ParquetFile(shard).schema_arrow.names)
        if missing:
            raise common.StageError(f"{shard}: pool shard lacks columns {sorted(missing)}")
    return shards


def sample_texts(shards: list[Path], sample_chars: int, seed: int) -> Iterator[str]:
    """The tokenizer's training sample: each document is kept when hash(seed, id) / 2^64 < sample_chars / total_chars,
    shards in name order, until sample_chars characters; streaming, and independent of how the pool is sharded."""
    total = sum(int(pq.read_table(s, columns=["n_chars"]).column(0).to_numpy().sum()) for s in shards)
    threshold = min(1.0, sample_chars / max(total, 1)) * 2 ** 64
    taken = 0
    for shard in shards:
        for batch in common.iter_batches(shard, columns=["id", "text"]):
            for row in batch:
                if _uniform(seed, row["id"]) < threshold:
                    yield row["text"]
                    taken += len(row["text"])
                    if taken >= sample_chars:
                        return


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int):
    """Byte-level BPE over the Qwen2-style pre-tokenizer, special tokens first (ids 0..5)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise common.StageError(
            f"tokenize: trained {tok.get_vocab_size()} tokens, not tokenize.vocab_size={vocab_size}: the sample has "
            f"too few distinct merges; raise tokenize.sample_chars or lower tokenize.vocab_size")
    return tok


def save_tokenizer(tok, out_dir: str | Path) -> list[Path]:
    """Write the Hugging Face tokenizer files (ours, not save_pretrained's: stable bytes, readable by transformers
    4.x and 5.x alike) atomically."""
    out_dir = Path(out_dir)
    special_map = {"eos_token": EOS, "pad_token": PAD, "additional_special_tokens": CHAT_TOKENS}
    config = {**special_map, "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "unk_token": None,
              "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 30}
    paths = [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json", out_dir / "special_tokens_map.json"]
    common.write_text(paths[0], tok.to_str(pretty=True))
    common.write_json(paths[1], config)
    common.write_json(paths[2], special_map)
    return paths


def load_tokenizer(tokenizer_dir: str | Path):
    """The trained tokenizer for packing data: special-token strings inside a document are encoded as plain text,
    so only the eos this stage appends is ever a special id."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    tok.encode_special_tokens = True
    return tok


def special_token_ids(tok) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


# ----------------------------------------------------------------------------- packing

def _encode(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def _write_array(path: Path, arr: np.ndarray) -> None:
    with common.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def encode_pool(shards: list[Path], tok, out_dir: Path, seed: int, batch_docs: int, dtype: np.dtype) -> dict:
    """Pack each bucket into out_dir/<bucket>.bin + .idx.npy, its documents ordered by hash(seed, id).

    Streams: each document is encoded once and appended to its bucket's unshuffled scratch file; the shuffle then
    copies documents out of a memmap of that file, holding only (key, offset, length) per document in memory."""
    eos = tok.token_to_id(EOS)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.unshuffled"):
        stale.unlink()
    scratch: dict[str, tuple[Path, object]] = {}
    keys: dict[str, array] = {}
    offsets: dict[str, array] = {}
    tokens_by = {"bucket": Counter(), "source": Counter(), "domain": Counter()}
    docs_by_bucket: Counter = Counter()
    n_docs = sum(common.count_rows(s) for s in shards)
    with tqdm(total=n_docs, desc="tokenize pool", unit="doc", file=sys.stderr, disable=None) as bar:
        for shard in shards:
            for batch in common.iter_batches(shard, columns=POOL_COLUMNS, batch_size=batch_docs):
                for row, ids in zip(batch, _encode(tok, [r["text"] for r in batch])):
                    bucket = row["bucket"]
                    if bucket not in scratch:
                        path = out_dir / f".{bucket_filename(bucket)}.unshuffled"
                        scratch[bucket] = (path, open(path, "wb"))
                        keys[bucket], offsets[bucket] = array("Q"), array("Q", [0])
                    ids.append(eos)
                    scratch[bucket][1].write(np.asarray(ids, dtype=dtype).tobytes())
                    keys[bucket].append(_uniform(seed, row["id"]))
                    offsets[bucket].append(offsets[bucket][-1] + len(ids))
                    for col in ("bucket", "source", "domain"):
                        tokens_by[col][row[col]] += len(ids)
                    docs_by_bucket[bucket] += 1
                bar.update(len(batch))
    streams = {}
    for bucket in sorted(scratch):
        path, fh = scratch[bucket]
        fh.close()
        streams[bucket] = _shuffle_stream(path, out_dir / f"{bucket_filename(bucket)}.bin", dtype,
                                          np.frombuffer(keys[bucket], dtype=np.uint64),
                                          np.frombuffer(offsets[bucket], dtype=np.uint64).astype(np.int64))
        path.unlink()
    return {"streams": streams, "tokens_per_bucket": dict(sorted(tokens_by["bucket"].items())),
            "tokens_per_source": dict(sorted(tokens_by["source"].items())),
            "tokens_per_domain": dict(sorted(tokens_by["domain"].items())),
            "docs_per_bucket": dict(sorted(docs_by_bucket.items()))}


def _shuffle_stream(scratch: Path, final: Path, dtype: np.dtype, keys: np.ndarray, offsets: np.ndarray,
                    chunk_tokens: int = 1 << 22) -> dict:
    """Copy documents from `scratch` into `final` in ascending key order (ties keep input order)."""
    src = np.memmap(scratch, dtype=dtype, mode="r")
    order = np.argsort(keys, kind="stable")
    lengths = np.diff(offsets)[order]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    with common.atomic_path(final) as tmp, open(tmp, "wb") as fh:
        pending, size = [], 0
        for doc in order:
            piece = src[offsets[doc]:offsets[doc + 1]]
            pending.append(piece)
            size += len(piece)
            if size >= chunk_tokens:
                fh.write(np.concatenate(pending).tobytes())
                pending, size = [], 0
        if pending:
            fh.write(np.concatenate(pending).tobytes())
    del src
    _write_array(final.with_suffix(".idx.npy"), new_offsets)
    return {"bin": final, "idx": final.with_suffix(".idx.npy"), "tokens": int(new_offsets[-1]), "docs": len(order)}


def read_heldout(path: Path) -> Iterator[str]:
    """Texts of a held-out jsonl file; a bad line is a StageError naming file and line."""
    for _, record in common.iter_jsonl(path, text_field="text"):
        yield record["text"]


def encode_heldout(path: Path, tok, final: Path, batch_docs: int, dtype: np.dtype) -> dict:
    """Pack a held-out jsonl in file order (no shuffle: eval reads it whole), each text followed by eos."""
    eos = tok.token_to_id(EOS)
    offsets = [0]
    with common.atomic_path(final) as tmp, open(tmp, "wb") as fh:
        batch: list[str] = []
        for text in [*read_heldout(path), None]:
            if text is not None:
                batch.append(text)
            if batch and (text is None or len(batch) == batch_docs):
                for ids in _encode(tok, batch):
                    ids.append(eos)
                    fh.write(np.asarray(ids, dtype=dtype).tobytes())
                    offsets.append(offsets[-1] + len(ids))
                batch = []
    if len(offsets) == 1:
        raise common.StageError(f"{path}: held-out file holds no texts")
    _write_array(final.with_suffix(".idx.npy"), np.asarray(offsets, dtype=np.int64))
    return {"bin": final, "idx": final.with_suffix(".idx.npy"), "tokens": offsets[-1], "docs": len(offsets) - 1}


# ----------------------------------------------------------------------------- the stage

def run_tokenize(pool_dir: str | Path, heldout_dir: str | Path, output_dir: str | Path, p: dict) -> dict:
    """Train the tokenizer on a seeded sample of the pool, pack every bucket and every held-out set; manifest last."""
    out = Path(output_dir)
    heldout_files = sorted(Path(heldout_dir).glob("*.jsonl"))
    if not heldout_files:
        raise common.StageError(f"{heldout_dir}: no held-out *.jsonl files")
    shards = pool_shards(pool_dir)
    vocab_size = int(p["vocab_size"])
    tok = train_tokenizer(sample_texts(shards, int(p["sample_chars"]), int(p["seed"])), vocab_size,
                          int(p["min_frequency"]))
    tokenizer_files = save_tokenizer(tok, out / "tokenizer")
    tok = load_tokenizer(out / "tokenizer")
    dtype = stream_dtype(vocab_size)
    packed = encode_pool(shards, tok, out / "buckets", int(p["seed"]), int(p["encode_batch_docs"]), dtype)
    heldout = {f.stem: encode_heldout(f, tok, out / "heldout" / f"{f.stem}.bin", int(p["encode_batch_docs"]), dtype)
               for f in heldout_files}

    def rel(stream: dict) -> dict:
        return {**stream, "bin": str(stream["bin"].relative_to(out)), "idx": str(stream["idx"].relative_to(out))}

    files = [*tokenizer_files, *(s[k] for group in (packed["streams"], heldout) for s in group.values()
                                 for k in ("bin", "idx"))]
    counts = {"vocab_size": vocab_size, "tokens": sum(packed["tokens_per_bucket"].values()),
              "docs": sum(packed["docs_per_bucket"].values()),
              **{k: packed[k] for k in ("tokens_per_bucket", "docs_per_bucket", "tokens_per_source",
                                        "tokens_per_domain")},
              "heldout_tokens": {name: s["tokens"] for name, s in heldout.items()}}
    extra = {"dtype": dtype.name, "vocab_size": vocab_size, "special_tokens": special_token_ids(tok),
             "tokenizer_dir": "tokenizer",
             "buckets": {b: rel(s) for b, s in packed["streams"].items()},
             "heldout": {name: rel(s) for name, s in heldout.items()}}
    return common.write_manifest(out / "manifest.json", stage=STAGE, params=p,
                                 inputs=[*shards, *heldout_files], outputs=files, counts=counts,
                                 code=common.code_version(f"stages.{STAGE}"), extra=extra)


def copy_tokenizer_files(tokens_dir: str | Path, dest: str | Path) -> list[Path]:
    """Copy the tokenizer files next to a checkpoint so it loads standalone in transformers."""
    src = Path(tokens_dir) / "tokenizer"
    copied = []
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        with common.atomic_path(Path(dest) / name) as tmp:
            shutil.copyfile(src / name, tmp)
        copied.append(Path(dest) / name)
    return copied


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--pool-dir", required=True, help="the selected pool: artifacts/<scale>/select/pool")
    ap.add_argument("--heldout", required=True, help="directory of held-out eval *.jsonl files (records with text)")
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args()
    try:
        p = common.resolve_cli_params(args, STAGE)
        manifest = run_tokenize(args.pool_dir, args.heldout, args.output_dir, p)
    except common.StageError as exc:
        common.fail(exc)
    c = manifest["counts"]
    print(f"tokenize: vocab {c['vocab_size']}, {c['tokens']} tokens in {len(c['tokens_per_bucket'])} buckets, "
          f"held-out {c['heldout_tokens']}")


if __name__ == "__main__":
    main()
