"""The optimizer piece: a registry of builders, chosen by the `optimizer` param.

Every builder takes (param groups, betas, eps, device) and returns a torch.optim.Optimizer; the LR of each step
is set on its param groups by the loop, so builders start at lr 0.
"""
from __future__ import annotations

from typing import Callable

import torch

from stages.common import StageError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on the weight matrices (attention, MLP, lm_head); none on RMSNorm weights (1-D gains,
    shrinking them rescales activations) or the embedding table (a sparse lookup: decay pulls rare tokens to 0)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed_tokens" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups: list[dict], betas: tuple[float, float], eps: float, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW; fused on CUDA, foreach (multi-tensor) on CPU."""
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, **kernel)


def _apex_fused_adam(groups: list[dict], betas: tuple[float, float], eps: float,
                     device: torch.device) -> torch.optim.Optimizer:
    """NVIDIA Apex FusedAdam in AdamW mode (nanbeige_kernels.optim), CUDA only; imported here, so only runs that
    pick it need Apex."""
    if device.type != "cuda":
        raise StageError(f"optimizer apex_fused_adam runs on CUDA only, not {device.type}: use optimizer: adamw")
    try:
        from nanbeige_kernels.optim import build_fused_adam
        return build_fused_adam(groups, lr=0.0, betas=betas, eps=eps)
    except ImportError as exc:
        raise StageError(f"optimizer apex_fused_adam is not available here ({exc}): install NVIDIA Apex or use "
                         f"optimizer: adamw") from None


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": _adamw, "apex_fused_adam": _apex_fused_adam}


def build_optimizer(model: torch.nn.Module, p: dict, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `p["optimizer"]` (an OPTIMIZERS name) over param_groups(model, p["weight_decay"]), with
    p["adam_betas"] and p["adam_eps"]."""
    name = p["optimizer"]
    if name not in OPTIMIZERS:
        raise StageError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    betas = tuple(float(b) for b in p["adam_betas"])
    return OPTIMIZERS[name](param_groups(model, float(p["weight_decay"])), betas, float(p["adam_eps"]), device)
