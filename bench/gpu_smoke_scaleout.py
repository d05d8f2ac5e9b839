"""GPU smoke test of the two scale-out training backends at the Nanbeige4-3B layer shape, on one GPU.

A script for a machine with a GPU, never a test. `python bench/gpu_smoke_scaleout.py [--layers 2] [--seq-len 4096]
[--steps 4] [--backends megatron,fsdp]`:

  megatron  stages/training/megatron_backend.MegatronEngine: a Megatron-core GPTModel of the 3b shape with --layers
            decoder layers (Transformer Engine layer spec when transformer_engine imports, the local spec
            otherwise), bf16 params with fp32 main grads and master weights, Megatron's DDP, optimizer and
            forward_backward schedule
  fsdp      stages/training TorchEngine over NanbeigeForCausalLM wrapped by FSDP2 (fully_shard on a 1-GPU mesh:
            bf16 compute, fp32 reduce), fused AdamW, optionally --activation-checkpointing

Each runs 2 warmup steps, then --steps timed optimizer steps of --grad-accum micro-batches of one --seq-len sequence
(random tokens), and prints the loss, tokens/s and MFU = tokens/s x F_token / peak bf16 FLOP/s, with F_token from
tools/cost.py flops_per_token (the peak from the GPU's name, tools/cost.py PEAK_BF16_TFLOPS, or --peak-tflops).
Under 5 minutes on an H100/H200 at the defaults. Without CUDA it exits with status 2 and says so; --cpu-dry-run
runs the same code path at a toy shape on CPU (plumbing only: no timing is meaningful there).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from model import ModelConfig, NanbeigeForCausalLM  # noqa: E402  (the repo root is put on the path above)
from stages import common, training  # noqa: E402
from tools.cost import PEAK_BF16_TFLOPS, flops_per_token  # noqa: E402

OPT = {"optimizer": "adamw", "adam_betas": [0.9, 0.95], "adam_eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0,
       "seed": 0}
LR = 3e-4
TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16)


def config_3b(layers: int, seq_len: int, toy: bool) -> ModelConfig:
    model_p = common.stage_params({**common.load_params(REPO / "params.yaml"), "scale": "3b"}, "model")
    cfg = ModelConfig.from_params(model_p)
    cfg = replace(cfg, num_hidden_layers=layers, max_position_embeddings=max(seq_len, cfg.max_position_embeddings))
    return replace(cfg, **TOY) if toy else cfg


def peak_flops(override: float | None) -> float | None:
    if override:
        return override * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    return next((t * 1e12 for gpu, t in PEAK_BF16_TFLOPS.items() if gpu in name), None)


def micro_batches(cfg: ModelConfig, seq_len: int, grad_accum: int, step: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(cfg.vocab_size, (grad_accum, seq_len + 1), generator=g)
    return [{"input_ids": r[None, :-1], "targets": r[None, 1:], "mask": torch.ones(1, seq_len, dtype=torch.bool)}
            for r in ids]


def build(backend: str, cfg: ModelConfig, device: torch.device, activation_checkpointing: bool):
    torch.manual_seed(0)
    model = NanbeigeForCausalLM(cfg).to(device)
    if backend == "megatron":
        from stages.training.megatron_backend import MegatronEngine
        return MegatronEngine(model, {**OPT, "megatron": {"transformer_engine": True}}, device, training.World())
    model = training.apply_fsdp(model, training.World(), device, activation_checkpointing, shard_single=True)
    return training.TorchEngine(model, training.build_optimizer(model, OPT, device), device)


def run(backend: str, cfg: ModelConfig, args, device: torch.device, peak: float | None) -> dict:
    engine = build(backend, cfg, device, args.activation_checkpointing)
    loss_fn = training.TokenCrossEntropy()
    for step in range(2):
        engine.step(micro_batches(cfg, args.seq_len, args.grad_accum, step), loss_fn, LR, OPT["grad_clip"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for step in range(2, 2 + args.steps):
        losses, grad_norm = engine.step(micro_batches(cfg, args.seq_len, args.grad_accum, step), loss_fn, LR,
                                        OPT["grad_clip"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    tokens_per_s = args.steps * args.grad_accum * args.seq_len / seconds
    row = {"backend": backend, "te": getattr(engine, "te", None), "loss": losses["loss"], "grad_norm": grad_norm,
           "tokens_per_s": tokens_per_s,
           "mfu": tokens_per_s * flops_per_token(cfg, args.seq_len) / peak if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    if hasattr(engine, "close"):
        engine.close()
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--backends", default="megatron,fsdp")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy shape on CPU: checks the plumbing, not speed")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_smoke_scaleout: CUDA is not available here; run it on a GPU machine (or --cpu-dry-run to check "
              "the code path at a toy shape)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_dry_run else "cpu")
    if args.cpu_dry_run:
        args.seq_len = min(args.seq_len, 32)
    cfg = config_3b(args.layers, args.seq_len, toy=args.cpu_dry_run)
    peak = peak_flops(args.peak_tflops) if device.type == "cuda" else None
    import torch.distributed as dist

    from stages.training.parallel import process_group_backend
    dist.init_process_group(process_group_backend(device), store=dist.HashStore(), rank=0,
                            world_size=1)  # FSDP2's 1-GPU mesh and Megatron's parallel state share it
    print(f"{cfg.num_hidden_layers} layers of hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, seq {args.seq_len}, "
          f"{args.grad_accum} micro-batches per step, {device}"
          f"{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}; "
          f"F_token {flops_per_token(cfg, args.seq_len):.3g}")
    failed = False
    for backend in args.backends.split(","):
        try:
            row = run(backend, cfg, args, device, peak)
        except Exception as exc:  # report each backend, keep going: a smoke run says what works
            failed = True
            print(f"{backend:9s} FAILED: {type(exc).__name__}: {exc}")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        mem = f"{row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] is not None else "n/a"
        te = "" if row["te"] is None else f" (transformer_engine={row['te']})"
        print(f"{backend:9s}{te} loss {row['loss']:.4f} grad_norm {row['grad_norm']:.3f} "
              f"tokens/s {row['tokens_per_s']:,.0f} MFU {mfu} peak mem {mem}")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
