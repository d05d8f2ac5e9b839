r"""Dual Preference Distillation (DPD) losses: sequence-level DPO margin + token-level distillation on both sequences.

For a prompt x with a positive y+ (teacher sample that passed the verifiers) and a negative y- (student sample that is
clearly worse), the student pi_theta, a frozen reference pi_ref (the student before distillation) and the teacher T:

  L = w_dpo * L_DPO + w_pos * L_KD(y+) + w_neg * L_KD(y-)

  L_DPO   = -1/P sum_pairs log sigmoid( beta * [ (log pi_theta(y+|x) - log pi_ref(y+|x))
                                               - (log pi_theta(y-|x) - log pi_ref(y-|x)) ] )
            with log pi(y|x) = sum_{t in y} log pi(y_t | x, y_<t)  (a sum over completion tokens, DPO's definition)
  L_KD(y) = 1/N_y sum_{t in y} D_lambda( T_t , S_t )        over the completion tokens of y (N_y in the step)

Teacher top-k (the stored artifact): the teacher keeps only its k most likely tokens per position, log-probs
log T_t(v_1..v_k). Both distributions are compared on k + 1 outcomes: the k teacher tokens and "the rest", with
T_t(rest) = 1 - sum_i T_t(v_i) and S_t(rest) = 1 - sum_i S_t(v_i) (the student's own mass outside the teacher's set),
so no mass is thrown away by renormalizing and the divergence is exact on that partition.

  D_lambda(T, S) = (1 - lambda) * KL(T || S) + lambda * KL(S || T),   lambda in [0, 1]   (kd_reverse_weight)

lambda = 0 is forward KL (mode covering, the usual KD), lambda = 1 is reverse KL (mode seeking, on-policy GKD's
choice); the mix is linear, so both endpoints are exactly the pure divergences (a generalized JSD written as
beta KL(T||M) + (1-beta) KL(S||M) tends to 0 at both ends, the bug class of TRL #6780 / verl-recipe #151).

Normalizers (P pairs, N_y+ and N_y- completion tokens) are counted over the whole optimizer step, once, before any
backward: the loss of a micro-batch is its SUM of terms divided by the step's counts, so the update does not depend on
how the step is split into micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_EPS = 1e-12


@dataclass(frozen=True)
class DPDWeights:
    """beta (DPO temperature), the three term weights and lambda (kd_reverse_weight), all from params."""
    beta: float = 0.1
    w_dpo: float = 1.0
    w_pos: float = 1.0
    w_neg: float = 1.0
    kd_reverse_weight: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.kd_reverse_weight <= 1.0:
            raise ValueError(f"kd_reverse_weight must be in [0, 1], got {self.kd_reverse_weight}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


def sequence_logprob(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum of the completion tokens' log-probs: [B, T] x 0/1 mask [B, T] -> [B]."""
    return (token_logprobs * mask).sum(-1)


def dpo_terms(pol_pos: torch.Tensor, pol_neg: torch.Tensor, ref_pos: torch.Tensor, ref_neg: torch.Tensor,
              beta: float) -> torch.Tensor:
    """Per-pair -log sigmoid(beta * margin) from sequence log-probs [P] (sum them; divide by the step's P)."""
    margin = (pol_pos - ref_pos) - (pol_neg - ref_neg)
    return -F.logsigmoid(beta * margin)


def topk_partition(logprobs_k: torch.Tensor) -> torch.Tensor:
    """log-probs of the k + 1 outcomes (the k tokens, then the rest) from log-probs of k tokens [..., k]."""
    rest = torch.clamp(1.0 - logprobs_k.exp().sum(-1, keepdim=True), min=_EPS).log()
    return torch.cat([logprobs_k, rest], dim=-1)


def kd_terms(teacher_topk_logprobs: torch.Tensor, student_logprobs_at_topk: torch.Tensor,
             reverse_weight: float) -> torch.Tensor:
    """Per-position D_lambda(T_t, S_t) [...] on the (k + 1)-outcome partition; inputs [..., k] are log-probs of the
    teacher's top-k token ids under the teacher and under the student (the teacher side is a constant)."""
    log_t = topk_partition(teacher_topk_logprobs.detach())
    log_s = topk_partition(student_logprobs_at_topk)
    forward = (log_t.exp() * (log_t - log_s)).sum(-1)
    if reverse_weight == 0.0:
        return forward
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1)
    if reverse_weight == 1.0:
        return reverse
    return (1.0 - reverse_weight) * forward + reverse_weight * reverse


@dataclass(frozen=True)
class StepCounts:
    """The optimizer step's normalizers: pairs, positive completion tokens, negative completion tokens."""
    pairs: int
    pos_tokens: int
    neg_tokens: int


def dpd_loss(pol_pos_tok: torch.Tensor, pol_neg_tok: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
             ref_pos: torch.Tensor, ref_neg: torch.Tensor,
             teacher_pos_topk: torch.Tensor, student_pos_topk: torch.Tensor,
             teacher_neg_topk: torch.Tensor, student_neg_topk: torch.Tensor,
             w: DPDWeights, counts: StepCounts) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's share of L (module docstring): the student's per-token log-probs of y+ / y- [P, T] with
    their completion masks, the reference sequence log-probs [P], and per-token top-k log-probs [P, T, k] of the
    teacher and (at the teacher's ids) of the student. Returns (loss, the three terms' micro-batch sums / counts)."""
    dpo = dpo_terms(sequence_logprob(pol_pos_tok, pos_mask), sequence_logprob(pol_neg_tok, neg_mask),
                    ref_pos, ref_neg, w.beta).sum() / max(counts.pairs, 1)
    kd_pos = (kd_terms(teacher_pos_topk, student_pos_topk, w.kd_reverse_weight) * pos_mask).sum() \
        / max(counts.pos_tokens, 1)
    kd_neg = (kd_terms(teacher_neg_topk, student_neg_topk, w.kd_reverse_weight) * neg_mask).sum() \
        / max(counts.neg_tokens, 1)
    loss = w.w_dpo * dpo + w.w_pos * kd_pos + w.w_neg * kd_neg
    return loss, {"dpo": float(dpo.detach()), "kd_pos": float(kd_pos.detach()), "kd_neg": float(kd_neg.detach())}
