"""Generation throughput: our engine (model.generate) vs Hugging Face `LlamaForCausalLM.generate`, same checkpoint.

A benchmark script, never a timed test. `python bench/bench_generate.py [--scale tiny] [--batch 32] [--new-tokens 64]
[--threads 2] [--repeats 5] [--checkpoint DIR] [--out DIR]`

The checkpoint: a random init (torch.manual_seed(0)) at the `model` shape of params.yaml's scale, written with
save_pretrained and loaded by both sides (ours: load_pretrained; HF: from_pretrained, fp32, SDPA attention); the
batch: --batch prompts of random token ids, ragged lengths (16 to 64 tokens, seeded). A random init's next-token
distribution is nearly flat (at 0.6 / 0.95 the nucleus holds most of the vocabulary), unlike a trained model's, so
--checkpoint DIR (a trained HF-layout checkpoint with its tokenizer, e.g. artifacts/tiny/sft_full/final after
`make demo`) measures the same on a trained model: the batch is then the first --batch held-out math-ladder prompts
(stages.tasks at params.yaml's tasks slice) in the chat format, encoded by the checkpoint's tokenizer. Prompts are
left-padded with an attention mask for HF. Both
sides generate exactly --new-tokens tokens per row (no stop token: HF's eos_token_id is unset, ours has none), on
--threads torch threads, under torch.inference_mode, in two modes: greedy and sampling (temperature 0.6, top-p 0.95,
HF's top_k off). Tokens/s = batch x new tokens / wall time of one whole generate call (prefill included); each side
runs --repeats times after one warm-up, alternating ours / HF; the median is reported, and the best run (on a
shared machine the least disturbed one) beside it.

What differs between the sides (same model, same batch, same work otherwise):
- ours returns each token's raw log-prob and its sampling log-prob and checks stop conditions on the host every step
  (one device-to-host transfer per step); HF returns token ids only.
- ours draws each row with its own torch.Generator (per-sample seeds), inverse-CDF from one uniform per row per step;
  HF samples the whole batch with torch.multinomial on the global generator.
- ours draws the top-p nucleus on CPU from its candidates (tokens within 2^-12 of the row's top probability; sorted
  alone when they hold top_p, model.generation._nucleus_draw_cpu), else over the whole vocabulary with a threshold
  found without sorting it (a weighted bincount over the fp32 bits, then a sort of the one bucket holding it:
  _nucleus_threshold_cpu); HF sorts the logits and scatters the mask back (torch.sort with indices).
- ours decodes through model.generation._DecodeStep: the same ops as the model's forward, without module calls, from
  q/k/v and gate/up weights fused once per call (12 layer matmuls per step at the tiny shape instead of 28), the
  gate/up and lm_head matmuls on weights reordered once for oneDNN (model.generation._cpu_linear; HF's go through
  torch.nn.functional.linear every step), attention as two batched matmuls; HF runs its modules (separate
  projections, SDPA).
- ours keeps a preallocated KV cache and one attention mask per step; HF's DynamicCache grows by concatenation and
  its mask is rebuilt by its masking utilities every step.
Greedy agreement (rows whose greedy tokens are identical on both sides) is printed as a sanity check: the same
checkpoint must give the same greedy continuations, up to float near-ties.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from model import ModelConfig, NanbeigeForCausalLM, Request, SamplingParams, generate, load_pretrained  # noqa: E402
from model import save_pretrained  # noqa: E402
from stages.common import load_params, stage_params  # noqa: E402

MODES = {"greedy": (0.0, 1.0), "sample": (0.6, 0.95)}
PROMPT_LENGTHS = (16, 64)


def make_checkpoint(scale: str, out: Path) -> Path:
    cfg = ModelConfig.from_params(stage_params({**load_params(), "scale": scale}, "model"))
    torch.manual_seed(0)
    save_pretrained(NanbeigeForCausalLM(cfg), out)
    return out


def make_prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(PROMPT_LENGTHS[0], PROMPT_LENGTHS[1] + 1, (batch,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def ladder_prompts(ckpt: Path, batch: int) -> list[list[int]]:
    """The first `batch` held-out math-ladder prompts (levels in turn), chat format, encoded by ckpt's tokenizer."""
    from stages import tasks
    from stages.chat import encode_prompt, load_chat_tokenizer
    params = load_params()
    rows = tasks.build_tasks({"seed": params["seed"], **stage_params(params, "tasks")})["math_heldout"]
    by_level: dict[int, list[dict]] = {}
    for r in rows:
        by_level.setdefault(r["level"], []).append(r)
    picked = [r for group in itertools.zip_longest(*by_level.values()) for r in group if r is not None][:batch]
    tok = load_chat_tokenizer(ckpt)
    return [encode_prompt(tok, tasks.format_prompt(r, "chat")) for r in picked]


def ours(model, prompts: list[list[int]], new_tokens: int, mode: str) -> list[list[int]]:
    temperature, top_p = MODES[mode]
    out = generate(model, [Request(p, (i,)) for i, p in enumerate(prompts)],
                   SamplingParams(new_tokens, temperature, top_p), batch_size=len(prompts))
    assert all(len(c.token_ids) == new_tokens for (c,) in out)
    return [c.token_ids for (c,) in out]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf(model, prompts: list[list[int]], new_tokens: int, mode: str) -> list[list[int]]:
    temperature, top_p = MODES[mode]
    ids, mask = left_padded(prompts)
    kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature else \
        {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0, **kwargs)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return out[:, ids.shape[1]:].tolist()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint", default=None, help="a trained HF-layout checkpoint dir (default: a random init)")
    ap.add_argument("--out", default=None, help="write bench_generate.json here")
    args = ap.parse_args(argv)
    from transformers import LlamaForCausalLM
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(args.scale, Path(tmp))
        our_model = load_pretrained(ckpt).eval()
        hf_model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
        prompts = (ladder_prompts(ckpt, args.batch) if args.checkpoint
                   else make_prompts(args.batch, our_model.config.vocab_size))
    hf_model.generation_config.eos_token_id = None
    sides = {"ours": lambda mode: ours(our_model, prompts, args.new_tokens, mode),
             "hf": lambda mode: hf(hf_model, prompts, args.new_tokens, mode)}
    tokens = args.batch * args.new_tokens
    results = {}
    for mode in MODES:
        outputs = {side: run(mode) for side, run in sides.items()}     # warm-up (and the greedy agreement check)
        times = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side, run in sides.items():
                start = time.perf_counter()
                run(mode)
                times[side].append(time.perf_counter() - start)
        rates = {side: tokens / statistics.median(t) for side, t in times.items()}
        best = {side: tokens / min(t) for side, t in times.items()}
        results[mode] = {"ours_tok_s": rates["ours"], "hf_tok_s": rates["hf"], "ratio": rates["ours"] / rates["hf"],
                         "best_ours_tok_s": best["ours"], "best_hf_tok_s": best["hf"],
                         "best_ratio": best["ours"] / best["hf"], "ours_s": times["ours"], "hf_s": times["hf"]}
        if mode == "greedy":
            same = sum(a == b for a, b in zip(outputs["ours"], outputs["hf"]))
            results[mode]["greedy_rows_identical"] = f"{same}/{args.batch}"
    lengths = sorted(map(len, prompts))
    what = (f"checkpoint {args.checkpoint}, ladder prompts" if args.checkpoint
            else f"scale {args.scale} random init, prompts")
    print(f"generate: {what} {lengths[0]}-{lengths[-1]} tokens, batch {args.batch}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'mode':8s} {'ours tok/s':>11s} {'HF tok/s':>9s} {'ratio':>6s}   best: {'ours':>6s} {'HF':>6s} {'ratio':>6s}")
    for mode, r in results.items():
        extra = f"  greedy rows identical: {r['greedy_rows_identical']}" if "greedy_rows_identical" in r else ""
        print(f"{mode:8s} {r['ours_tok_s']:11.0f} {r['hf_tok_s']:9.0f} {r['ratio']:5.2f}x   "
              f"      {r['best_ours_tok_s']:6.0f} {r['best_hf_tok_s']:6.0f} {r['best_ratio']:5.2f}x{extra}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_generate.json").write_text(json.dumps({"args": vars(args), "results": results},
                                                                        indent=2))


if __name__ == "__main__":
    main()
