"""Rollout throughput with the KV cache (model.generate) vs without it (the whole forward again every step).

A benchmark script, never a timed test. `python bench/bench_rollout.py [--scales tiny,small] [--batch 16]
[--new-tokens 64] [--threads 2] [--repeats 3] [--out DIR]`

The model: a random init (torch.manual_seed(0)) at the `model` shape of each params.yaml scale, fp32, eval mode.
The batch: --batch prompts of ragged lengths (16 to 64 tokens, seeded; bench_generate.make_prompts), each completed
greedily with exactly --new-tokens tokens (no stop token). Tokens/s = batch x new tokens / wall time of one whole
rollout (prefill included), on --threads torch threads, under torch.inference_mode. Per scale each side runs once to
warm up, then --repeats times in ABBA order (cached first on even repeats, uncached first on odd ones, so a drift in
the machine's load falls on both); the median is reported, the best run beside it, and the ratio cached / uncached.

What differs between the sides (same model, prompts, sampler and host traffic otherwise):
- cached (model.generate): one prefill of the left-padded prompts into a preallocated KVCache, then one token per
  row per step: attention of one query over the cached keys (a per-row padding mask), MLP and LM head over B tokens.
- uncached: every step runs the forward over the whole left-padded [B, prompt + t] batch again (doc_ids: padding is
  a document of its own, so no real token reads it and RoPE positions start at each row's first real token: a row
  computes what it would alone), the LM head on the last column only (last_only=True): per step, attention over
  (prompt + t)^2 pairs and the MLP over prompt + t tokens per row instead of prompt + t pairs and one token.
- the same on both: model.generation.sample_step (greedy: argmax and the raw log-prob), one host transfer of
  (token, log-prob, sampling log-prob) per step.
Greedy agreement (rows whose tokens are identical on both sides) is printed as a sanity check: both sides compute
the same logits up to float rounding of differently shaped matmuls, so only a near-tie may differ.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench_generate import PROMPT_LENGTHS, make_prompts  # noqa: E402  (bench/ is the script's own directory)
from model import ModelConfig, NanbeigeForCausalLM, Request, SamplingParams, generate  # noqa: E402
from model.generation import sample_step  # noqa: E402
from stages.common import load_params, stage_params  # noqa: E402


def make_model(scale: str) -> NanbeigeForCausalLM:
    cfg = ModelConfig.from_params(stage_params({**load_params(), "scale": scale}, "model"))
    torch.manual_seed(0)
    return NanbeigeForCausalLM(cfg).eval()


def cached(model: NanbeigeForCausalLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    out = generate(model, [Request(p, (i,)) for i, p in enumerate(prompts)], SamplingParams(new_tokens, 0.0),
                   batch_size=len(prompts))
    assert all(len(c.token_ids) == new_tokens for (c,) in out)
    return [c.token_ids for (c,) in out]


@torch.inference_mode()
def uncached(model: NanbeigeForCausalLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    doc_ids = torch.tensor([[-1] * (width - len(p)) + [0] * len(p) for p in prompts])
    tokens: list[list[int]] = [[] for _ in prompts]
    for _ in range(new_tokens):
        logits = model(ids, last_only=True, doc_ids=doc_ids).float()
        token, logprob, sampling_logprob = sample_step(logits, 0.0, 1.0, None)
        host = torch.stack([token.double(), logprob.double(), sampling_logprob.double()]).tolist()
        for row, t in zip(tokens, host[0]):
            row.append(int(t))
        ids = torch.cat([ids, token[:, None]], dim=1)
        doc_ids = torch.cat([doc_ids, torch.zeros_like(doc_ids[:, :1])], dim=1)
    return tokens


def bench_scale(scale: str, args) -> dict:
    model = make_model(scale)
    prompts = make_prompts(args.batch, model.config.vocab_size)
    sides = {"cached": lambda: cached(model, prompts, args.new_tokens),
             "uncached": lambda: uncached(model, prompts, args.new_tokens)}
    outputs = {side: run() for side, run in sides.items()}      # warm-up (and the greedy agreement check)
    times = {side: [] for side in sides}
    for r in range(args.repeats):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            start = time.perf_counter()
            sides[side]()
            times[side].append(time.perf_counter() - start)
    tokens = args.batch * args.new_tokens
    rate = {side: tokens / statistics.median(t) for side, t in times.items()}
    best = {side: tokens / min(t) for side, t in times.items()}
    same = sum(a == b for a, b in zip(outputs["cached"], outputs["uncached"]))
    return {"params": model.config.num_parameters(), "cached_tok_s": rate["cached"],
            "uncached_tok_s": rate["uncached"], "ratio": rate["cached"] / rate["uncached"],
            "best_cached_tok_s": best["cached"], "best_uncached_tok_s": best["uncached"],
            "best_ratio": best["cached"] / best["uncached"], "cached_s": times["cached"],
            "uncached_s": times["uncached"], "greedy_rows_identical": f"{same}/{args.batch}"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="tiny,small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "out"), help="write bench_rollout.json here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {scale: bench_scale(scale, args) for scale in args.scales.split(",")}
    print(f"rollout: batch {args.batch}, {args.new_tokens} new tokens (greedy), prompts {PROMPT_LENGTHS[0]}-"
          f"{PROMPT_LENGTHS[1]} tokens, {args.threads} threads, median of {args.repeats} (ABBA)")
    print(f"{'scale':6s} {'params':>7s} {'cached tok/s':>13s} {'uncached tok/s':>15s} {'ratio':>6s}   best: "
          f"{'cached':>7s} {'uncached':>8s} {'ratio':>6s}  greedy rows identical")
    for scale, r in results.items():
        print(f"{scale:6s} {r['params'] / 1e6:6.1f}M {r['cached_tok_s']:13.0f} {r['uncached_tok_s']:15.0f} "
              f"{r['ratio']:5.2f}x         {r['best_cached_tok_s']:7.0f} {r['best_uncached_tok_s']:8.0f} "
              f"{r['best_ratio']:5.2f}x  {r['greedy_rows_identical']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_rollout.json").write_text(json.dumps({"args": vars(args), "results": results},
                                                                   indent=2))


if __name__ == "__main__":
    main()
