"""The loss piece: a loss counts its normalizers' units per micro-batch and returns each micro-batch's SHARE of the
step loss, given the step's totals.

The loop (stages/training/loop.py) sums units(m) over all micro-batches m of the optimizer step into `totals` once,
before any backward, and backpropagates loss_fn(model, m, totals)["loss"] for each m. With one normalizer:

    L_step = sum_m S_m / N,   N = sum_m units(m),   S_m = the loss summed over m's units

so an update never depends on how a step is split into micro-batches, and a token-level mean is over the step's
tokens, not a mean of micro means. A loss with several terms has one total per term (DPD: pairs for the DPO term,
positive and negative completion tokens for the two KD terms).
"""
from __future__ import annotations

from typing import Callable

import torch

Micro = dict[str, torch.Tensor]

# How many units a micro-batch holds, by the name a loss declares in `normalizer`.
NORMALIZERS: dict[str, Callable[[Micro], int]] = {
    "tokens": lambda micro: int(micro["mask"].sum()),             # supervised positions: mask == 1
    "sequences": lambda micro: int(micro["input_ids"].shape[0]),  # rows of the micro-batch
}


class Loss:
    """A training objective.

    units(micro) -> {total name: count}: by default {normalizer: NORMALIZERS[normalizer](micro)}.
    __call__(model, micro, totals) -> {"loss": share, part: share, ...}: fp32 scalar tensors, each the micro-batch's
    sum divided by its step total (totals: the counts summed over the step); only "loss" is differentiated, every
    entry is summed over the step's micro-batches and logged as train/<name>."""
    normalizer = "tokens"

    def units(self, micro: Micro) -> dict[str, int]:
        return {self.normalizer: NORMALIZERS[self.normalizer](micro)}

    def __call__(self, model: torch.nn.Module, micro: Micro, totals: dict[str, int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class TokenCrossEntropy(Loss):
    """Masked next-token cross-entropy over the step's supervised tokens:

        L_step = -1/N sum_m sum_{b,t} mask_{b,t} log p(targets_{b,t} | input_ids_{b,<=t}),   N = sum of mask

    Pretrain: mask = 1 everywhere (equal micro-batches: the mean of their mean CEs); SFT: mask = 1 on assistant
    tokens and the end token only. micro: input_ids, targets (aligned, [B, T]), mask [B, T]; packed rows (SFT) also
    doc_ids and positions [B, T], so attention stays inside each document (model/llama.py _hidden)."""

    def __call__(self, model: torch.nn.Module, micro: Micro, totals: dict[str, int]) -> dict[str, torch.Tensor]:
        packing = {k: micro[k] for k in ("doc_ids", "positions") if k in micro}
        logp = model.token_logprobs(micro["input_ids"], micro["targets"], **packing)
        return {"loss": -(logp * micro["mask"].to(logp.dtype)).sum() / totals["tokens"]}
