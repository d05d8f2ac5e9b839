"""Training-step and tokenizer throughput: ours vs a nanoGPT-style reference and vs tiktoken, in the same run.

A benchmark script, never a timed test. `python bench/bench_train.py [--shapes tiny,small] [--steps N] [--out DIR]`:

1. Train step, per shape (the `model` slice of params.yaml at that scale). Ours: NanbeigeForCausalLM +
   stages.pretrain.build_optimizer (AdamW over param_groups) + stages.pretrain.train_step (forward, fp32 loss,
   backward, clip, step). Reference: ReferenceGPT below, a nanoGPT-style model of the same shape: one fused qkv
   projection, GQA expanded (k and v heads repeated to the query heads before SDPA, HF's repeat_kv), a fused
   gate|up SwiGLU of the same size, torch's RMSNorm, RoPE (no learned positions), untied lm_head: the same
   parameter count and FLOPs. Its init draws the same random stream in the same order as ours, so at step 0 both
   compute the same function (equal first losses: a check that the shapes match). Its step is nanoGPT's: loss,
   backward, clip, AdamW (nanoGPT's groups: decay on every >= 2-D tensor), zero_grad. Both in fp32 with the same
   batch, seq_len, torch threads and deterministic-algorithms setting as pretrain on CPU; `warmup` steps are
   excluded and tokens/s = batch x seq_len / median step time over every measured step of --rounds processes per
   side, run in ABBA order. Each process runs one side of one shape, so peaks do not mix: peak RSS is that
   process's ru_maxrss (os.wait4), the delta is over its RSS after imports, before the model is built (the highest
   over the side's processes is reported). Then (unless --no-profile) one
   step of each side runs under torch.profiler, and the top ops by self CPU time say what makes one side faster.
   FLOPs/token = 6 N + 12 L H D T (N: non-embedding-table parameters incl. lm_head; nanoGPT/PaLM's estimate).
2. Tokenizer encode, single-threaded, on the same text (the tiny pool, else data/corpus through stages.ingest's
   readers): ours (tokenizers.Tokenizer.encode_batch in encode_batch_docs batches, as stages.tokenize packs),
   transformers' PreTrainedTokenizerFast (the Python wrapper over the same Rust tokenizer) and tiktoken built from
   OUR vocabulary (ranks = our token ids, our pre-tokenizer regex), so all three must give the same ids.

Figures on a shared 2-core machine are noisy. Writes OUT/bench_train.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import ModelConfig, NanbeigeForCausalLM  # noqa: E402  (the repo root is put on the path just above)
from stages import common  # noqa: E402
from stages.pretrain import build_optimizer, train_step  # noqa: E402

# Per shape: the batch and context each step trains on. tiny is pretrain's tiny setting; small is cut to a short
# context and a small batch so a 126M-parameter step fits a 2-core CPU in seconds.
SHAPES = {
    "tiny": {"batch_size": 16, "seq_len": 256, "warmup": 2, "steps": 10},
    "small": {"batch_size": 2, "seq_len": 128, "warmup": 1, "steps": 3},
}
LR = 1e-4
PROFILE_TOP_OPS = 12
TOKENIZER_REPEATS = 3
DEFAULT_TOKENIZER_DIR = REPO / "artifacts" / "tiny" / "tokenize" / "tokenizer"
DEFAULT_POOL_DIR = REPO / "artifacts" / "tiny" / "select" / "pool"
DEFAULT_CORPUS_DIR = REPO / "data" / "corpus"
# Fixed threads on both sides; the tokenizers' Rust pools are serial too; no hub, ever.
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}


# ----------------------------------------------------------------------------- the nanoGPT-style reference

def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate_half layout: x cos + [-x2, x1] sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, (self.n_head + 2 * self.n_kv) * self.hd, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=2)
        q = q.view(b, t, self.n_head, self.hd).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # GQA expanded: every query head gets its own copy of its k/v head.
        k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class ReferenceGPT(nn.Module):
    """nanoGPT's GPT with Llama's parts, for a ModelConfig; forward(idx, targets) returns the mean CE loss."""

    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        # nanoGPT's init (N(0, 0.02), residual projections / sqrt(2 L)) in our parameter order: the same weights.
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx)
        for block in self.h:
            x = block(x, self.cos[:t], self.sin[:t])
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def reference_optimizer(model, p: dict):
    """nanoGPT's configure_optimizers on CPU: AdamW, decay on every >= 2-D tensor (embeddings included), foreach."""
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": float(p["weight_decay"])},
                              {"params": no_decay, "weight_decay": 0.0}], lr=LR,
                             betas=tuple(float(b) for b in p["adam_betas"]), eps=float(p["adam_eps"]), foreach=True)


def reference_step(model, optimizer, batch, grad_clip: float) -> float:
    """nanoGPT's training iteration with one micro-step: loss, backward, clip, step, zero_grad."""
    loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# ----------------------------------------------------------------------------- train-step worker

def flops_per_token(cfg, seq_len: int) -> int:
    """6 N + 12 L H D T: N counts every matmul weight (lm_head in, the embedding lookup out); causal attention is
    counted in full, as nanoGPT's estimate_mfu does."""
    n = cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def build_side(impl: str, cfg, pretrain_p: dict):
    """(model, step(batch) -> loss) for one side."""
    if impl == "ours":
        model = NanbeigeForCausalLM(cfg)
        optimizer = build_optimizer(model, pretrain_p, torch.device("cpu"))
        return model, lambda batch: train_step(model, optimizer, batch, LR, pretrain_p, torch.device("cpu"))
    if impl == "reference":
        model = ReferenceGPT(cfg)
        optimizer = reference_optimizer(model, pretrain_p)
        return model, lambda batch: reference_step(model, optimizer, batch, float(pretrain_p["grad_clip"]))
    raise ValueError(f"unknown impl {impl!r} (ours | reference)")


def train_throughput(spec: dict) -> dict:
    """Median step time of `steps` optimizer steps after `warmup`, on fresh random batches (drawn outside timing).

    spec: impl, model (the `model` slice), pretrain (the `pretrain` slice), batch_size, seq_len, warmup, steps,
    threads, seed, profile (also run one profiled step)."""
    import psutil
    torch.set_num_threads(int(spec["threads"]))
    # What pretrain sets on CPU; on both sides, so neither pays for it alone.
    torch.use_deterministic_algorithms(True)
    cfg = ModelConfig.from_params(spec["model"])
    pretrain_p = {**spec["pretrain"], "batch_size": spec["batch_size"], "grad_accum": 1}
    rss_base = psutil.Process().memory_info().rss
    torch.manual_seed(int(spec["seed"]))
    model, step = build_side(spec["impl"], cfg, pretrain_p)
    model.train()
    gen = torch.Generator().manual_seed(int(spec["seed"]))
    shape = (int(spec["batch_size"]), int(spec["seq_len"]) + 1)
    times, losses = [], []
    for i in range(int(spec["warmup"]) + int(spec["steps"])):
        batch = torch.randint(cfg.vocab_size, shape, generator=gen)
        began = time.perf_counter()
        loss = step(batch)
        if i >= int(spec["warmup"]):
            times.append(time.perf_counter() - began)
        losses.append(loss)
    tokens = shape[0] * (shape[1] - 1)
    median = statistics.median(times)
    out = {"impl": spec["impl"], "parameters": sum(p.numel() for p in model.parameters()),
           "tokens_per_step": tokens, "step_s": times, "median_step_s": median, "tokens_per_s": tokens / median,
           "losses": losses, "rss_base_bytes": rss_base, "torch_threads": torch.get_num_threads()}
    if spec.get("profile"):
        out["profile_top_ops"] = profile_step(step, torch.randint(cfg.vocab_size, shape, generator=gen))
    return out


def profile_step(step, batch) -> list[dict]:
    """The top ops of one step by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count}
            for e in events[:PROFILE_TOP_OPS]]


# ----------------------------------------------------------------------------- tokenizers

def gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode (the ByteLevel pre-tokenizer's alphabet): printable Latin-1 bytes
    map to themselves, the other 68 bytes to U+0100.. in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


def tiktoken_ranks(tokenizer_json: dict) -> tuple[dict[bytes, int], dict[str, int]]:
    """(mergeable_ranks, special_tokens) from a byte-level BPE tokenizer.json: rank = our token id.

    Byte-level BPE adds a merged token after both its parts, so ordering by id is the merges' priority order;
    tiktoken then merges the adjacent pair whose concatenation has the lowest rank, as our BPE does."""
    model = tokenizer_json["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise common.StageError("tiktoken ranks need a byte-level BPE tokenizer.json (no byte_fallback)")
    special = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    decoder = gpt2_byte_decoder()
    ranks = {bytes(decoder[c] for c in token): i for token, i in model["vocab"].items() if token not in special}
    if len(ranks) != len(model["vocab"]) - len(special) or set(range(256)) - {r[0] for r in ranks if len(r) == 1}:
        raise common.StageError("tokenizer.json: vocabulary tokens collide as bytes or miss single bytes")
    return ranks, special


def tiktoken_encoding(tokenizer_dir: str | Path):
    """tiktoken.Encoding over our vocabulary and our pre-tokenizer regex (tiktoken cannot download encodings)."""
    import tiktoken

    from stages.tokenize import PRETOKENIZE_REGEX
    ranks, special = tiktoken_ranks(json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8")))
    return tiktoken.Encoding(name="nanbeige-bench", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks,
                             special_tokens=special)


def load_texts(pool_dir: Path, corpus_dir: Path, max_bytes: int) -> tuple[list[str], str]:
    """Documents in shard order up to max_bytes of UTF-8: the selected pool, else the raw corpus admitted by
    stages.ingest's readers. Returns (texts, where they came from)."""
    texts, size = [], 0
    if pool_dir.is_dir() and common.list_shards(pool_dir):
        where = str(pool_dir)
        docs = (row["text"] for shard in common.list_shards(pool_dir)
                for batch in common.iter_batches(pool_dir / f"{shard}.parquet", columns=["text"]) for row in batch)
    else:
        from stages import ingest
        where = str(corpus_dir)
        p = common.stage_params(common.load_params(), "ingest")
        docs = (row["text"] for name, unit in ingest.list_units(corpus_dir).items()
                for rec in ingest.read_unit(unit, p)
                for status, row in [ingest.admit(rec, name, p)] if status == "kept")
    for text in docs:
        if size >= max_bytes:
            break
        texts.append(text)
        size += len(text.encode("utf-8"))
    if not texts:
        raise common.StageError(f"no text in {pool_dir} nor {corpus_dir}")
    return texts, where


def tokenizer_throughput(spec: dict) -> dict:
    """Encode the same texts with each contender, single-threaded, `repeats` times; median wall time.

    spec: tokenizer_dir, pool_dir, corpus_dir, max_bytes, batch_docs, repeats."""
    from transformers import PreTrainedTokenizerFast

    from stages.tokenize import load_tokenizer
    texts, where = load_texts(Path(spec["pool_dir"]), Path(spec["corpus_dir"]), int(spec["max_bytes"]))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    batch = int(spec["batch_docs"])
    batches = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    ours = load_tokenizer(spec["tokenizer_dir"])
    # split_special_tokens: special-token strings in a document are text, as load_tokenizer makes them for ours.
    hf = PreTrainedTokenizerFast(tokenizer_file=str(Path(spec["tokenizer_dir"]) / "tokenizer.json"),
                                 split_special_tokens=True)
    contenders = {
        "ours_tokenizers_encode_batch": lambda b: [e.ids for e in ours.encode_batch(b, add_special_tokens=False)],
        "transformers_fast_wrapper": lambda b: hf(b, add_special_tokens=False)["input_ids"],
    }
    skipped = {}
    try:
        enc = tiktoken_encoding(spec["tokenizer_dir"])
        contenders["tiktoken_our_ranks"] = lambda b: enc.encode_ordinary_batch(b, num_threads=1)
    except ImportError:
        skipped["tiktoken_our_ranks"] = "tiktoken is not installed"
    results, reference_ids = {}, None
    for name, encode in contenders.items():
        seconds = []
        for _ in range(int(spec["repeats"])):
            began = time.perf_counter()
            ids = [seq for b in batches for seq in encode(b)]
            seconds.append(time.perf_counter() - began)
        reference_ids = ids if reference_ids is None else reference_ids
        n_tokens = sum(map(len, ids))
        median = statistics.median(seconds)
        results[name] = {"seconds": seconds, "median_s": median, "mb_per_s": n_bytes / 1e6 / median,
                         "tokens_per_s": n_tokens / median, "tokens": n_tokens,
                         "docs_differing_from_ours": sum(a != b for a, b in zip(ids, reference_ids))}
    return {"text_source": where, "docs": len(texts), "bytes": n_bytes, "batch_docs": batch,
            "vocab_size": ours.get_vocab_size(), "results": results, "skipped": skipped}


# ----------------------------------------------------------------------------- isolation

WORKERS = {"train": train_throughput, "tokenize": tokenizer_throughput}


def run_isolated(kind: str, spec: dict, threads: int) -> dict:
    """Run WORKERS[kind](spec) in a fresh interpreter; add its peak RSS (ru_maxrss from os.wait4) and wall time."""
    env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO)}
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)],
                            stdout=subprocess.PIPE, env=env, cwd=REPO)
    stdout = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise common.StageError(f"bench worker {kind} {spec.get('impl', '')} failed "
                                f"(exit {os.waitstatus_to_exitcode(status)}); its stderr is above")
    out = json.loads(stdout.decode().strip().splitlines()[-1])
    out["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports kilobytes
    if "rss_base_bytes" in out:
        out["peak_rss_delta_bytes"] = out["peak_rss_bytes"] - out["rss_base_bytes"]
    out["process_wall_s"] = time.perf_counter() - began
    return out


# ----------------------------------------------------------------------------- driver

def shape_spec(params: dict, shape: str, steps: int | None, threads: int) -> dict:
    """A worker spec for one shape: the `model` and `pretrain` slices of params.yaml at that scale + SHAPES."""
    scaled = {**params, "scale": shape}
    model_p = {k: v for k, v in common.stage_params(scaled, "model").items() if k not in ("seed", "scale")}
    run = dict(SHAPES[shape])
    if steps is not None:
        run["steps"] = steps
    return {"model": model_p, "pretrain": common.stage_params(scaled, "pretrain"), "threads": threads,
            "seed": int(params.get("seed", 0)), **run}


def merge_runs(runs: list[dict], flops_per_step: int) -> dict:
    """One side's figures over its runs: the median of every measured step, the highest peak RSS."""
    steps = [t for r in runs for t in r["step_s"]]
    median = statistics.median(steps)
    return {"parameters": runs[0]["parameters"], "tokens_per_step": runs[0]["tokens_per_step"], "step_s": steps,
            "median_step_s": median, "tokens_per_s": runs[0]["tokens_per_step"] / median,
            "gflops_per_s": flops_per_step / median / 1e9, "losses": runs[0]["losses"],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "peak_rss_delta_bytes": max(r["peak_rss_delta_bytes"] for r in runs),
            "runs": [{k: r[k] for k in ("median_step_s", "peak_rss_bytes", "peak_rss_delta_bytes", "process_wall_s")}
                     for r in runs]}


def bench_shape(params: dict, shape: str, steps: int | None, threads: int, rounds: int, profile: bool) -> dict:
    """`rounds` rounds of one process per side, in ABBA order (reference, ours, ours, reference, ...) so a load
    that drifts during the run hits both sides alike; then, with `profile`, one profiled step of each side."""
    spec = shape_spec(params, shape, steps, threads)
    cfg = ModelConfig.from_params(spec["model"])
    runs = {"reference": [], "ours": []}
    for i in range(rounds):
        for impl in ("reference", "ours") if i % 2 == 0 else ("ours", "reference"):
            runs[impl].append(run_isolated("train", {**spec, "impl": impl}, threads))
    flops_per_step = flops_per_token(cfg, spec["seq_len"]) * spec["batch_size"] * spec["seq_len"]
    sides = {impl: merge_runs(r, flops_per_step) for impl, r in runs.items()}
    ratio = sides["ours"]["tokens_per_s"] / sides["reference"]["tokens_per_s"]
    out = {"shape": shape, "config": spec["model"], "batch_size": spec["batch_size"], "seq_len": spec["seq_len"],
           "warmup_steps": spec["warmup"], "measured_steps": spec["steps"], "rounds": rounds, "torch_threads": threads,
           "dtype": "float32", "flops_per_token": flops_per_token(cfg, spec["seq_len"]),
           "analytic_parameters": cfg.num_parameters(), "sides": sides, "ratio_ours_over_reference": ratio}
    if profile:
        # The first (unprofiled) step warms up the allocator and the optimizer state for the profiled one.
        profile_spec = {**spec, "warmup": 0, "steps": 1, "profile": True}
        out["profiles"] = {impl: run_isolated("train", {**profile_spec, "impl": impl}, threads)["profile_top_ops"]
                           for impl in ("reference", "ours")}
    return out


def print_train(r: dict) -> None:
    mb = 1 << 20
    print(f"\n== train step: {r['shape']} ({r['analytic_parameters'] / 1e6:.1f}M params), batch {r['batch_size']} x "
          f"seq_len {r['seq_len']}, fp32, {r['torch_threads']} torch thread(s), median of {r['rounds']} x "
          f"{r['measured_steps']} steps after {r['warmup_steps']} warmup per process")
    print(f"{'side':<10} {'params':>12} {'tokens/s':>10} {'GFLOP/s':>8} {'median s':>9} {'peak RSS MB':>12} "
          f"{'delta MB':>9} {'loss0':>7}")
    for impl, s in r["sides"].items():
        print(f"{impl:<10} {s['parameters']:>12,} {s['tokens_per_s']:>10,.0f} {s['gflops_per_s']:>8.1f} "
              f"{s['median_step_s']:>9.3f} {s['peak_rss_bytes'] / mb:>12,.0f} {s['peak_rss_delta_bytes'] / mb:>9,.0f} "
              f"{s['losses'][0]:>7.3f}")
    print(f"ratio ours/reference tokens/s: {r['ratio_ours_over_reference']:.3f}x (target >= 1.0x)")
    for impl, ops in r.get("profiles", {}).items():
        print(f"  top ops by self CPU, one step, {impl}: " +
              ", ".join(f"{o['op']} {o['self_cpu_ms']:.0f}ms/{o['calls']}" for o in ops[:8]))


def print_tokenizer(t: dict) -> None:
    print(f"\n== tokenizer encode: {t['docs']} docs, {t['bytes'] / 1e6:.2f} MB from {t['text_source']}, vocab "
          f"{t['vocab_size']}, single-threaded, batches of {t['batch_docs']}, median of {TOKENIZER_REPEATS}")
    ours = t["results"]["ours_tokenizers_encode_batch"]
    print(f"{'contender':<30} {'MB/s':>7} {'tokens/s':>11} {'tokens':>9} {'docs != ours':>12} {'ours/this':>9}")
    for name, r in t["results"].items():
        print(f"{name:<30} {r['mb_per_s']:>7.2f} {r['tokens_per_s']:>11,.0f} {r['tokens']:>9,} "
              f"{r['docs_differing_from_ours']:>12} {ours['tokens_per_s'] / r['tokens_per_s']:>9.3f}")
    for name, why in t["skipped"].items():
        print(f"{name}: skipped ({why})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,small", help="comma-separated scales of params.yaml")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per side (default per shape: "
                        + ", ".join(f"{k} {v['steps']}" for k, v in SHAPES.items()) + ")")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--rounds", type=int, default=2, help="processes per side, in ABBA order")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--tokenizer-dir", default=str(DEFAULT_TOKENIZER_DIR))
    parser.add_argument("--pool-dir", default=str(DEFAULT_POOL_DIR))
    parser.add_argument("--corpus-dir", default=str(DEFAULT_CORPUS_DIR))
    parser.add_argument("--text-mb", type=float, default=4.0, help="text encoded by each tokenizer (at most)")
    parser.add_argument("--skip-tokenizer", action="store_true")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled step of each side")
    parser.add_argument("--out", default=str(REPO / "bench" / "out"))
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](json.loads(args.worker[1]))))
        return

    params = common.load_params(args.params)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"--shapes: unknown {unknown} (known: {sorted(SHAPES)})")
    began = time.perf_counter()
    report = {"host": {"cpus": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0], "python": sys.version},
              "train": [], "tokenizer": None}
    for shape in shapes:
        r = bench_shape(params, shape, args.steps, args.threads, args.rounds, not args.no_profile)
        print_train(r)
        report["train"].append(r)
    if not args.skip_tokenizer:
        if not (Path(args.tokenizer_dir) / "tokenizer.json").is_file():
            raise common.StageError(f"{args.tokenizer_dir}/tokenizer.json is missing: run the tokenize stage "
                                    f"(snakemake tokenize) or pass --tokenizer-dir")
        report["tokenizer"] = run_isolated("tokenize", {
            "tokenizer_dir": args.tokenizer_dir, "pool_dir": args.pool_dir, "corpus_dir": args.corpus_dir,
            "max_bytes": int(args.text_mb * 1e6), "repeats": TOKENIZER_REPEATS,
            "batch_docs": int(common.stage_params(params, "tokenize")["encode_batch_docs"])}, threads=1)
        print_tokenizer(report["tokenizer"])
    report["host"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    report["wall_s"] = time.perf_counter() - began
    out = Path(args.out) / "bench_train.json"
    common.write_json(out, report)
    print(f"\nwrote {out} in {report['wall_s']:.0f} s (load average {report['host']['load_avg_1m_at_start']:.1f} -> "
          f"{report['host']['load_avg_1m_at_end']:.1f} on {os.cpu_count()} cpus: a shared machine is noisy)")


if __name__ == "__main__":
    main()
