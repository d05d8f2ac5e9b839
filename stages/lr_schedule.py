"""The pretraining schedule as pure functions of the global optimizer step (torchtitan style).

The plan (stages/schedule.py) fixes the phases: tokens, LR shape, seq_len and RoPE scales, data mixture. Turning
it into steps fixes the total length once; how far a given run goes (--max-steps, a kill, a resume) never changes
the LR or the mixture at any step, so a run can stop and resume anywhere, or branch a decay from the end of stable.

Three schedules share the phases (their seq_len and RoPE base), so an ablation changes only LR and mixture:
  fgwsd   each phase's own LR shape and mixture (Fine-Grained WSD: mixture shifts decoupled from LR changes)
  wsd     the same warmup / stable / decay LR, ONE mixture for the whole run: the plan's mixtures averaged with
          weights = phase tokens (vanilla WSD, the paper's ablation baseline)
  cosine  the warmup phases' LR, then one cosine from lr_peak to lr_final over all later steps; the same mixture
          as wsd
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from stages.common import StageError

SHAPES = ("linear", "constant", "cosine")


@dataclass(frozen=True)
class Phase:
    """One plan phase in steps: steps [start, start + steps) train at seq_len with RoPE base x rope_theta_scale."""
    index: int
    name: str
    stage: str
    start: int
    steps: int
    seq_len: int
    rope_theta_scale: float
    planned_tokens: int
    mixture: dict[str, float]

    @property
    def end(self) -> int:
        return self.start + self.steps


@dataclass(frozen=True)
class LRPiece:
    """LR over steps [start, start + steps): shape(lr_start -> lr_end) at progress f = (i + 1) / steps."""
    start: int
    steps: int
    lr_start: float
    lr_end: float
    shape: str


@dataclass(frozen=True)
class Schedule:
    kind: str
    phases: tuple[Phase, ...]
    lr: tuple[LRPiece, ...]

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end


def phase_steps(tokens: int, tokens_per_step: int, min_steps: int = 1) -> int:
    """Optimizer steps of a phase: ceil(tokens / tokens_per_step) in exact integer arithmetic (a phase trains at least
    its planned tokens, so epochs planned in tokens hold), and at least min_steps (a 0.4% warmup is one step at tiny
    scale: the floor gives every phase a few steps, at the cost of a few tokens over the plan, which the manifest
    shows as tokens consumed vs planned)."""
    return max(1, min_steps, -(-tokens // tokens_per_step))


def shaped_lr(shape: str, lr_start: float, lr_end: float, f: float) -> float:
    """LR at progress f in (0, 1]:
    linear: a + (b - a) f;  constant: a;  cosine: b + (a - b) (1 + cos(pi f)) / 2.
    f = (i + 1) / n for local step i of n, so the first step already moves off lr_start (a warmup from 0 never
    spends a step at LR 0) and the last step lands exactly on lr_end."""
    if shape == "linear":
        return lr_start + (lr_end - lr_start) * f
    if shape == "constant":
        return lr_start
    if shape == "cosine":
        return lr_end + (lr_start - lr_end) * (1 + math.cos(math.pi * f)) / 2
    raise StageError(f"lr_shape must be one of {SHAPES}, got {shape!r}")


def normalized_mixture(mixture: dict[str, float], where: str) -> dict[str, float]:
    """Bucket fractions scaled to sum to 1 (the plan may round), refusing negative or all-zero weights."""
    if any(w < 0 for w in mixture.values()):
        raise StageError(f"{where}: negative mixture weight in {mixture}")
    total = sum(mixture.values())
    if total <= 0:
        raise StageError(f"{where}: mixture has no positive weight: {mixture}")
    return {b: w / total for b, w in sorted(mixture.items()) if w > 0}


def token_weighted_mixture(plan_phases: list[dict]) -> dict[str, float]:
    """One mixture for the whole run: sum_p tokens_p * mixture_p / sum_p tokens_p."""
    total = sum(ph["tokens"] for ph in plan_phases)
    out: dict[str, float] = {}
    for ph in plan_phases:
        for bucket, w in normalized_mixture(ph["mixture"], f"plan phase {ph['name']}").items():
            out[bucket] = out.get(bucket, 0.0) + w * ph["tokens"] / total
    return normalized_mixture(out, "token-weighted mixture")


def _fgwsd(phases: list[Phase], plan: dict) -> tuple[list[LRPiece], dict[str, float] | None]:
    return [LRPiece(ph.start, ph.steps, float(raw["lr_start"]), float(raw["lr_end"]), raw["lr_shape"])
            for ph, raw in zip(phases, plan["phases"])], None


def _wsd(phases: list[Phase], plan: dict) -> tuple[list[LRPiece], dict[str, float] | None]:
    lr, _ = _fgwsd(phases, plan)
    return lr, token_weighted_mixture(plan["phases"])


def _cosine(phases: list[Phase], plan: dict) -> tuple[list[LRPiece], dict[str, float] | None]:
    warm = [ph for ph in phases if ph.stage == "warmup"]
    lr, _ = _fgwsd(warm, {"phases": [plan["phases"][ph.index] for ph in warm]})
    start = warm[-1].end if warm else 0
    rest = phases[-1].end - start
    if rest:
        lr.append(LRPiece(start, rest, float(plan["lr_peak"]), float(plan["lr_final"]), "cosine"))
    return lr, token_weighted_mixture(plan["phases"])


SCHEDULES = {"fgwsd": _fgwsd, "wsd": _wsd, "cosine": _cosine}


def build_schedule(plan: dict, kind: str, seq_len: int, sequences_per_step: int, min_phase_steps: int = 1) -> Schedule:
    """Phases in steps (a phase's tokens_per_step = sequences_per_step x seq_len x seq_len_scale, phase_steps with
    min_phase_steps) and the LR pieces of schedule `kind`."""
    if kind not in SCHEDULES:
        raise StageError(f"pretrain.schedule must be one of {sorted(SCHEDULES)}, got {kind!r}")
    if not plan.get("phases"):
        raise StageError("plan has no phases")
    phases, start = [], 0
    for i, raw in enumerate(plan["phases"]):
        if raw["lr_shape"] not in SHAPES:
            raise StageError(f"plan phase {raw['name']}: lr_shape must be one of {SHAPES}, got {raw['lr_shape']!r}")
        phase_len = max(1, round(seq_len * float(raw["seq_len_scale"])))
        steps = phase_steps(int(raw["tokens"]), sequences_per_step * phase_len, min_phase_steps)
        phases.append(Phase(i, raw["name"], raw["stage"], start, steps, phase_len, float(raw["rope_theta_scale"]),
                            int(raw["tokens"]), normalized_mixture(raw["mixture"], f"plan phase {raw['name']}")))
        start += steps
    lr, constant_mixture = SCHEDULES[kind](phases, plan)
    if constant_mixture is not None:
        phases = [dataclasses.replace(ph, mixture=constant_mixture) for ph in phases]
    return Schedule(kind, tuple(phases), tuple(lr))


def phase_at(schedule: Schedule, step: int) -> Phase:
    """The phase that optimizer step `step` (0-based) belongs to; steps past the end stay in the last phase."""
    for ph in schedule.phases:
        if step < ph.end:
            return ph
    return schedule.phases[-1]


def piecewise_lr(pieces: tuple[LRPiece, ...], step: int) -> float:
    """LR of optimizer step `step` (0-based) over consecutive pieces; past the end it stays at the last lr_end."""
    for piece in pieces:
        if step < piece.start + piece.steps:
            return shaped_lr(piece.shape, piece.lr_start, piece.lr_end, (step - piece.start + 1) / piece.steps)
    return pieces[-1].lr_end


def lr_at(schedule: Schedule, step: int) -> float:
    """LR of optimizer step `step` (0-based) of a pretraining schedule."""
    return piecewise_lr(schedule.lr, step)


def warmup_decay(total_steps: int, warmup_steps: int, lr_peak: float, lr_final: float,
                 shape: str) -> tuple[LRPiece, ...]:
    """The post-training LR (SFT, DPD, RM, GRPO) for piecewise_lr: linear 0 -> lr_peak over warmup_steps, then
    `shape` (SHAPES) from lr_peak to lr_final over the remaining steps."""
    if shape not in SHAPES:
        raise StageError(f"lr_shape must be one of {SHAPES}, got {shape!r}")
    warmup = min(warmup_steps, total_steps)
    pieces = [LRPiece(0, warmup, 0.0, lr_peak, "linear")] if warmup else []
    if total_steps > warmup:
        pieces.append(LRPiece(warmup, total_steps - warmup, lr_peak, lr_final, shape))
    if not pieces:
        raise StageError(f"warmup_decay: total_steps must be >= 1, got {total_steps}")
    return tuple(pieces)
