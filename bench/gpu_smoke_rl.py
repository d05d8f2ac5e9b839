"""GPU smoke test of RL rollouts: our engine (model.generate) vs vLLM (model.vllm_engine), and one weight sync.

A script for a machine with a GPU, never a test. `python bench/gpu_smoke_rl.py [--scale small] [--batch 64]
[--new-tokens 128] [--check-tokens 16] [--gpu-memory-utilization 0.4]`

The checkpoint: a random init (torch.manual_seed(0); lm_head x10, so greedy has few near-ties) at the `model` shape of
params.yaml's --scale, written with save_pretrained; the trainer's copy is loaded fp32 on the GPU (a trainer's
master weights), our engine rolls out with a bf16 copy, vLLM loads the checkpoint in bf16 (the 3b rollout setting).
  rollout  --batch ragged prompts (16 to 64 tokens, seeded), one sample each at RL's sampling (temperature 1, top_p
           1), exactly --new-tokens tokens (no stop token); tokens/s = batch x new tokens / wall time of one generate
           call after a warm-up, ours and vLLM's, and the ratio vLLM / ours
  greedy   vLLM's first --check-tokens greedy tokens of each row must be the fp32 trainer model's argmax at every
           position, up to bf16 rounding (its logit within 5% of a logit standard deviation of the row's max: a
           teacher-forced forward); rows identical to our engine's greedy tokens are printed beside
  sync     the trainer's weights are replaced in place by another random init (seed 1), engine.sync_weights(trainer);
           vLLM's greedy tokens must change in every row and pass the greedy check against the new weights
Each part is skipped with a printed reason when CUDA or vllm is missing, so on a CPU machine the script prints its
skips and exits 0; it exits 1 when a check that ran failed. Under 5 minutes on an H100/H200 at the defaults, most of
it vLLM's start (weight load, memory profiling, CUDA graph capture).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench_generate import make_prompts  # noqa: E402  (bench/ is the script's own directory)
from model import ModelConfig, NanbeigeForCausalLM, Request, SamplingParams, generate, load_pretrained  # noqa: E402
from model import save_pretrained  # noqa: E402
from stages.common import load_params, stage_params  # noqa: E402

ROLLOUT = (1.0, 1.0)      # RL's rollout temperature and top_p (params.yaml rl_stem / rl_code)
TOLERANCE = 0.05          # greedy check: logit gap to the argmax, in logit standard deviations (bf16 rounding)


def random_model(cfg: ModelConfig, seed: int) -> NanbeigeForCausalLM:
    torch.manual_seed(seed)
    model = NanbeigeForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


def rollout_rate(run, requests: list[Request], params: SamplingParams) -> float:
    run(requests[:2], params)                              # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = run(requests, params)
    torch.cuda.synchronize()
    assert all(len(c.token_ids) == params.max_new_tokens for (c,) in out)
    return len(requests) * params.max_new_tokens / (time.perf_counter() - start)


@torch.no_grad()
def greedy_check(trainer: NanbeigeForCausalLM, prompts: list[list[int]], tokens: list[list[int]]) -> list[float]:
    """Per row, the worst gap (in logit standard deviations) between the trainer's max logit and the logit of the
    token vLLM chose, over the row's positions: about 0 when vLLM computes the trainer's argmax."""
    worst = []
    for prompt, row in zip(prompts, tokens):
        ids = torch.tensor([prompt + row[:-1]], device=trainer.lm_head.weight.device)
        logits = trainer(ids)[0, len(prompt) - 1:].float()
        chosen = logits.gather(-1, torch.tensor(row, device=logits.device)[:, None]).squeeze(-1)
        worst.append(float(((logits.max(-1).values - chosen) / logits.std(-1)).max()))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--check-tokens", type=int, default=16)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    vllm_found = importlib.util.find_spec("vllm") is not None
    if not cuda:
        print("rollout (ours)  SKIPPED: needs a CUDA GPU (CPU rollout figures: bench/bench_rollout.py)")
    if not (cuda and vllm_found):
        why = "needs a CUDA GPU" if not cuda else "vllm is not installed (pip install -r requirements-gpu.txt)"
        for part in ("rollout (vLLM)", "greedy", "sync"):
            print(f"{part:15s} SKIPPED: {why}")
    if not cuda:
        return 0
    cfg = ModelConfig.from_params(stage_params({**load_params(), "scale": args.scale}, "model"))
    print(f"scale {args.scale} ({cfg.num_parameters() / 1e6:.0f}M params), batch {args.batch}, {args.new_tokens} "
          f"new tokens, {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(random_model(cfg, 0), tmp)
        return run(Path(tmp), cfg, args, vllm_found)


def run(checkpoint: Path, cfg: ModelConfig, args, vllm_found: bool) -> int:
    prompts = make_prompts(args.batch, cfg.vocab_size)
    rollout_requests = [Request(p, (i,)) for i, p in enumerate(prompts)]
    sampled = SamplingParams(args.new_tokens, *ROLLOUT)
    trainer = load_pretrained(checkpoint, device="cuda").eval()
    ours = load_pretrained(checkpoint, device="cuda", dtype=torch.bfloat16).eval()
    rate_ours = rollout_rate(lambda reqs, p: generate(ours, reqs, p, batch_size=args.batch), rollout_requests, sampled)
    print(f"rollout (ours)  {rate_ours:,.0f} tokens/s (bf16, KV cache, batch_size {args.batch})")
    if not vllm_found:
        return 0
    from model.vllm_engine import VLLMEngine
    began = time.perf_counter()
    engine = VLLMEngine(checkpoint, gpu_memory_utilization=args.gpu_memory_utilization)
    print(f"vLLM engine up in {time.perf_counter() - began:.0f} s")
    rate_vllm = rollout_rate(lambda reqs, p: engine.generate(reqs, p), rollout_requests, sampled)
    print(f"rollout (vLLM)  {rate_vllm:,.0f} tokens/s (bf16): {rate_vllm / rate_ours:.2f}x ours")
    greedy = SamplingParams(args.check_tokens, 0.0)
    requests = [Request(p) for p in prompts]
    failed, before = False, None
    for part in ("greedy", "sync"):
        if part == "sync":
            trainer.load_state_dict(random_model(cfg, 1).state_dict())      # "an optimizer step", in place
            began = time.perf_counter()
            engine.sync_weights(trainer)
            print(f"sync_weights    {time.perf_counter() - began:.2f} s")
        tokens = [c.token_ids for (c,) in engine.generate(requests, greedy)]
        reference = [c.token_ids for (c,) in generate(trainer, requests, greedy, batch_size=args.batch)]
        worst = max(greedy_check(trainer, prompts, tokens))
        ok = worst <= TOLERANCE
        line = (f"{part:15s} worst logit gap to the trainer's argmax {worst:.3f} sd (<= {TOLERANCE}); rows "
                f"identical to our engine's greedy {sum(a == b for a, b in zip(tokens, reference))}/{args.batch}")
        if part == "sync":
            changed = sum(a != b for a, b in zip(tokens, before))
            ok = ok and changed == args.batch
            line += f"; rows changed by the sync {changed}/{args.batch}"
        print(f"{line}: {'PASS' if ok else 'FAIL'}")
        failed |= not ok
        before = tokens
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
