"""Pretrain: the base model on the packed bucket streams, LR and data mixture following the FG-WSD plan.

Each optimizer step draws batch_size x grad_accum sequences of seq_len + 1 tokens (seq_len = pretrain.seq_len x the
phase's seq_len_scale). Each sequence's bucket is assigned by quota over the phase mixture (BucketQuota: every
bucket's count stays within about one sequence of its expected count, so the plan's mixtures and epochs hold in
trained tokens), and reads that bucket's NEXT window: the bucket's cursor advances by seq_len, so each token is a
target once per epoch and the stream wraps around for the next epoch. The whole data state is the quota credits,
the per-bucket cursors and the step, so a resume neither repeats nor skips a window. Phases last
ceil(tokens / tokens per step) steps, at least pretrain.min_phase_steps. At each phase start the RoPE base
becomes rope_theta x rope_theta_scale (ABF).

Outputs: artifacts/<scale>/pretrain/{phases/<phase>/, final/} (HF Llama checkpoints + the tokenizer files, each
loadable standalone by transformers), manifest.json (tokens per phase planned vs consumed, wall time, losses) and
dvclive/pretrain/ (train loss, lr, phase, tokens/s, tokens seen; held-out loss at each phase end).

Training is the shared loop (stages/training): PretrainBatches is its batch source, TokenCrossEntropy (mask = 1) its
loss, so a step's loss is the mean next-token CE over all batch_size x grad_accum x seq_len tokens of the step.
Progress: a tqdm bar on a TTY, else a line every progress_every_steps steps or progress_every_s seconds (the log).

Backends (pretrain.backend, stages/training/engine.py): `torch` (default) is this process alone, or under torchrun
FSDP2 over all ranks (pretrain.activation_checkpointing recomputes each layer in backward); `megatron` is a
Megatron-core GPTModel with its forward_backward schedule, DDP and optimizer (pretrain.megatron: parallel sizes,
recompute, transformer_engine). Both read the same plan, LR table and PretrainBatches: every rank builds the step's
global windows and trains on its rows r::DP, with the loss normalized by the step's global token count, so the global
batch is the single-process one. Rank 0 writes the outputs and resume states (full tensors, HF names: a run resumes
at another world size). A multi-GPU launch line comes from stages/training/launch.py.

Resume state lives OUTSIDE the declared outputs (Snakemake and DVC delete the outputs of a failed job):
checkpoints/<scale>/pretrain/<hash of (params slices, plan, tokenizer manifest, the code of every repo module pretrain
imports, torch version)>/ holds `latest` (the name of the newest complete state), state-<step>/ (model.safetensors +
trainer.pt: optimizer, RNG, step, cursors, the metrics history) and phases/<phase>/; every directory is written whole
then renamed, so `kill -9` is safe anywhere. A code change starts a new run (it never re-links an old checkpoint).

Params: the `pretrain` slice, plus the `model` slice for the architecture (--params-json takes
{"pretrain": {...}, "model": {...}}); model.vocab_size is set from the trained tokenizer and must match when given.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model import ops
from model.config import ModelError
from stages import common, training
from stages.lr_schedule import Phase, Schedule, build_schedule, lr_at, phase_at
from stages.tokenize import copy_tokenizer_files, read_stream
from stages.training import TokenCrossEntropy, build_optimizer, optimizer_step

STAGE = "pretrain"
CODE = (f"stages.{STAGE}",)  # the code version covers every repo module this one imports (common.repo_imports)


# ----------------------------------------------------------------------------- inputs

def load_plan(path: str | Path) -> dict:
    path = Path(path)
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise common.StageError(f"{path}: plan file is missing") from None
    except json.JSONDecodeError as exc:
        raise common.StageError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    for key in ("lr_peak", "lr_final", "phases"):
        if key not in plan:
            raise common.StageError(f"{path}: plan has no {key!r}")
    return plan


def load_tokens(tokens_dir: str | Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The tokenize manifest and its streams as memmaps: ({bucket: tokens}, {heldout name: tokens})."""
    tokens_dir = Path(tokens_dir)
    manifest = common.read_manifest(tokens_dir / "manifest.json")
    if manifest is None or manifest.get("stage") != "tokenize":
        raise common.StageError(f"{tokens_dir / 'manifest.json'}: missing or not a tokenize manifest")

    def open_streams(group: str) -> dict[str, np.ndarray]:
        return {name: read_stream(tokens_dir / s["bin"], manifest["dtype"])[0]
                for name, s in sorted(manifest[group].items())}
    return manifest, open_streams("buckets"), open_streams("heldout")


def model_config(model_p: dict, tokens_manifest: dict):
    """ModelConfig from the `model` slice, with vocab_size and special token ids from the trained tokenizer."""
    from model import ModelConfig
    vocab = tokens_manifest["vocab_size"]
    if model_p.get("vocab_size") not in (None, vocab):
        raise common.StageError(f"params model.vocab_size={model_p['vocab_size']} but the tokenizer has {vocab} "
                                f"tokens (tokenize.vocab_size owns it): make them equal")
    special = tokens_manifest["special_tokens"]
    return ModelConfig.from_params({**model_p, "vocab_size": vocab, "eos_token_id": special["<|endoftext|>"],
                                    "pad_token_id": special["<|pad|>"]})


# ----------------------------------------------------------------------------- data

QUOTA_ONE = 1 << 32


def quota_weights(mixture: dict[str, float]) -> dict[str, int]:
    """Integer weights W_b summing to exactly 2^32, proportional to the mixture (largest remainder, ties by name)."""
    names = sorted(mixture)
    total = sum(mixture.values())
    raw = {b: mixture[b] / total * QUOTA_ONE for b in names}
    out = {b: int(raw[b]) for b in names}
    short = QUOTA_ONE - sum(out.values())
    for b in sorted(names, key=lambda b: (-(raw[b] - out[b]), b))[:short]:
        out[b] += 1
    return out


class BucketQuota:
    """Which bucket each sequence reads: quotas, not independent draws, so the mixture holds in trained tokens.

    Smooth weighted round robin on exact integer credits: for every sequence, each bucket of the current phase's
    mixture gains W_b (quota_weights), the bucket with the largest credit takes the sequence and pays 2^32 (ties:
    the smaller seeded offset). So credit_b = 2^32 (E_b - n_b) + o_b, where n_b is b's sequences so far and
    E_b = sum over those sequences of b's mixture weight at the time; |n_b - E_b| stays below a small constant (one
    sequence per bucket in the mixture at worst, far less in practice: a test measures it), carried across phase
    boundaries. Independent draws would miss E_b by ~sqrt(E_b) sequences: 6% of a 250-sequence bucket.
    The seed enters only through the initial offsets o_b in [0, 2^31), which fix the interleaving order."""

    def __init__(self, buckets: list[str], seed: int):
        self.credits = {b: int(hashlib.sha256(f"{seed}/{b}".encode()).hexdigest()[:8], 16) >> 1
                        for b in sorted(buckets)}
        self._order = dict(self.credits)

    def assign(self, mixture: dict[str, float], n: int) -> list[str]:
        """Buckets of the next n sequences under `mixture` (advances the credits)."""
        weights = {b: w for b, w in quota_weights(mixture).items() if w > 0}
        out = []
        for _ in range(n):
            for b, w in weights.items():
                self.credits[b] += w
            pick = max(weights, key=lambda b: (self.credits[b], -self._order[b]))
            self.credits[pick] -= QUOTA_ONE
            out.append(pick)
        return out

    def state_dict(self) -> dict:
        return {"credits": dict(self.credits)}

    def load_state_dict(self, state: dict) -> None:
        self.credits = dict(state["credits"])


def read_windows(streams: dict[str, np.ndarray], cursors: dict[str, int], buckets: list[str],
                 seq_len: int) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Windows of seq_len + 1 tokens, one per entry of `buckets`, each at its bucket's cursor (mod the stream
    length: wrapping is the next epoch); advances `cursors` in place by seq_len per window. Returns the token
    matrix [n, seq_len + 1] and the (bucket, cursor) of every window read."""
    out = np.empty((len(buckets), seq_len + 1), dtype=np.int64)
    read = []
    for i, bucket in enumerate(buckets):
        stream = streams[bucket]
        start = cursors[bucket]
        out[i] = stream[(start + np.arange(seq_len + 1)) % len(stream)]
        read.append((bucket, start))
        cursors[bucket] = start + seq_len
    return out, read


def check_streams(schedule: Schedule, streams: dict[str, np.ndarray], tokens_dir: Path) -> None:
    for ph in schedule.phases:
        missing = sorted(set(ph.mixture) - set(streams))
        if missing:
            raise common.StageError(f"plan phase {ph.name}: buckets {missing} have no stream in {tokens_dir} "
                                    f"(has {sorted(streams)})")
    empty = sorted(b for b, s in streams.items() if len(s) == 0)
    if empty:
        raise common.StageError(f"{tokens_dir}: empty bucket streams {empty}")


# ----------------------------------------------------------------------------- evaluation

def heldout_loss(engine, stream: np.ndarray, seq_len: int, max_tokens: int, batch_size: int) -> float:
    """Mean next-token CE over the first min(max_tokens, len - 1) // seq_len non-overlapping windows of the stream
    (one shorter window when the stream is shorter than one), through the backend's forward (every rank the same
    windows)."""
    seq_len = min(seq_len, len(stream) - 1)
    n = max(1, min(max_tokens, len(stream) - 1) // seq_len)
    windows = torch.from_numpy(np.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])
                               .astype(np.int64))
    model = engine.model
    was_training = model.training
    model.eval()
    total = sum(engine.eval_loss(windows[i:i + batch_size]) * len(windows[i:i + batch_size])
                for i in range(0, n, batch_size))
    model.train(was_training)
    return total / n


# ----------------------------------------------------------------------------- the batch source and the run

def lm_micro_batches(batch: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Token windows [n, seq_len + 1] -> micro-batches of batch_size rows for TokenCrossEntropy: every position a
    target (mask 1)."""
    return [{"input_ids": m[:, :-1], "targets": m[:, 1:], "mask": torch.ones(m[:, 1:].shape, dtype=torch.bool)}
            for m in batch.split(batch_size)]


class PretrainBatches:
    """The FG-WSD batch source: step t reads seq_per_step windows at the phase's seq_len, their buckets assigned by
    BucketQuota over the phase mixture, each at its bucket's cursor. State: the quota credits and the cursors.
    `windows` holds the (bucket, cursor) of every window the latest step read."""

    def __init__(self, streams: dict[str, np.ndarray], schedule: Schedule, seed: int, batch_size: int,
                 seq_per_step: int):
        self.streams, self.schedule, self.seed = streams, schedule, seed
        self.batch_size, self.seq_per_step = batch_size, seq_per_step
        self.cursors = {b: 0 for b in sorted(streams)}
        self.quota = BucketQuota(sorted(streams), seed)
        self.windows: list[tuple[str, int]] = []

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        ph = phase_at(self.schedule, step)
        buckets = self.quota.assign(ph.mixture, self.seq_per_step)
        batch, self.windows = read_windows(self.streams, self.cursors, buckets, ph.seq_len)
        return lm_micro_batches(torch.from_numpy(batch), self.batch_size)

    def state_dict(self) -> dict:
        return {"cursors": dict(self.cursors), "quota": self.quota.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.cursors = dict(state["cursors"])
        self.quota.load_state_dict(state["quota"])


def train_step(model, optimizer: torch.optim.Optimizer, batch: torch.Tensor, lr: float, p: dict,
               device: torch.device) -> float:
    """One pretraining optimizer step on windows [batch_size x grad_accum, seq_len + 1] (what the loop runs; the
    train benchmark times it): the mean next-token CE over all the step's tokens, clipped, at lr. Returns it."""
    losses, _ = optimizer_step(model, optimizer, lm_micro_batches(batch, int(p["batch_size"])), TokenCrossEntropy(),
                               lr, float(p["grad_clip"]), device)
    return losses["loss"]


def _apply_phase(engine, ph: Phase, schedule: Schedule, base_theta: float, base_max_pos: int) -> None:
    """ABF at a phase start: RoPE base x the phase's scale; context = the longest seq_len trained so far."""
    longest = max([base_max_pos] + [q.seq_len for q in schedule.phases[:ph.index + 1]])
    engine.set_rope_theta(base_theta * ph.rope_theta_scale, longest)


BACKENDS = ("torch", "megatron")


def build_engine(model, p: dict, device: torch.device, world: training.World):
    """The backend of pretrain.backend (default torch): the PyTorch loop (FSDP2 over the world when W > 1, with
    pretrain.activation_checkpointing) or Megatron-core (stages/training/megatron_backend.py)."""
    backend = p.get("backend", "torch")
    if backend not in BACKENDS:
        raise common.StageError(f"pretrain.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "megatron":
        from stages.training.megatron_backend import MegatronEngine
        return MegatronEngine(model, p, device, world)
    model = training.apply_fsdp(model, world, device, bool(p.get("activation_checkpointing", False)))
    return training.TorchEngine(model, build_optimizer(model, p, device), device, world)


def state_dir(resume_dir: str | Path, p: dict, model_p: dict, plan: dict, tokens_manifest: Path) -> Path:
    """The run's resume directory: keyed by the slices, the plan, the tokens, the code pretrain imports, torch."""
    return training.run_dir(resume_dir, {"pretrain": p, "model": model_p, "plan": plan,
                                         "tokens": common.sha256_file(tokens_manifest)}, CODE)


def run_pretrain(plan_path: str | Path, tokens_dir: str | Path, output_dir: str | Path, resume_dir: str | Path,
                 p: dict, model_p: dict, live_dir: str | Path, max_steps: int | None = None,
                 on_step: Callable[[int, list[tuple[str, int]]], None] | None = None) -> dict | None:
    """Train the whole plan (resuming the newest state of this run, if any); write the checkpoints and the manifest.

    max_steps stops after that many optimizer steps in all, saving the resume state (what a kill at that step
    leaves) and returning None. on_step(step, windows) sees the (bucket, cursor) of every window a step reads."""
    from model import NanbeigeForCausalLM, save_pretrained
    tokens_dir, output_dir = Path(tokens_dir), Path(output_dir)
    plan = load_plan(plan_path)
    tokens_manifest, streams, heldout = load_tokens(tokens_dir)
    cfg = model_config(model_p, tokens_manifest)
    ops.set_kernels(model_p.get("kernels", "auto"))
    seq_per_step = int(p["batch_size"]) * int(p["grad_accum"])
    schedule = build_schedule(plan, p["schedule"], int(p["seq_len"]), seq_per_step, int(p["min_phase_steps"]))
    check_streams(schedule, streams, tokens_dir)
    state_root = state_dir(resume_dir, p, model_p, plan, tokens_dir / "manifest.json")

    device = training.default_device()
    world = training.init_world(device)
    training.seed_run(int(p["seed"]), device)
    model = NanbeigeForCausalLM(cfg).to(device)  # the same seeded init on every rank and in every backend
    engine = build_engine(model, p, device, world)
    batches = PretrainBatches(streams, schedule, int(p["seed"]), int(p["batch_size"]), seq_per_step)
    live = common.open_live(live_dir) if world.is_writer else None
    trainer = training.Trainer(engine.model, engine.optimizer, lambda t: lr_at(schedule, t),
                               TokenCrossEntropy(), batches, training.LoopConfig.from_params(p),
                               training.ResumeDir(state_root, writer=world.is_writer), live, device, desc=STAGE,
                               engine=engine)
    trainer.state["stage"] = {"heldout": {}}  # held-out losses per phase; a resume restores them
    applied = None  # the phase whose RoPE base the model has

    def before_step(step: int) -> None:
        nonlocal applied
        ph = phase_at(schedule, step)
        if applied != ph.index:
            _apply_phase(engine, ph, schedule, cfg.rope_theta, cfg.max_position_embeddings)
            applied = ph.index

    def after_step(out: training.StepOutput) -> None:
        if on_step is not None:
            on_step(out.step - 1, batches.windows)
        ph = phase_at(schedule, out.step - 1)
        out.metrics["train/phase"] = ph.index
        if out.step == ph.end:
            save_phase_checkpoint(state_root / "phases" / ph.name, engine, tokens_dir, NanbeigeForCausalLM,
                                  save_pretrained)
            losses = {name: heldout_loss(engine, s, int(p["seq_len"]), int(p["eval_tokens"]),
                                         int(p["eval_batch_size"])) for name, s in heldout.items()}
            trainer.state["stage"]["heldout"][ph.name] = losses
            out.metrics.update({f"eval/heldout_{name}_loss": v for name, v in losses.items()})
            out.milestone = True

    try:
        finished = trainer.run(schedule.total_steps, stop=max_steps, before_step=before_step, after_step=after_step)
    finally:
        if hasattr(engine, "close"):
            engine.close()
    if not world.is_writer:
        return None
    manifest = finish(schedule, plan_path, tokens_dir, output_dir, state_root, p, model_p, trainer.state, batches,
                      cfg) if finished else None
    live.end()
    return manifest


def save_phase_checkpoint(dest: Path, engine, tokens_dir: Path, model_class, save_pretrained) -> None:
    """A standalone HF checkpoint: model.safetensors + config.json + the tokenizer files, written by the writer
    from the backend's full weights (gathered on every rank) in a weightless (meta) module of the current config."""
    weights = engine.hf_weights()
    if not engine.world.is_writer:
        return
    with torch.device("meta"):
        module = model_class(engine.model.config)
    module.load_state_dict(weights, assign=True)
    with common.atomic_dir(dest) as tmp:
        save_pretrained(module, tmp)
        copy_tokenizer_files(tokens_dir, tmp)


def tokens_consumed(schedule: Schedule, steps_done: int, seq_per_step: int) -> list[int]:
    """Tokens trained per phase after `steps_done` optimizer steps (inputs, seq_len per sequence)."""
    return [min(max(steps_done - ph.start, 0), ph.steps) * seq_per_step * ph.seq_len for ph in schedule.phases]


def finish(schedule: Schedule, plan_path, tokens_dir: Path, output_dir: Path, state_root: Path, p: dict,
           model_p: dict, state: dict, batches: PretrainBatches, cfg) -> dict:
    """Materialize phases/<phase>/ and final/ (= the last phase's checkpoint) from the resume directory, then the
    manifest, last."""
    files = []
    for ph in schedule.phases:
        files += training.materialize(state_root / "phases" / ph.name, output_dir / "phases" / ph.name)
    last = schedule.phases[-1].name
    files += training.materialize(state_root / "phases" / last, output_dir / "final")
    consumed = tokens_consumed(schedule, state["step"], batches.seq_per_step)
    phases = [{"name": ph.name, "stage": ph.stage, "steps": ph.steps, "seq_len": ph.seq_len,
               "rope_theta_scale": ph.rope_theta_scale, "tokens_planned": ph.planned_tokens,
               "tokens_consumed": consumed[ph.index], "mixture": ph.mixture}
              for ph in schedule.phases]
    counts = {"steps": schedule.total_steps, "tokens_consumed": sum(consumed),
              "tokens_planned": sum(ph.planned_tokens for ph in schedule.phases), "phases": phases}
    streams = common.read_manifest(tokens_dir / "manifest.json")["buckets"]
    cursors = batches.cursors
    extra = {"schedule": schedule.kind, "model_params": model_p, "num_parameters": cfg.num_parameters(),
             "wall_time_s": round(state["wall_time"], 3), "loss_start": state["loss_start"],
             "loss_end": state["loss_end"], "heldout_loss": state["stage"]["heldout"], "bucket_cursors": cursors,
             "bucket_epochs": {b: cursors[b] / streams[b]["tokens"] for b in sorted(cursors)},
             "resume_dir": str(state_root)}
    return common.write_manifest(output_dir / "manifest.json", stage=STAGE, params=p,
                                 inputs=[plan_path, tokens_dir / "manifest.json"], outputs=files, counts=counts,
                                 code=common.code_version_closure(*CODE), extra=extra)


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, help="the FG-WSD plan: artifacts/<scale>/schedule/plan.json")
    ap.add_argument("--tokens-dir", required=True, help="the tokenize output: artifacts/<scale>/tokenize")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--resume-dir", required=True, help="resume states, outside the outputs: checkpoints/<scale>/pretrain")
    ap.add_argument("--live-dir", default="dvclive/pretrain", help="dvclive metrics and plots")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop after this many optimizer steps in all, leaving a resume state (tests: a kill)")
    args = ap.parse_args()
    try:
        p = common.resolve_cli_params(args, STAGE)
        model_p = common.resolve_cli_params(args, "model")
        manifest = run_pretrain(args.plan, args.tokens_dir, args.output_dir, args.resume_dir, p, model_p,
                                args.live_dir, max_steps=args.max_steps)
    except (common.StageError, ModelError) as exc:
        common.fail(exc)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not training.World.from_env().is_writer:
        return
    if manifest is None:
        print(f"pretrain: stopped at --max-steps {args.max_steps}; rerun to resume")
        return
    print(f"pretrain: {manifest['counts']['steps']} steps, {manifest['counts']['tokens_consumed']} tokens, "
          f"loss {manifest['loss_start']:.3f} -> {manifest['loss_end']:.3f}, held-out {manifest['heldout_loss']}")


if __name__ == "__main__":
    main()
