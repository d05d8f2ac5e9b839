"""NVIDIA Apex's FusedAdam for the training loop's optimizer registry; optional, never a requirement."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def build_fused_adam(params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                     weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """apex.optimizers.FusedAdam in AdamW mode (decoupled weight decay, the same update as torch.optim.AdamW):
    one multi-tensor CUDA kernel per step. `params` may be parameter groups (e.g. no decay on norms/embeddings)."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError as e:
        raise ImportError("optimizer fused_adam needs NVIDIA Apex built from github.com/NVIDIA/apex "
                          "(the PyPI package named 'apex' is unrelated)") from e
    return FusedAdam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adam_w_mode=True)
