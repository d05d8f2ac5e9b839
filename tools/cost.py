r"""What a pretraining run costs before it is submitted: parameters, FLOPs per token, GPU-hours, memory per GPU.

    python -m tools.cost                      # the 3b scale of params.yaml: 23T tokens, 8-GPU nodes
    python -m tools.cost --scale small --mfu 0.4 --gpus 8 --markdown

Formulas (Kaplan et al. 2020 / the PaLM appendix; causal attention counted at half the square, as Megatron does):
  N          = ModelConfig.num_parameters()  (N_body without embeddings; the input embedding is a lookup, no FLOPs)
  F_token    = 6 (N_body + V d) + 6 L s (H d_h)        training FLOPs per token: 2 forward + 4 backward per
                                                        multiply-add of every matmul (the LM head is V d), plus
                                                        QK^T and AV: 2 * 2 L s H d_h forward, x3 with backward, /2 causal
  GPU-hours  = tokens * F_token / (MFU * peak) / 3600
  memory/GPU = bytes of weights, gradients and AdamW states sharded over the data-parallel (FSDP/ZeRO-3) group and
               split by tensor x pipeline parallel, plus activations of one micro-batch:
               bf16 weights 2 N, fp32 grads 4 N, fp32 master + Adam m, v 12 N   ->  18 N / (TP PP DP_shard)
               activations per layer (Korthikanti et al. 2022, sequence parallel, selective recompute):
               s b d (34 / TP) bytes, times L / PP layers in flight (x PP micro-batches under 1F1B), or s b d 2 bytes
               per layer (the layer input only) with full recompute.
The figures are the plan, not a measurement: the GPU smoke script measures MFU on a real node.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from model.config import ModelConfig
from stages.common import load_params, stage_params

PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}   # dense bf16, SXM
GPU_MEMORY_GIB = {"h100": 80.0, "h200": 141.0, "a100": 80.0}


@dataclass(frozen=True)
class Plan:
    tokens: float
    seq_len: int
    micro_batch: int
    tp: int
    pp: int
    gpus: int
    mfu: float
    gpu: str
    recompute: str                    # "selective" | "full"


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """F_token of the module docstring."""
    head_matmuls = cfg.num_parameters(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size
    attention = cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
    return 6.0 * head_matmuls + 6.0 * attention


def memory_per_gpu_gib(cfg: ModelConfig, plan: Plan) -> dict[str, float]:
    """Model states and activations per GPU in GiB (module docstring)."""
    n = cfg.num_parameters()
    dp = plan.gpus // (plan.tp * plan.pp)
    states = 18.0 * n / (plan.tp * plan.pp * dp)
    layers = cfg.num_hidden_layers / plan.pp
    per_layer = plan.seq_len * plan.micro_batch * cfg.hidden_size
    per_layer *= (34.0 / plan.tp) if plan.recompute == "selective" else 2.0
    in_flight = plan.pp if plan.pp > 1 else 1
    activations = per_layer * layers * in_flight
    logits = 4.0 * plan.seq_len * plan.micro_batch * cfg.vocab_size / plan.tp   # fp32 logits (the fused CE avoids it)
    gib = 1024.0 ** 3
    return {"model_states": states / gib, "activations": activations / gib, "logits_fp32": logits / gib,
            "total": (states + activations + logits) / gib}


def estimate(cfg: ModelConfig, plan: Plan) -> dict:
    f = flops_per_token(cfg, plan.seq_len)
    peak = PEAK_BF16_TFLOPS[plan.gpu] * 1e12
    gpu_hours = plan.tokens * f / (plan.mfu * peak) / 3600.0
    return {"parameters": cfg.num_parameters(), "parameters_no_embeddings": cfg.num_parameters(False),
            "flops_per_token": f, "total_flops": plan.tokens * f, "gpu_hours": gpu_hours,
            "days_on_cluster": gpu_hours / plan.gpus / 24.0, "memory_gib": memory_per_gpu_gib(cfg, plan),
            "gpu_memory_gib": GPU_MEMORY_GIB[plan.gpu], "data_parallel": plan.gpus // (plan.tp * plan.pp)}


def markdown(cfg: ModelConfig, plan: Plan, est: dict) -> str:
    m = est["memory_gib"]
    rows = [("parameters", f"{est['parameters'] / 1e9:.2f}B ({est['parameters_no_embeddings'] / 1e9:.2f}B without "
                           f"embeddings)"),
            ("training FLOPs per token", f"{est['flops_per_token'] / 1e9:.1f} GFLOP at seq {plan.seq_len}"),
            ("tokens", f"{plan.tokens / 1e12:g}T"),
            ("total compute", f"{est['total_flops']:.3g} FLOP"),
            (f"GPU-hours at {plan.mfu:.0%} MFU ({plan.gpu.upper()}, {PEAK_BF16_TFLOPS[plan.gpu]:g} TFLOP/s bf16)",
             f"{est['gpu_hours']:,.0f}"),
            (f"wall time on {plan.gpus} GPUs", f"{est['days_on_cluster']:,.1f} days"),
            (f"memory per GPU (TP {plan.tp}, PP {plan.pp}, FSDP over DP {est['data_parallel']}, micro-batch "
             f"{plan.micro_batch}, {plan.recompute} recompute)",
             f"{m['total']:.1f} GiB of {est['gpu_memory_gib']:g}: states {m['model_states']:.1f}, activations "
             f"{m['activations']:.1f}, fp32 logits {m['logits_fp32']:.1f} (0 with the fused CE)")]
    return "| quantity | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="3b")
    ap.add_argument("--tokens", type=float, default=None, help="default: select.budgets.train_tokens of the scale")
    ap.add_argument("--seq-len", type=int, default=None, help="default: pretrain.seq_len of the scale")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--gpus", type=int, default=256)
    ap.add_argument("--mfu", type=float, default=0.40)
    ap.add_argument("--gpu", choices=sorted(PEAK_BF16_TFLOPS), default="h100")
    ap.add_argument("--recompute", choices=["selective", "full"], default="full")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    params = load_params()
    params["scale"] = args.scale
    model_p = stage_params(params, "model")
    cfg = ModelConfig.from_params(model_p)
    plan = Plan(tokens=args.tokens or float(stage_params(params, "select")["budgets"]["train_tokens"]),
                seq_len=args.seq_len or int(stage_params(params, "pretrain")["seq_len"]), micro_batch=args.micro_batch,
                tp=args.tp, pp=args.pp, gpus=args.gpus, mfu=args.mfu, gpu=args.gpu, recompute=args.recompute)
    est = estimate(cfg, plan)
    if args.markdown:
        print(markdown(cfg, plan, est))
    else:
        print({k: v for k, v in est.items()})


if __name__ == "__main__":
    main()
