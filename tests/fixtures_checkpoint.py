"""A micro checkpoint in our on-disk format (Hugging Face Llama weights + the tokenize stage's tokenizer files)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from stages import common

EVAL = common.REPO / "data" / "eval"


def make_checkpoint(out: Path) -> Path:
    """A micro decoder + a BPE tokenizer trained by the tokenize stage on a few eval texts (ChatML template)."""
    from model import ModelConfig, NanbeigeForCausalLM, save_pretrained
    from stages import tokenize
    texts = [json.loads(x)["question"] for x in (EVAL / "tiny_math" / "test.jsonl").read_text().splitlines()[:200]]
    with gzip.open(EVAL / "humaneval" / "HumanEval.jsonl.gz", "rt") as fh:
        texts += [json.loads(x)["prompt"] for x in fh]
    texts += ["Answer: A. Answer: B. Which answer is better, A or B?"] * 5
    tok = tokenize.train_tokenizer(texts, vocab_size=600, min_frequency=2)
    tokenize.save_tokenizer(tok, out)
    cfg = ModelConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                      rope_theta=10000.0, eos_token_id=0)
    torch.manual_seed(0)
    save_pretrained(NanbeigeForCausalLM(cfg), out)
    return out
