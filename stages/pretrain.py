"""Pretrain: the base model on the packed bucket streams, LR and data mixture following the FG-WSD plan.

Each optimizer step draws batch_size x grad_accum sequences of seq_len + 1 tokens (seq_len = pretrain.seq_len x the
phase's seq_len_scale). Sequence g of the run comes from the bucket picked by u_g = splitmix64(seed, g) / 2^64 over the
phase mixture's cumulative weights, and reads that bucket's NEXT window: the bucket's cursor advances by seq_len, so
each token is a target once per epoch and the stream wraps around for the next epoch. The whole data state is the
per-bucket cursors + the step, so a resume neither repeats nor skips a window. At each phase start the RoPE base
becomes rope_theta x rope_theta_scale (ABF).

Outputs: artifacts/<scale>/pretrain/{phases/<phase>/, final/} (HF Llama checkpoints + the tokenizer files, each
loadable standalone by transformers), manifest.json (tokens per phase planned vs consumed, wall time, losses) and
dvclive/pretrain/ (train loss, lr, phase, tokens/s, tokens seen; held-out loss at each phase end).

Resume state lives OUTSIDE the declared outputs (Snakemake and DVC delete the outputs of a failed job):
checkpoints/<scale>/pretrain/<hash of (params slices, plan, tokenizer manifest)>/ holds `latest` (the name of the
newest complete state), state-<step>/ (model.safetensors + trainer.pt: optimizer, RNG, step, cursors, phase, the
metrics history) and phases/<phase>/; every directory is written whole then renamed, so `kill -9` is safe anywhere.

Params: the `pretrain` slice, plus the `model` slice for the architecture (--params-json takes
{"pretrain": {...}, "model": {...}}); model.vocab_size is set from the trained tokenizer and must match when given.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from stages import common
from stages.lr_schedule import Phase, Schedule, build_schedule, lr_at, phase_at
from stages.tokenize import copy_tokenizer_files, read_stream

STAGE = "pretrain"
LATEST = "latest"
TRAINER_STATE = "trainer.pt"
RESUME_WEIGHTS = "model.safetensors"


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

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer over uint64 (wrapping arithmetic): a counter-based hash, no generator state to save."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sequence_buckets(seed: int, first: int, n: int, mixture: dict[str, float]) -> list[str]:
    """Buckets of global sequences first .. first + n - 1: sequence g takes the first bucket (name order) whose
    cumulative weight exceeds u_g = splitmix64(splitmix64(seed) xor g) / 2^64."""
    names = sorted(mixture)
    cum = np.cumsum([mixture[b] for b in names])
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
        u = (_splitmix64(key ^ np.arange(first, first + n, dtype=np.uint64)) >> np.uint64(11)) / float(1 << 53)
    picks = np.minimum(np.searchsorted(cum / cum[-1], u, side="right"), len(names) - 1)
    return [names[i] for i in picks]


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


# ----------------------------------------------------------------------------- optimizer

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on the weight matrices (attention, MLP, lm_head); none on RMSNorm weights (1-D gains,
    shrinking them rescales activations) or the embedding table (a sparse lookup: decay pulls rare tokens to 0)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed_tokens" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, p: dict, device: torch.device) -> torch.optim.AdamW:
    """AdamW; fused on CUDA, foreach (multi-tensor) on CPU."""
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, float(p["weight_decay"])), lr=0.0,
                             betas=tuple(float(b) for b in p["adam_betas"]), eps=float(p["adam_eps"]), **kernel)


# ----------------------------------------------------------------------------- resume state

def run_hash(p: dict, model_p: dict, plan: dict, tokens_manifest: Path) -> str:
    """Names the resume directory: a state is resumed only by a run with the same slices, plan and tokens."""
    return common.params_hash({"pretrain": p, "model": model_p, "plan": plan,
                               "tokens": common.sha256_file(tokens_manifest)})


def save_resume_state(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer: dict) -> None:
    """state-<step>/ written whole, then `latest` points at it, then older states go."""
    from safetensors.torch import save_model
    name = f"state-{trainer['step']:09d}"
    with common.atomic_dir(root / name) as tmp:
        save_model(model, str(tmp / RESUME_WEIGHTS))
        rng = {"rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["rng_cuda"] = torch.cuda.get_rng_state_all()
        torch.save({**trainer, **rng, "optimizer": optimizer.state_dict()}, tmp / TRAINER_STATE)
    common.write_text(root / LATEST, name)
    for old in root.glob("state-*"):
        if old.name != name:
            shutil.rmtree(old)


def load_resume_state(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore model, optimizer and RNG from the newest complete state; returns the trainer dict (None: fresh)."""
    from safetensors.torch import load_model
    for debris in [*root.glob(".*.tmp"), *root.glob("phases/.*.tmp")]:
        shutil.rmtree(debris) if debris.is_dir() else debris.unlink()
    if not (root / LATEST).is_file():
        return None
    state_dir = root / (root / LATEST).read_text(encoding="utf-8").strip()
    trainer = torch.load(state_dir / TRAINER_STATE, map_location="cpu", weights_only=True)
    load_model(model, str(state_dir / RESUME_WEIGHTS), device=str(next(model.parameters()).device))
    optimizer.load_state_dict(trainer.pop("optimizer"))
    torch.set_rng_state(trainer.pop("rng_cpu"))
    cuda_rng = trainer.pop("rng_cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    return trainer


def link_or_copy_dir(src: Path, dest: Path) -> list[Path]:
    """Materialize a finished checkpoint directory at `dest` (hard links: checkpoint files are never modified in
    place; a copy across filesystems)."""
    with common.atomic_dir(dest) as tmp:
        for f in sorted(src.iterdir()):
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copyfile(f, tmp / f.name)
    return sorted(dest.iterdir())


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def heldout_loss(model, stream: np.ndarray, seq_len: int, max_tokens: int, batch_size: int,
                 device: torch.device) -> float:
    """Mean next-token CE over the first min(max_tokens, len - 1) // seq_len non-overlapping windows of the stream
    (one shorter window when the stream is shorter than one)."""
    seq_len = min(seq_len, len(stream) - 1)
    n = max(1, min(max_tokens, len(stream) - 1) // seq_len)
    windows = torch.from_numpy(np.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])
                               .astype(np.int64))
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch_size):
        batch = windows[i:i + batch_size].to(device)
        with _autocast(device):
            total += model.loss(batch[:, :-1], batch[:, 1:]).item() * len(batch)
    model.train(was_training)
    return total / n


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 on CPU (exact, and what the resume tests compare bit for bit)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# ----------------------------------------------------------------------------- the training loop

def _apply_phase(model, ph: Phase, schedule: Schedule, base_theta: float, base_max_pos: int) -> None:
    """ABF at a phase start: RoPE base x the phase's scale; context = the longest seq_len trained so far."""
    longest = max([base_max_pos] + [q.seq_len for q in schedule.phases[:ph.index + 1]])
    model.set_rope_theta(base_theta * ph.rope_theta_scale, longest)


def train_step(model, optimizer: torch.optim.Optimizer, batch: torch.Tensor, lr: float, p: dict,
               device: torch.device) -> float:
    """One optimizer step on batch [batch_size x grad_accum, seq_len + 1]: each micro-batch adds
    grad(L_micro / grad_accum), so the update follows the mean loss over the batch; clip the global grad norm;
    AdamW at lr. Returns that mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = 0.0
    for micro in batch.split(int(p["batch_size"])):
        with _autocast(device):
            micro_loss = model.loss(micro[:, :-1], micro[:, 1:]) / int(p["grad_accum"])
        micro_loss.backward()
        loss += micro_loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(p["grad_clip"]))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def run_pretrain(plan_path: str | Path, tokens_dir: str | Path, output_dir: str | Path, resume_dir: str | Path,
                 p: dict, model_p: dict, live_dir: str | Path, max_steps: int | None = None,
                 on_step: Callable[[int, list[tuple[str, int]]], None] | None = None) -> dict | None:
    """Train the whole plan (resuming the newest state of this run, if any); write the checkpoints and the manifest.

    max_steps stops after that many optimizer steps in all, saving the resume state (what a kill at that step
    leaves) and returning None. on_step(step, windows) sees the (bucket, cursor) of every window a step reads."""
    from tqdm import tqdm

    from model import NanbeigeForCausalLM, save_pretrained
    tokens_dir, output_dir = Path(tokens_dir), Path(output_dir)
    plan = load_plan(plan_path)
    tokens_manifest, streams, heldout = load_tokens(tokens_dir)
    cfg = model_config(model_p, tokens_manifest)
    seq_per_step = int(p["batch_size"]) * int(p["grad_accum"])
    schedule = build_schedule(plan, p["schedule"], int(p["seq_len"]), seq_per_step)
    check_streams(schedule, streams, tokens_dir)
    state_root = Path(resume_dir) / run_hash(p, model_p, plan, tokens_dir / "manifest.json")
    state_root.mkdir(parents=True, exist_ok=True)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    seed = int(p["seed"])
    torch.manual_seed(seed)
    model = NanbeigeForCausalLM(cfg).to(device)
    optimizer = build_optimizer(model, p, device)
    trainer = load_resume_state(state_root, model, optimizer) or {
        "step": 0, "cursors": {b: 0 for b in sorted(streams)}, "tokens_consumed": [0] * len(schedule.phases),
        "history": [], "heldout": {}, "loss_start": None, "loss_end": None, "wall_time": 0.0}
    live = common.open_live(live_dir)
    for row in trainer["history"]:
        _log_row(live, row)

    total = schedule.total_steps
    stop = total if max_steps is None else min(total, max_steps)
    started = time.perf_counter()
    tokens_since_log, seconds_since_log = 0, 0.0  # tokens/s over training steps only, not evals or checkpoints
    applied = None
    model.train()
    bar = tqdm(total=total, initial=trainer["step"], desc="pretrain", unit="step", file=sys.stderr, disable=None)
    while trainer["step"] < stop:
        step = trainer["step"]
        step_began = time.perf_counter()
        ph = phase_at(schedule, step)
        if applied != ph.index:
            _apply_phase(model, ph, schedule, cfg.rope_theta, cfg.max_position_embeddings)
            applied = ph.index
        lr = lr_at(schedule, step)
        buckets = sequence_buckets(seed, step * seq_per_step, seq_per_step, ph.mixture)
        batch, windows = read_windows(streams, trainer["cursors"], buckets, ph.seq_len)
        loss = train_step(model, optimizer, torch.from_numpy(batch).to(device), lr, p, device)
        if on_step is not None:
            on_step(step, windows)

        step_tokens = seq_per_step * ph.seq_len
        trainer["step"] = done = step + 1
        trainer["tokens_consumed"][ph.index] += step_tokens
        trainer["loss_start"] = loss if trainer["loss_start"] is None else trainer["loss_start"]
        trainer["loss_end"] = loss
        tokens_since_log += step_tokens
        seconds_since_log += time.perf_counter() - step_began
        bar.update(1)
        phase_end = done == ph.end
        if done % int(p["log_every"]) == 0 or phase_end:
            tps = tokens_since_log / max(seconds_since_log, 1e-9)
            tokens_since_log, seconds_since_log = 0, 0.0
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", phase=ph.name)
            row = {"step": done, "metrics": {"train/loss": loss, "train/lr": lr, "train/phase": ph.index,
                                             "train/tokens_per_s": tps,
                                             "train/tokens_seen": sum(trainer["tokens_consumed"])}}
            if phase_end:
                save_phase_checkpoint(state_root / "phases" / ph.name, model, tokens_dir, save_pretrained)
                losses = {name: heldout_loss(model, s, int(p["seq_len"]), int(p["eval_tokens"]),
                                             int(p["eval_batch_size"]), device) for name, s in heldout.items()}
                trainer["heldout"][ph.name] = losses
                row["metrics"].update({f"eval/heldout_{name}_loss": v for name, v in losses.items()})
            trainer["history"].append(row)
            _log_row(live, row)
        if phase_end or done % int(p["checkpoint_every"]) == 0 or done == stop:
            trainer["wall_time"] += time.perf_counter() - started
            started = time.perf_counter()
            save_resume_state(state_root, model, optimizer, trainer)
    bar.close()
    if trainer["step"] < total:
        live.end()
        return None
    manifest = finish(schedule, plan_path, tokens_dir, output_dir, state_root, p, model_p, trainer, cfg)
    live.end()
    return manifest


def _log_row(live, row: dict) -> None:
    live.step = row["step"]
    for name, value in row["metrics"].items():
        live.log_metric(name, value)
    live.next_step()


def save_phase_checkpoint(dest: Path, model, tokens_dir: Path, save_pretrained) -> None:
    """A standalone HF checkpoint: model.safetensors + config.json + the tokenizer files."""
    with common.atomic_dir(dest) as tmp:
        save_pretrained(model, tmp)
        copy_tokenizer_files(tokens_dir, tmp)


def finish(schedule: Schedule, plan_path, tokens_dir: Path, output_dir: Path, state_root: Path, p: dict,
           model_p: dict, trainer: dict, cfg) -> dict:
    """Materialize phases/<phase>/ and final/ (= the last phase's checkpoint) from the resume directory, then the
    manifest, last."""
    files = []
    for ph in schedule.phases:
        files += link_or_copy_dir(state_root / "phases" / ph.name, output_dir / "phases" / ph.name)
    last = schedule.phases[-1].name
    files += link_or_copy_dir(state_root / "phases" / last, output_dir / "final")
    phases = [{"name": ph.name, "stage": ph.stage, "steps": ph.steps, "seq_len": ph.seq_len,
               "rope_theta_scale": ph.rope_theta_scale, "tokens_planned": ph.planned_tokens,
               "tokens_consumed": trainer["tokens_consumed"][ph.index], "mixture": ph.mixture}
              for ph in schedule.phases]
    counts = {"steps": schedule.total_steps, "tokens_consumed": sum(trainer["tokens_consumed"]),
              "tokens_planned": sum(ph.planned_tokens for ph in schedule.phases), "phases": phases}
    streams = common.read_manifest(tokens_dir / "manifest.json")["buckets"]
    extra = {"schedule": schedule.kind, "model_params": model_p, "num_parameters": cfg.num_parameters(),
             "wall_time_s": round(trainer["wall_time"], 3), "loss_start": trainer["loss_start"],
             "loss_end": trainer["loss_end"], "heldout_loss": trainer["heldout"],
             "bucket_cursors": trainer["cursors"],
             "bucket_epochs": {b: trainer["cursors"][b] / streams[b]["tokens"] for b in sorted(trainer["cursors"])},
             "resume_dir": str(state_root)}
    return common.write_manifest(output_dir / "manifest.json", stage=STAGE, params=p,
                                 inputs=[plan_path, tokens_dir / "manifest.json"], outputs=files, counts=counts,
                                 code=common.code_version(f"stages.{STAGE}", "stages.lr_schedule", "stages.tokenize",
                                                          "model.llama", "model.ops", "model.checkpoint", "model.config"),
                                 extra=extra)


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
    except common.StageError as exc:
        common.fail(exc)
    if manifest is None:
        print(f"pretrain: stopped at --max-steps {args.max_steps}; rerun to resume")
        return
    print(f"pretrain: {manifest['counts']['steps']} steps, {manifest['counts']['tokens_consumed']} tokens, "
          f"loss {manifest['loss_start']:.3f} -> {manifest['loss_end']:.3f}, held-out {manifest['heldout_loss']}")


if __name__ == "__main__":
    main()
