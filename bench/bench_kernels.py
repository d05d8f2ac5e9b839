"""The fused kernels (kernels/, nanbeige_kernels) at the Nanbeige4-3B shapes on one GPU: time and peak memory.

A GPU benchmark script, never a test. `python bench/bench_kernels.py [--out DIR] [--iters N] [--seq-len 4096]`:

1. Per op, forward + backward, bf16, one micro-batch of --seq-len tokens at the 3b shape of params.yaml
   (hidden 2560, FFN 10496, 20 q / 4 kv heads of 128, vocab 166,144): RMSNorm, SwiGLU, RoPE on q and k, and the
   LM head + cross-entropy. Implementations: torch eager (the references in model/ops.py), torch.compile of the
   same reference, ours (Triton), and liger-kernel's when it imports. Time: the median over --iters CUDA-event timed
   calls after warmup; peak: torch.cuda.max_memory_allocated during one call minus what was allocated before it
   (inputs excluded, outputs, saved activations and gradients included).
2. One 3b decoder layer, forward + backward, eager references vs our kernels (model.ops dispatch).
3. The whole 3b model, one training step (forward, loss, backward, fused AdamW step) at the largest micro-batch of
   --seq-len sequences that fits (doubling from 1 until out of memory), per backend: tokens/s and
   MFU = tokens/s x FLOPs/token / peak bf16 FLOP/s, FLOPs/token = 6 N + 12 L H D T (bench_train.flops_per_token);
   the peak comes from --peak-tflops or a table of known GPUs (else MFU is left out).

Writes OUT/bench_kernels.json and OUT/bench_kernels.md; exits with status 2 and a message when CUDA is absent.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from model import ModelConfig, NanbeigeForCausalLM, ops  # noqa: E402  (the repo root is put on the path above)
from model.llama import DecoderLayer  # noqa: E402
from stages import common  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
DTYPE = torch.bfloat16


def shape_3b(params_path: Path) -> ModelConfig:
    params = common.load_params(params_path)
    model_p = common.stage_params({**params, "scale": "3b"}, "model")
    return ModelConfig.from_params(model_p)


def timed(fn, iters: int, warmup: int = 3) -> dict:
    """Median milliseconds of fn() over `iters` CUDA-event timed calls, and the peak MiB one call adds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return {"ms": statistics.median(times), "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}


def fwd_bwd(fn, inputs: list[torch.Tensor]):
    """A closure running fn(*inputs) forward and backward (sum of the outputs), dropping the gradients after."""
    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum(o.float().sum() for o in outs).backward()
        for x in inputs:
            x.grad = None
    return step


def op_cases(cfg: ModelConfig, tokens: int) -> dict:
    """Per op: (inputs, {impl: fn}) at the 3b shape; each fn has the reference's signature over the inputs."""
    dev = "cuda"

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(DTYPE).requires_grad_()

    h, d = cfg.hidden_size, cfg.head_dim
    cos, sin = ops.rope_cache(tokens, d, cfg.rope_theta, device=dev)
    labels = torch.randint(0, cfg.vocab_size, (tokens,), device=dev)
    eps = cfg.rms_norm_eps
    cases = {
        "rms_norm": ([leaf(tokens, h), leaf(h)], {
            "torch": lambda x, w: ops.rms_norm_reference(x, w, eps),
            "triton": lambda x, w: _kernels().rms_norm(x, w, eps)}),
        "swiglu": ([leaf(tokens, cfg.intermediate_size), leaf(tokens, cfg.intermediate_size)], {
            "torch": ops.swiglu_reference, "triton": lambda g, u: _kernels().swiglu(g, u)}),
        "rope_qk": ([leaf(1, tokens, cfg.num_attention_heads, d).transpose(1, 2).detach().requires_grad_(),
                     leaf(1, tokens, cfg.num_key_value_heads, d).transpose(1, 2).detach().requires_grad_()], {
            "torch": lambda q, k: ops.apply_rotary_reference(q, k, cos, sin),
            "triton": lambda q, k: _kernels().apply_rotary(q, k, cos, sin)}),
        "linear_cross_entropy": ([leaf(tokens, h), leaf(cfg.vocab_size, h, scale=0.02)], {
            "torch": lambda x, w: ops.linear_cross_entropy_reference(x, w, labels),
            "triton": lambda x, w: _kernels().linear_cross_entropy(x, w, labels)}),
    }
    for _, impls in cases.values():
        impls["torch.compile"] = torch.compile(impls["torch"], dynamic=False)
    liger = _liger()
    if liger is not None:
        cases["rms_norm"][1]["liger"] = lambda x, w: liger.liger_rms_norm(x, w, eps, in_place=False)
        cases["swiglu"][1]["liger"] = liger.liger_swiglu
        cases["rope_qk"][1]["liger"] = lambda q, k: liger.liger_rope(q, k, cos[None].to(DTYPE), sin[None].to(DTYPE))
        cases["linear_cross_entropy"][1]["liger"] = lambda x, w: liger.liger_fused_linear_cross_entropy(x, w, labels)
    return cases


def _kernels():
    import nanbeige_kernels
    return nanbeige_kernels


def _liger():
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    return functional


def bench_ops(cfg: ModelConfig, tokens: int, iters: int) -> list[dict]:
    rows = []
    for op, (inputs, impls) in op_cases(cfg, tokens).items():
        for impl, fn in impls.items():
            try:
                r = timed(fwd_bwd(fn, inputs), iters)
            except torch.OutOfMemoryError:
                r = {"ms": None, "peak_mib": None, "error": "out of memory"}
            rows.append({"what": op, "impl": impl, "tokens": tokens, **r})
            print(f"  {op:22s} {impl:14s} {_fmt(r)}", flush=True)
            torch.cuda.empty_cache()
    return rows


def bench_layer(cfg: ModelConfig, tokens: int, iters: int) -> list[dict]:
    torch.manual_seed(0)
    layer = DecoderLayer(cfg, 0).to("cuda", DTYPE)
    x = (torch.randn(1, tokens, cfg.hidden_size, device="cuda")).to(DTYPE).requires_grad_()
    cos, sin = ops.rope_cache(tokens, cfg.head_dim, cfg.rope_theta, device="cuda")
    rows = []
    for backend in ("torch", "triton"):
        ops.set_kernels(backend)
        step = fwd_bwd(lambda inp: layer(inp, cos, sin, None), [x])
        r = timed(lambda: (step(), layer.zero_grad(set_to_none=True)), iters)
        rows.append({"what": "decoder_layer", "impl": backend, "tokens": tokens, **r})
        print(f"  {'decoder_layer':22s} {backend:14s} {_fmt(r)}", flush=True)
    ops.set_kernels("auto")
    return rows


def bench_model(cfg: ModelConfig, seq_len: int, iters: int, peak_tflops: float | None) -> list[dict]:
    sys.path.insert(0, str(REPO / "bench"))
    from bench_train import flops_per_token  # the shared 6N + 12LHDT estimate
    torch.manual_seed(0)
    model = NanbeigeForCausalLM(cfg).to("cuda", DTYPE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    rows = []
    for backend in ("torch", "triton"):
        ops.set_kernels(backend)
        best = None
        batch = 1
        while True:
            ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), device="cuda")

            def train_step():
                model.loss(ids, ids.roll(-1, dims=1)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            try:
                r = timed(train_step, iters, warmup=2)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                break
            finally:
                gc.collect()
                torch.cuda.empty_cache()
            best = {"batch": batch, **r}
            batch *= 2
        if best is None:
            rows.append({"what": "model_train_step", "impl": backend, "error": "batch 1 does not fit"})
            continue
        tokens = best["batch"] * seq_len
        tps = tokens / (best["ms"] / 1e3)
        mfu = tps * flops_per_token(cfg, seq_len) / (peak_tflops * 1e12) if peak_tflops else None
        rows.append({"what": "model_train_step", "impl": backend, "tokens": tokens, "micro_batch": best["batch"],
                     "ms": best["ms"], "peak_mib": best["peak_mib"], "tokens_per_s": tps, "mfu": mfu})
        print(f"  {'model_train_step':22s} {backend:14s} batch {best['batch']} {_fmt(best)} {tps:,.0f} tok/s"
              + (f" MFU {mfu:.1%}" if mfu is not None else ""), flush=True)
    ops.set_kernels("auto")
    return rows


def _fmt(r: dict) -> str:
    if r.get("ms") is None:
        return r.get("error", "-")
    return f"{r['ms']:9.2f} ms {r['peak_mib']:10.0f} MiB"


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else ""


def markdown(result: dict) -> str:
    lines = [f"# Kernel benchmark: {result['device']}, torch {result['torch']}, triton {result['triton']}", "",
             f"bf16, seq_len {result['seq_len']}; forward + backward; peak = extra memory one call allocates.", "",
             "| what | impl | tokens | ms | peak MiB | tokens/s | MFU |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        cells = [_cell(r, "ms", ".2f") or r.get("error", ""), _cell(r, "peak_mib", ".0f"),
                 _cell(r, "tokens_per_s", ",.0f"), _cell(r, "mfu", ".1%")]
        lines.append(f"| {r['what']} | {r['impl']} | {r.get('tokens', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON and markdown")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--skip-model", action="store_true", help="per-op and layer figures only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured",
              file=sys.stderr)
        sys.exit(2)
    import triton
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    cfg = shape_3b(Path(args.params))
    started = time.time()
    print(f"{name}: 3b shapes, bf16, seq_len {args.seq_len}", flush=True)
    rows = bench_ops(cfg, args.seq_len, args.iters) + bench_layer(cfg, args.seq_len, args.iters)
    if not args.skip_model:
        rows += bench_model(cfg, args.seq_len, max(3, args.iters // 3), peak)
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "seq_len": args.seq_len,
              "peak_bf16_tflops": peak, "liger": _liger() is not None, "seconds": time.time() - started,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "bench_kernels.json", result)
    common.write_text(out / "bench_kernels.md", markdown(result))
    print(f"wrote {out / 'bench_kernels.json'} and {out / 'bench_kernels.md'} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
