"""A micro selected pool, held-out sets, tokenized streams, plan and model for the tokenize / pretrain tests."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow as pa

from stages import common

SYLLABLES = ["ka", "lo", "mi", "ne", "ta", "ri", "su", "po", "an", "el", "or", "ix", "ün", "数", "学"]
POOL_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()), ("text", pa.string()),
                         ("n_chars", pa.int64()), ("approx_tokens", pa.int64()), ("utility", pa.int64()),
                         ("bucket", pa.string()), ("recalled", pa.bool_())])
BUCKETS = {"top/math": "math", "top/general": "web", "pool/general": "web"}
TOKENIZE_PARAMS = {"vocab_size": 320, "sample_chars": 200_000, "min_frequency": 2, "encode_batch_docs": 16,
                   "seed": 7, "scale": "tiny"}
MODEL_PARAMS = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 32,
                "rope_theta": 10000.0, "seed": 7, "scale": "tiny"}
PRETRAIN_PARAMS = {"schedule": "fgwsd", "seq_len": 16, "batch_size": 2, "grad_accum": 2, "adam_betas": [0.9, 0.95],
                   "adam_eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0, "checkpoint_every": 3, "log_every": 2,
                   "eval_tokens": 256, "eval_batch_size": 4, "optimizer": "adamw", "progress_every_steps": 4,
                   "progress_every_s": 60.0, "min_phase_steps": 1, "seed": 7, "scale": "tiny"}


def text(rng: random.Random, words: int) -> str:
    parts = []
    for _ in range(words):
        parts.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))))
        if rng.random() < 0.1:
            parts.append(str(rng.randint(0, 999)) + ".")
    if rng.random() < 0.2:
        parts.append("<|im_start|>")  # a special token's text inside a document stays plain text
    return " ".join(parts)


def make_pool(directory: Path, docs_per_shard: int = 40, shards: int = 2, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for s in range(shards):
        rows = []
        for i in range(docs_per_shard):
            bucket = list(BUCKETS)[(i + s) % len(BUCKETS)]
            t = text(rng, rng.randint(5, 60))
            rows.append({"id": common.content_id(t), "source": f"unit{s}", "domain": BUCKETS[bucket], "text": t,
                         "n_chars": len(t), "approx_tokens": math.ceil(len(t.encode()) / 4), "utility": 6,
                         "bucket": bucket, "recalled": False})
        common.write_table(directory / f"shard{s}.parquet", common.rows_to_table(rows, POOL_SCHEMA))
    return directory


def make_heldout(directory: Path, seed: int = 1) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("hq", "math"):
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for _ in range(8):
                fh.write(json.dumps({"text": text(rng, 30)}, ensure_ascii=False) + "\n")
    return directory


def make_tokens(tmp: Path) -> Path:
    """Pool + held-out -> artifacts of the tokenize stage in tmp/tokenize."""
    from stages.tokenize import run_tokenize
    run_tokenize(make_pool(tmp / "pool"), make_heldout(tmp / "heldout"), tmp / "tokenize", dict(TOKENIZE_PARAMS))
    return tmp / "tokenize"


def micro_plan(tokens_per_phase: tuple[int, ...] = (128, 256, 256, 192)) -> dict:
    """Four FG-WSD phases; decay doubles seq_len and the RoPE base; mixtures shift toward top/math."""
    peak, final = 3e-3, 1e-4
    warm, div, hq, decay = tokens_per_phase
    return {"total_tokens": sum(tokens_per_phase), "lr_peak": peak, "lr_final": final,
            "buckets": {b: 1000 for b in BUCKETS},
            "phases": [
                {"name": "warmup", "stage": "warmup", "tokens": warm, "lr_start": 0.0, "lr_end": peak,
                 "lr_shape": "linear", "seq_len_scale": 1.0, "rope_theta_scale": 1.0,
                 "mixture": {"pool/general": 0.5, "top/general": 0.5}},
                {"name": "diversity_stable", "stage": "diversity_stable", "tokens": div, "lr_start": peak,
                 "lr_end": peak, "lr_shape": "constant", "seq_len_scale": 1.0, "rope_theta_scale": 1.0,
                 "mixture": {"pool/general": 0.5, "top/general": 0.3, "top/math": 0.2}},
                {"name": "hq_stable", "stage": "hq_stable", "tokens": hq, "lr_start": peak, "lr_end": peak,
                 "lr_shape": "constant", "seq_len_scale": 1.0, "rope_theta_scale": 1.0,
                 "mixture": {"top/general": 0.6, "top/math": 0.4}},
                {"name": "decay", "stage": "decay", "tokens": decay, "lr_start": peak, "lr_end": final,
                 "lr_shape": "linear", "seq_len_scale": 2.0, "rope_theta_scale": 4.0,
                 "mixture": {"top/general": 0.3, "top/math": 0.7}},
            ]}


def write_plan(path: Path, plan: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan or micro_plan()))
    return path
