r"""GRPO's objective on the shared loop: group-normalized advantages, the clipped ratio per token, an optional k3 KL
penalty to a reference, and a token-level mean over the whole optimizer step (DAPO's aggregation).

For a prompt q the policy pi_old samples a group o_1 .. o_n with rewards r_1 .. r_n (the verifiers' scores):

    A_i = (r_i - mean_g r) / (std_g r + eps)      scale_std: true   (GRPO, DeepSeekMath)
    A_i =  r_i - mean_g r                          scale_std: false  (Dr. GRPO; nanochat's RL)

std_g is the sample standard deviation over the group (n - 1 in the denominator: torch.std, as TRL and verl), so a
group needs n >= 2. Every token of o_i carries A_i. With the per-token ratio and log-probs

    rho_{i,t} = exp(l_theta - l_old),   l_x = log pi_x(o_{i,t} | q, o_{i,<t})   (temperature 1, the whole vocabulary)

the loss of an optimizer step is

    L = -1/N sum_{i in step} sum_t m_{i,t} [ min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high) A_i)
                                             - beta KL3_{i,t} ]
    KL3_{i,t} = exp(l_ref - l_theta) - (l_ref - l_theta) - 1      (Schulman's k3: >= 0, unbiased for KL(theta||ref))
    N = sum_{i in step} sum_t m_{i,t}                              (the step's trained completion tokens)

beta = kl_coef, 0 by default (RECIPE.md: no KL penalty; no reference model is loaded then). N is counted ONCE per
optimizer step before any backward (GRPOLoss.normalizer "tokens": the loop sums each micro-batch's mask), so the
update does not depend on how the step's samples are split into micro-batches: TRL's loss_type "dapo", not a mean
of per-sequence means ("grpo", which favours short answers) nor per micro-batch ("bnpo"; TRL #3178, #5619).

Masks. m_{i,t} = 1 on the completion tokens of o_i (every sampled token, the stop token included: the policy learns
to stop), 0 on the prompt, on padding and on EVERY token of a sample truncated at the length limit (DAPO's overlong
filtering: a sample cut off mid-answer says nothing about how the policy ends one). Truncated samples DO count in
the group statistics: their reward (the verifier's score of what they wrote) enters mean_g and std_g and the
zero-variance test, so the baseline is the policy's mean reward over everything it sampled for q; they only train
nothing themselves. Zero-variance groups (all n rewards equal, so every A_i = 0) are dropped before batching: they
carry no gradient and would only add their tokens to N, diluting the step.

On-policy (ppo_epochs 1): pi_old is the policy that sampled, rho = 1 up to the float rounding between the engine's
KV-cache path and the training forward, the clip is inactive and the gradient is -1/N sum m A grad l_theta. With
ppo_epochs > 1 the same rollout trains several optimizer steps and the clip bounds how far they move. l_old comes
from the rollout (model.generate's Completion.logprobs: the raw model at temperature 1); sampling at temperature != 1
or top_p < 1 draws from a distribution other than pi_old, which the ratio does not correct (the params keep 1 / 1).

Why not TRL's GRPOTrainer: it has these exact options (loss_type="dapo", scale_rewards, epsilon / epsilon_high,
beta=0, mask_truncated_completions; the names here follow it for comparison), but it is a transformers.Trainer with
its own loop, accumulation bookkeeping, checkpoints and resume (TRL #3247) and samples through transformers or vLLM.
Our artifact contract - one Trainer for every stage, resume states keyed by params + inputs + code + torch and exact
to the bit (N == k + resume + N - k), rollout seeds from (stage, step, prompt, sample) through our engine, dvclive
rows, an HF checkpoint + manifest - would have to be rebuilt around it on CPU, and it is not a dependency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from stages.training.losses import Loss, Micro


@dataclass(frozen=True)
class GRPOConfig:
    """The objective's knobs (the RL slice's keys of the same names)."""
    clip_low: float          # eps_low: the ratio is clipped below at 1 - clip_low
    clip_high: float         # eps_high: ... and above at 1 + clip_high (DAPO's clip-higher when > clip_low)
    kl_coef: float = 0.0     # beta of the k3 penalty; 0: no reference model
    scale_std: bool = True   # divide the centred rewards by std_g + adv_eps
    adv_eps: float = 1e-6

    @classmethod
    def from_params(cls, p: dict) -> "GRPOConfig":
        return cls(float(p["clip_low"]), float(p["clip_high"]), float(p["kl_coef"]), bool(p["scale_std"]),
                   float(p["adv_eps"]))


@dataclass(frozen=True)
class Sample:
    """One rollout: the prompt and completion token ids, l_old per completion token, the reward, and whether it was
    cut at the length limit (finish_reason "length")."""
    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    logprobs: Sequence[float]
    reward: float
    truncated: bool


def grpo_advantages(rewards: torch.Tensor, scale_std: bool, eps: float) -> torch.Tensor:
    """A over the last dim of rewards [..., n] (one group per row; module docstring), in rewards' dtype."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    return centred / (rewards.std(dim=-1, keepdim=True) + eps) if scale_std else centred


def has_variance(group: Sequence[Sample]) -> bool:
    """False when every reward of the group is the same (exactly: scores are 0/1 or a verifier's fractions)."""
    return len({s.reward for s in group}) > 1


def collate(rows: list[tuple[Sample, float]], width: int, pad_id: int) -> Micro:
    """A micro-batch of (sample, advantage) rows right-padded to `width` positions: input_ids / targets [B, width]
    (targets[t] = the token after position t), mask [B, width] (1 where the target is a completion token of a
    sample that stopped), old_logprobs [B, width] (l_old at those positions, 0 elsewhere), advantages [B]."""
    b = len(rows)
    ids = torch.full((b, width + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    old = torch.zeros(b, width, dtype=torch.float32)
    for i, (s, _) in enumerate(rows):
        n0, n1 = len(s.prompt_ids), len(s.completion_ids)
        ids[i, :n0 + n1] = torch.tensor([*s.prompt_ids, *s.completion_ids])
        old[i, n0 - 1:n0 + n1 - 1] = torch.tensor(s.logprobs, dtype=torch.float32)
        mask[i, n0 - 1:n0 + n1 - 1] = not s.truncated
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "mask": mask, "old_logprobs": old,
            "advantages": torch.tensor([a for _, a in rows], dtype=torch.float32)}


def grpo_micro_batches(groups: list[list[Sample]], cfg: GRPOConfig, micro_batch_size: int,
                       pad_id: int) -> tuple[list[Micro], int]:
    """(micro-batches of the kept groups' samples in order, micro_batch_size rows each and all padded to the step's
    longest sequence, so data-parallel sharding can regroup them; the number of zero-variance groups dropped)."""
    kept = [g for g in groups if has_variance(g)]
    rows = []
    for g in kept:
        adv = grpo_advantages(torch.tensor([s.reward for s in g], dtype=torch.float64), cfg.scale_std, cfg.adv_eps)
        rows += list(zip(g, adv.tolist()))
    width = max((len(s.prompt_ids) + len(s.completion_ids) - 1 for s, _ in rows), default=0)
    micros = [collate(rows[i:i + micro_batch_size], width, pad_id) for i in range(0, len(rows), micro_batch_size)]
    return micros, len(groups) - len(kept)


class GRPOLoss(Loss):
    """L over a micro-batch of collate's layout (module docstring), normalizer "tokens" (the mask). Parts, each the
    micro-batch's sum over the step's N: pg (the clipped policy term), clip_fraction (tokens whose gradient the clip
    removed: A > 0 and rho > 1 + eps_high, or A < 0 and rho < 1 - eps_low), ratio (mean rho), and kl (mean KL3)
    when kl_coef > 0, which needs the micro's ref_logprobs [B, T]."""
    normalizer = "tokens"

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg

    def __call__(self, model: torch.nn.Module, micro: Micro, totals: dict[str, int]) -> dict[str, torch.Tensor]:
        c, n = self.cfg, totals["tokens"]
        logp = model.token_logprobs(micro["input_ids"], micro["targets"])
        mask = micro["mask"].to(logp.dtype)
        adv = micro["advantages"].to(logp.dtype)[:, None]
        ratio = torch.exp(logp - micro["old_logprobs"])
        pg = -torch.minimum(ratio * adv, ratio.clamp(1 - c.clip_low, 1 + c.clip_high) * adv)
        per_token = pg
        clipped = ((adv > 0) & (ratio > 1 + c.clip_high)) | ((adv < 0) & (ratio < 1 - c.clip_low))
        parts = {"pg": (pg * mask).sum().detach() / n, "clip_fraction": (clipped * mask).sum() / n,
                 "ratio": (ratio * mask).sum().detach() / n}
        if c.kl_coef:
            d = micro["ref_logprobs"] - logp
            kl = torch.exp(d) - d - 1
            per_token = per_token + c.kl_coef * kl
            parts["kl"] = (kl * mask).sum().detach() / n
        return {"loss": (per_token * mask).sum() / n, **parts}
