"""The training loop: one optimizer step over a list of micro-batches, and the Trainer that runs steps with the LR
schedule, resume states, dvclive rows and progress lines (see stages/training/__init__.py for how stages plug in)."""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TextIO

import torch

from stages.common import StageError
from stages.training.engine import Engine, TorchEngine
from stages.training.losses import Loss, Micro
from stages.training.parallel import World, reduce_sums, shard_rows
from stages.training.progress import make_progress
from stages.training.resume import ResumeDir


class BatchSource(Protocol):
    """The data of a run, resumable: micro_batches(step) is what optimizer step `step` (0-based) trains on, called
    once per step in step order; state_dict() after a step is all that the next step's batches depend on besides
    `step` (cursors, a generator; {} for a pure function of the step), saved in every resume state."""

    def micro_batches(self, step: int) -> list[Micro]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class LoopConfig:
    """The loop's knobs, the same keys in every training stage's params slice."""
    grad_clip: float            # max global L2 norm of the gradient
    checkpoint_every: int       # optimizer steps between resume states (also at milestones and at a stop)
    log_every: int              # optimizer steps between dvclive rows (also at milestones and the last step)
    progress_every_steps: int   # off a TTY: a progress line at least every this many steps ...
    progress_every_s: float     # ... or this many seconds

    @classmethod
    def from_params(cls, p: dict) -> "LoopConfig":
        return cls(float(p["grad_clip"]), int(p["checkpoint_every"]), int(p["log_every"]),
                   int(p["progress_every_steps"]), float(p["progress_every_s"]))


@dataclass
class StepOutput:
    """What after_step sees: `step` optimizer steps are done; `metrics` (train/loss, train/<part>, train/lr,
    train/grad_norm) become the dvclive row when one is logged, and the hook may add to them. Setting `milestone`
    logs this row and saves a resume state now (a phase end, an eval)."""
    step: int
    loss: float
    tokens: int
    metrics: dict[str, float]
    milestone: bool = False


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 on CPU (exact, and what the resume tests compare bit for bit)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_run(seed: int, device: torch.device) -> None:
    """Seed torch's global generator (model init) and, on CPU, make every kernel deterministic: same params + seed
    => identical weights."""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micros: list[Micro], loss_fn: Loss,
                   lr: float, grad_clip: float, device: torch.device,
                   world: World = World()) -> tuple[dict[str, float], float]:
    """One update from all micro-batches m of the step:

        totals = sum_m loss_fn.units(m)                 (per normalizer; once, before any backward)
        g      = sum_m grad(loss_fn(model, m, totals)["loss"])

    With one normalizer that is g = grad(sum_m S_m / N), independent of how the step is split; then clip ||g||_2 to
    grad_clip and step the optimizer at `lr`. Returns ({name: sum over m of that entry} for "loss" and every part,
    ||g|| before clipping). With W > 1 ranks (FSDP2), this rank trains on rows r::W of the step (shard_rows), the
    totals are summed over ranks in one all-reduce before any backward and the logged sums in one after, and the
    gradient reduce-scatter sums: the same L = S / N as one process (stages/training/parallel.py)."""
    micros = shard_rows(micros, world.rank, world.size)
    local: dict[str, int] = {}
    for micro in micros:
        for name, count in loss_fn.units(micro).items():
            local[name] = local.get(name, 0) + count
    totals = {name: int(v) for name, v in reduce_sums(local, world.size).items()}
    if not any(totals.values()):
        raise StageError(f"an optimizer step has nothing to normalize by: {totals} (every micro-batch masked)")
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums: dict[str, torch.Tensor] = {}
    for micro in micros:
        micro = {k: v.to(device, non_blocking=True) for k, v in micro.items()}
        with autocast(device):
            out = loss_fn(model, micro, totals)
        (out["loss"] * world.size if world.size > 1 else out["loss"]).backward()  # FSDP2 averages over W
        for name, value in out.items():
            sums[name] = sums[name] + value.detach() if name in sums else value.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor norm over the shards
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world.size > 1:
        sums = reduce_sums(sums, world.size)
    return {name: s.item() for name, s in sums.items()}, grad_norm.item()


def log_row(live, row: dict) -> None:
    live.step = row["step"]
    for name, value in row["metrics"].items():
        live.log_metric(name, value)
    live.next_step()


@dataclass
class Trainer:
    """Runs optimizer steps `state["step"]` .. total - 1, resuming the newest state in `resume` first.

    lr_at(step) is the LR of 0-based step `step` (stages/lr_schedule.py); live a dvclive Live (common.open_live),
    which the stage opens and ends; stream where progress goes (stderr when None).
    `state` (saved in every resume state with the batch source's): step, tokens_seen, wall_time (s, training +
    hooks, summed over resumes), loss_start / loss_end (the first and latest step loss), history (every dvclive row
    logged, replayed into `live` on resume so a row is never logged twice), stage (a dict the stage's hooks own).
    engine: how a step runs and the state is gathered (stages/training/engine.py); None: this process alone trains
    `model` with `optimizer` (TorchEngine). Under torchrun every rank runs the Trainer; rank 0 alone writes resume
    states and dvclive rows (`live` is None on the others)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]
    loss_fn: Loss
    batches: BatchSource
    cfg: LoopConfig
    resume: ResumeDir
    live: Any
    device: torch.device
    desc: str = "train"
    stream: TextIO | None = None
    state: dict = field(default_factory=lambda: {"step": 0, "tokens_seen": 0, "wall_time": 0.0, "loss_start": None,
                                                 "loss_end": None, "history": [], "stage": {}})
    engine: Engine | None = None

    def __post_init__(self):
        if self.engine is None:
            self.engine = TorchEngine(self.model, self.optimizer, self.device)

    def restore(self) -> bool:
        """Load the newest resume state (model, optimizer, RNG, batch source, state); True when there was one."""
        loaded = self.resume.load()
        if loaded is None:
            return False
        weights, optimizer, payload = loaded
        self.engine.load_state_dicts(weights, optimizer)
        self.state = payload["loop"]
        self.batches.load_state_dict(payload["batches"])
        return True

    def save(self) -> None:
        """A resume state: gathered on every rank (collective), written by the writer."""
        weights, optimizer = self.engine.state_dicts()
        if self.engine.world.is_writer:
            self.resume.save(self.state["step"], weights, optimizer,
                             {"loop": self.state, "batches": self.batches.state_dict()})

    def run(self, total_steps: int, stop: int | None = None, before_step: Callable[[int], None] | None = None,
            after_step: Callable[[StepOutput], None] | None = None) -> bool:
        """Restore, then train up to min(total_steps, stop) steps in all; True when all total_steps are done.

        before_step(step) runs before step `step` (0-based) builds its batches (ABF at a phase start);
        after_step(out) after it (add metrics, mark a milestone). A state is saved every checkpoint_every steps, at
        milestones and at `stop`, so stopping at any step and rerunning equals one uninterrupted run."""
        self.restore()
        writer = self.engine.world.is_writer
        for row in self.state["history"]:
            if writer:
                log_row(self.live, row)
        state, cfg = self.state, self.cfg
        stop = total_steps if stop is None else min(total_steps, stop)
        quiet = None if writer else open(os.devnull, "w")  # one progress log per job: rank 0's
        progress = make_progress(self.desc, total_steps, state["step"], cfg.progress_every_steps,
                                 cfg.progress_every_s, self.stream if writer else quiet)
        started = time.perf_counter()
        tokens_since_log, seconds_since_log = 0, 0.0  # tokens/s over training steps only, not hooks or saves
        self.model.train()
        while state["step"] < stop:
            step = state["step"]
            if before_step is not None:
                before_step(step)
            began = time.perf_counter()
            micros = self.batches.micro_batches(step)
            lr = self.lr_at(step)
            losses, grad_norm = self.engine.step(micros, self.loss_fn, lr, cfg.grad_clip)
            tokens = sum(m["input_ids"].numel() for m in micros)
            tokens_since_log += tokens
            seconds_since_log += time.perf_counter() - began
            state["step"] = done = step + 1
            state["tokens_seen"] += tokens
            state["loss_end"] = losses["loss"]
            state["loss_start"] = losses["loss"] if state["loss_start"] is None else state["loss_start"]
            progress.update(done, losses["loss"], tokens)
            out = StepOutput(done, losses["loss"], tokens,
                             {**{f"train/{name}": v for name, v in losses.items()}, "train/lr": lr,
                              "train/grad_norm": grad_norm})
            if after_step is not None:
                after_step(out)
            if done % cfg.log_every == 0 or out.milestone or done == total_steps:  # the last step: always a row
                out.metrics.update({"train/tokens_per_s": tokens_since_log / max(seconds_since_log, 1e-9),
                                    "train/tokens_seen": state["tokens_seen"]})
                tokens_since_log, seconds_since_log = 0, 0.0
                row = {"step": done, "metrics": out.metrics}
                state["history"].append(row)
                if writer:
                    log_row(self.live, row)
            if out.milestone or done % cfg.checkpoint_every == 0 or done == stop:
                state["wall_time"] += time.perf_counter() - started
                started = time.perf_counter()
                self.save()
        progress.close()
        if quiet is not None:
            quiet.close()
        return state["step"] >= total_steps
