"""SFT: cold-start SFT, full SFT and the tiny teacher, one stage module with three roles (params slices).

  teacher    tiny: a wider model trained from scratch (the slice's `model:` shape) on the task ladder; at larger
             scales `teacher.checkpoint: <HF dir>` adopts an existing checkpoint instead (validated, linked).
  sft_cold   cold-start SFT of the base checkpoint (paper: 32K context, 50% math / 30% science / 20% code).
  sft_full   full SFT of the cold-start checkpoint (paper: 64K context, 40% math + subject reasoning / 30% general /
             20% agent / 10% code).

Data (`--tasks-dir` and `--data`, any mix of): a task-ladder directory or its *_train.parquet files (math: user = the
chat prompt, reasoning_content = the worked steps, content = `#### <answer>`; code: reasoning_content = a one-line plan,
content = the fenced reference function), and conversation Parquets (sft_data: id, domain, messages = JSON list,
source).
Each row is encoded once with stages.chat.encode_chat (ChatML with <think>, max_len = seq_len + 1); a row it rejects
goes to rejected.parquet with its reason, so kept + rejected == rows read (checked). Nothing is truncated.

Mixture: the slice's `mixture` {domain: weight}. Domains without data are dropped and the weights renormalized over
the present ones (both recorded in the manifest); a domain with data but no weight is an error. An epoch holds
N = examples_per_epoch examples (null: the most that repeat no domain, floor(min_d |D_d| / w_d)), n_d = w_d N by
largest remainder; domain d's n_d are its examples in a seeded order, cycled when n_d > |D_d|. The epoch is shuffled
(seed, epoch), `epochs` epochs are concatenated and packed without cropping (pack_examples: doc_ids + positions, so
attention never crosses documents, model/llama.py). Steps = ceil(rows / (batch_size x grad_accum)), capped by
max_steps (the budget at tiny); the LR is warmup_decay over those steps.

Loss (stages/training TokenCrossEntropy, normalizer "tokens"): per optimizer step

    L = -1/N sum_{rows r of the step} sum_t mask_{r,t} log p(y_{r,t} | x_{r,<=t} of t's own document),
    N = sum mask over the whole step (once, before any backward)

with mask = 1 on assistant tokens (reasoning, answer and <|im_end|>), 0 on system / user / tool turns, headers and
padding: a token-level mean over the step's supervised tokens, not a mean of per-sequence means.

Outputs: <output-dir>/final/ (HF checkpoint + the tokenizer files, chat_template included), rejected.parquet,
manifest.json (rows read / used / rejected by reason, mixture requested and effective, tokens, steps, losses, wall
time) and the dvclive dir. Resume states live in --resume-dir/<hash of slice, inputs, code, torch>/ (the loop's).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages import common, tasks, training
from stages.chat import ChatExample, ChatRejected, encode_chat, load_chat_tokenizer, pack_examples
from stages.lr_schedule import piecewise_lr, warmup_decay
from stages.pretrain import model_config, save_phase_checkpoint
from stages.tokenize import PAD, copy_tokenizer_files

ROLES = ("teacher", "sft_cold", "sft_full")
CODE = ("stages.sft",)
CONVERSATION_COLUMNS = ("id", "domain", "messages", "source")
REJECTED_SCHEMA = pa.schema([("id", pa.string()), ("domain", pa.string()), ("source", pa.string()),
                             ("reason", pa.string()), ("detail", pa.string())])
CHECKPOINT_FILES = ("config.json", "tokenizer.json")


# ----------------------------------------------------------------------------- reading conversations

@dataclass(frozen=True)
class Row:
    """One training conversation before encoding; messages is the parsed list (or whatever the file held)."""
    id: str
    domain: str
    source: str
    messages: object


def task_messages(record: dict) -> list[dict]:
    """A task-ladder train record as a chat (stages.tasks.reference_messages)."""
    return tasks.reference_messages(record)


def read_rows(path: Path) -> list[Row]:
    """Rows of one Parquet: conversations (CONVERSATION_COLUMNS) or task-ladder records (their `domain`)."""
    table = pq.read_table(path)
    names = set(table.column_names)
    if set(CONVERSATION_COLUMNS) <= names:
        out = []
        for r in table.select(list(CONVERSATION_COLUMNS)).to_pylist():
            try:
                messages = json.loads(r["messages"]) if isinstance(r["messages"], str) else r["messages"]
            except json.JSONDecodeError:
                messages = None  # encode_chat rejects it: not_a_conversation
            out.append(Row(str(r["id"]), str(r["domain"]), str(r["source"]), messages))
        return out
    if {"id", "domain", "prompt"} <= names and ({"solution"} <= names or {"canonical_solution"} <= names):
        return [Row(r["id"], r["domain"], f"tasks:{path.name}", task_messages(r)) for r in table.to_pylist()]
    raise common.StageError(f"{path}: neither a conversation table ({', '.join(CONVERSATION_COLUMNS)}) nor "
                            f"task-ladder records (columns: {sorted(names)})")


def data_files(paths: list[str | Path]) -> list[Path]:
    """The Parquet files behind --data: a file as is; a task-ladder directory (tasks manifest) its *_train splits
    (held-out never trains); any other directory its *.parquet, sorted."""
    files = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            manifest = common.read_manifest(path / "manifest.json")
            pattern = "*_train.parquet" if manifest and manifest.get("stage") == "tasks" else "*.parquet"
            found = sorted(path.glob(pattern))
            if not found:
                raise common.StageError(f"{path}: no {pattern} to train on")
            files += found
        else:
            raise common.StageError(f"{path}: --data path does not exist")
    return files


def encode_rows(tok, rows: list[Row], max_len: int) -> tuple[list[tuple[Row, ChatExample]], list[dict]]:
    """(kept (row, example) pairs, rejected records with reason and detail); every row is in exactly one."""
    kept, rejected = [], []
    for row in rows:
        try:
            kept.append((row, encode_chat(tok, row.messages, max_len)))
        except ChatRejected as exc:
            rejected.append({"id": row.id, "domain": row.domain, "source": row.source, "reason": exc.reason,
                             "detail": exc.detail})
    common.check_conservation("sft", "all", len(rows), kept=len(kept), rejected=len(rejected))
    return kept, rejected


# ----------------------------------------------------------------------------- the mixture

def effective_mixture(mixture: dict[str, float], present: set[str]) -> tuple[dict[str, float], list[str]]:
    """(weights renormalized over the domains that have data, the mixture domains dropped for having none).
    A domain with data but no mixture weight, a weight <= 0, or no present domain at all is an error."""
    if not mixture or any(not isinstance(w, (int, float)) or w <= 0 for w in mixture.values()):
        raise common.StageError(f"mixture must map domains to positive weights, got {mixture}")
    unknown = sorted(present - set(mixture))
    if unknown:
        raise common.StageError(f"domains {unknown} have data but no mixture weight (mixture: {sorted(mixture)}): "
                                f"add them to the params mixture or drop their rows")
    kept = {d: float(w) for d, w in sorted(mixture.items()) if d in present}
    if not kept:
        raise common.StageError(f"no data for any mixture domain {sorted(mixture)}")
    total = sum(kept.values())
    return {d: w / total for d, w in kept.items()}, sorted(set(mixture) - present)


def domain_counts(weights: dict[str, float], pool_sizes: dict[str, int], examples: int | None) -> dict[str, int]:
    """n_d per epoch: N = examples (None: floor(min_d |D_d| / w_d), no domain repeats) split by largest remainder."""
    n = examples if examples is not None else min(int(pool_sizes[d] / w + 1e-9) for d, w in weights.items())
    if n < 1:
        raise common.StageError(f"an epoch of {n} examples: nothing to train on")
    raw = {d: w * n for d, w in weights.items()}
    counts = {d: int(math.floor(x)) for d, x in raw.items()}
    for d in sorted(raw, key=lambda d: (counts[d] - raw[d], d))[:n - sum(counts.values())]:
        counts[d] += 1
    return counts


def epoch_examples(pools: dict[str, list[ChatExample]], counts: dict[str, int], seed: int,
                   epoch: int) -> list[ChatExample]:
    """One epoch: each domain's counts[d] examples in a seeded order (cycled past its pool), then all shuffled."""
    chosen = []
    for i, d in enumerate(sorted(counts)):
        pool = pools[d]
        order = np.random.default_rng([seed, epoch, i]).permutation(len(pool))
        chosen += [pool[order[j % len(pool)]] for j in range(counts[d])]
    return [chosen[j] for j in np.random.default_rng([seed, epoch]).permutation(len(chosen))]


# ----------------------------------------------------------------------------- the batch source

class PackedBatches:
    """Step t trains rows [t R, (t + 1) R) of the packed rows (R = batch_size x grad_accum), batch_size rows per
    micro-batch: a pure function of the step (state {})."""

    def __init__(self, packed, batch_size: int, grad_accum: int):
        self.arrays = {"input_ids": packed.input_ids, "targets": packed.targets, "mask": packed.loss_mask,
                       "doc_ids": packed.doc_ids, "positions": packed.positions}
        self.batch_size, self.rows_per_step = batch_size, batch_size * grad_accum
        self.steps = math.ceil(len(packed.input_ids) / self.rows_per_step)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        lo = step * self.rows_per_step
        hi = min(lo + self.rows_per_step, len(self.arrays["input_ids"]))
        return [{k: torch.from_numpy(a[s:min(s + self.batch_size, hi)]) for k, a in self.arrays.items()}
                for s in range(lo, hi, self.batch_size)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ----------------------------------------------------------------------------- checkpoints

def check_same_tokenizer(checkpoint_dir: Path, tokens_dir: Path) -> str:
    """sha256 of the tokenizer.json a checkpoint and the student share; refuses a missing or different one (SFT
    continues a checkpoint with its own vocabulary; distillation compares the two models' token distributions)."""
    theirs, ours = checkpoint_dir / "tokenizer.json", tokens_dir / "tokenizer" / "tokenizer.json"
    if not theirs.is_file():
        raise common.StageError(f"{theirs} is missing: cannot check that {checkpoint_dir} uses the student's tokenizer")
    a, b = common.sha256_file(theirs), common.sha256_file(ours)
    if a != b:
        raise common.StageError(f"{checkpoint_dir}: tokenizer.json sha256 {a[:12]} != the student's {b[:12]} ({ours}): "
                                f"token-level distillation needs the same tokenizer; retokenize or pick another "
                                f"teacher")
    return a


def validate_checkpoint(path: Path, tokens_dir: Path) -> str:
    """An HF-layout checkpoint dir: config.json, tokenizer.json (the student's) and *.safetensors weights."""
    if not path.is_dir():
        raise common.StageError(f"{path}: checkpoint directory does not exist")
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise common.StageError(f"{path / name}: checkpoint file is missing")
    if not list(path.glob("*.safetensors")):
        raise common.StageError(f"{path}: no *.safetensors weights")
    return check_same_tokenizer(path, tokens_dir)


def write_rejected(output_dir: Path, rejected: list[dict]) -> Path:
    path = output_dir / "rejected.parquet"
    common.write_table(path, common.rows_to_table(rejected, REJECTED_SCHEMA))
    return path


def adopt_checkpoint(path: str | Path, tokens_dir: str | Path, output_dir: str | Path, live_dir: str | Path,
                     role: str, p: dict) -> dict:
    """teacher.checkpoint given: validate it, link (or copy) it to <output_dir>/final, write the manifest; the
    outputs are those of a trained run (an empty rejected.parquet and dvclive dir), so the rule is the same."""
    path, tokens_dir, output_dir = Path(path), Path(tokens_dir), Path(output_dir)
    tokenizer_sha = validate_checkpoint(path, tokens_dir)
    files = training.materialize(path, output_dir / "final")
    common.open_live(live_dir).end()
    return common.write_manifest(output_dir / "manifest.json", stage=role, params=p,
                                 inputs=[tokens_dir / "tokenizer" / "tokenizer.json"],
                                 outputs=[*files, write_rejected(output_dir, [])],
                                 counts={"steps": 0}, code=common.code_version_closure(*CODE),
                                 extra={"adopted_from": str(path), "tokenizer_sha256": tokenizer_sha})


def build_model(p: dict, init_dir: Path | None, tokens_dir: Path, device: torch.device):
    """From init_dir (same tokenizer) or from scratch with the slice's `model` shape (seeded init)."""
    from model import NanbeigeForCausalLM, load_pretrained
    shape = p.get("model")
    if (init_dir is None) == (shape is None):
        raise common.StageError("give exactly one of --init-dir (a checkpoint) and the slice's `model` shape "
                                "(from scratch)")
    if init_dir is not None:
        validate_checkpoint(init_dir, tokens_dir)
        model = load_pretrained(init_dir, device=device, dtype=torch.float32)
    else:
        model = NanbeigeForCausalLM(model_config(shape, common.read_manifest(tokens_dir / "manifest.json"))).to(device)
    if int(p["seq_len"]) > model.config.max_position_embeddings:
        raise common.StageError(f"seq_len {p['seq_len']} > the model's max_position_embeddings "
                                f"{model.config.max_position_embeddings}")
    return model


# ----------------------------------------------------------------------------- the run

def prepare_data(data: list[str | Path], tokens_dir: Path, p: dict) -> dict:
    """Read, encode, mix and pack: the packed rows and everything the manifest reports about the data."""
    files = data_files(data)
    rows = [row for f in files for row in read_rows(f)]
    tok = load_chat_tokenizer(tokens_dir / "tokenizer")
    kept, rejected = encode_rows(tok, rows, int(p["seq_len"]) + 1)
    pools: dict[str, list[ChatExample]] = {}
    for row, ex in kept:
        pools.setdefault(row.domain, []).append(ex)
    weights, dropped = effective_mixture(p["mixture"], set(pools))
    counts = domain_counts(weights, {d: len(v) for d, v in pools.items()}, p.get("examples_per_epoch"))
    stream = [ex for e in range(int(p["epochs"])) for ex in epoch_examples(pools, counts, int(p["seed"]), e)]
    packed = pack_examples(stream, int(p["seq_len"]), tok.token_to_id(PAD))
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    report = {"rows_read": len(rows), "rows_kept": len(kept), "rows_rejected": len(rejected),
              "rejected_by_reason": dict(sorted(by_reason.items())),
              "pool_by_domain": {d: len(v) for d, v in sorted(pools.items())},
              "mixture_requested": p["mixture"], "mixture_effective": weights, "domains_dropped": dropped,
              "examples_per_epoch_by_domain": counts,
              "domain_epochs": {d: int(p["epochs"]) * n / len(pools[d]) for d, n in counts.items()},
              "examples_trained": len(stream), "packed_rows": len(packed.input_ids),
              "positions_packed": int((packed.doc_ids >= 0).sum()),
              "supervised_tokens": int(packed.loss_mask.sum())}
    return {"files": files, "rejected": rejected, "packed": packed, "report": report}


def run_sft(role: str, data: list[str | Path], tokens_dir: str | Path, output_dir: str | Path,
            resume_dir: str | Path, live_dir: str | Path, p: dict, init_dir: str | Path | None = None,
            max_steps: int | None = None) -> dict | None:
    """Train `role` on `data` (resuming this run's newest state); write final/, rejected.parquet and the manifest.
    max_steps stops after that many optimizer steps in all (a kill, for the resume test) and returns None."""
    from model import NanbeigeForCausalLM, save_pretrained
    if role not in ROLES:
        raise common.StageError(f"role must be one of {ROLES}, got {role!r}")
    tokens_dir, output_dir = Path(tokens_dir), Path(output_dir)
    if p.get("checkpoint"):
        return adopt_checkpoint(p["checkpoint"], tokens_dir, output_dir, live_dir, role, p)
    init_dir = None if init_dir is None else Path(init_dir)
    d = prepare_data(data, tokens_dir, p)
    batches = PackedBatches(d["packed"], int(p["batch_size"]), int(p["grad_accum"]))
    total = batches.steps if p.get("max_steps") is None else min(batches.steps, int(p["max_steps"]))
    pieces = warmup_decay(total, int(p["warmup_steps"]), float(p["lr_peak"]), float(p["lr_final"]), p["lr_shape"])
    inputs = [*d["files"], tokens_dir / "tokenizer" / "tokenizer.json"]
    if init_dir is not None:
        inputs += sorted(init_dir.glob("*.safetensors")) + [init_dir / "config.json"]
    state_root = training.run_dir(resume_dir, {role: p, "inputs": {str(f): common.sha256_file(f) for f in inputs}},
                                  CODE)

    device = training.default_device()
    if device.type == "cpu":
        torch.set_num_threads(int(p["cpu_threads"]))
    training.seed_run(int(p["seed"]), device)
    model = build_model(p, init_dir, tokens_dir, device)
    live = common.open_live(live_dir)
    trainer = training.Trainer(model, training.build_optimizer(model, p, device), lambda t: piecewise_lr(pieces, t),
                               training.TokenCrossEntropy(), batches, training.LoopConfig.from_params(p),
                               training.ResumeDir(state_root), live, device, desc=role)
    finished = trainer.run(total, stop=max_steps)
    if not finished:
        live.end()
        return None
    save_phase_checkpoint(state_root / "final", trainer.engine, tokens_dir, NanbeigeForCausalLM, save_pretrained)
    files = training.materialize(state_root / "final", output_dir / "final")
    rejected_path = write_rejected(output_dir, d["rejected"])
    state = trainer.state
    counts = {**d["report"], "steps": total, "steps_planned_by_data": batches.steps,
              "tokens_trained": state["tokens_seen"]}
    extra = {"role": role, "init": None if init_dir is None else str(init_dir),
             "num_parameters": model.config.num_parameters(), "wall_time_s": round(state["wall_time"], 3),
             "loss_start": state["loss_start"], "loss_end": state["loss_end"], "resume_dir": str(state_root)}
    manifest = common.write_manifest(output_dir / "manifest.json", stage=role, params=p, inputs=inputs,
                                     outputs=[*files, rejected_path], counts=counts,
                                     code=common.code_version_closure(*CODE), extra=extra)
    live.end()
    return manifest


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--role", required=True, choices=ROLES, help="which params slice (and stage name) this run is")
    ap.add_argument("--tasks-dir", default=None, help="the task ladder (its *_train splits): artifacts/<scale>/tasks")
    ap.add_argument("--data", nargs="*", default=[],
                    help="conversation Parquets (sft_data) or dirs of them; task-ladder Parquets are read too")
    ap.add_argument("--tokens-dir", required=True,
                    help="the tokenize output (its tokenizer/): artifacts/<scale>/tokenize")
    ap.add_argument("--init-dir", default=None, help="HF checkpoint to start from (absent: the slice's model shape)")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--resume-dir", required=True,
                    help="resume states, outside the outputs: checkpoints/<scale>/<role>")
    ap.add_argument("--live-dir", required=True, help="dvclive metrics and plots: dvclive/<role>")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all (tests: a kill)")
    args = ap.parse_args()
    try:
        p = common.resolve_cli_params(args, args.role)
        data = ([args.tasks_dir] if args.tasks_dir else []) + args.data
        manifest = run_sft(args.role, data, args.tokens_dir, args.output_dir, args.resume_dir, args.live_dir, p,
                           args.init_dir, args.max_steps)
    except common.StageError as exc:
        common.fail(exc)
    if manifest is None:
        print(f"{args.role}: stopped at --max-steps {args.max_steps}; rerun to resume")
    elif "adopted_from" in manifest:
        print(f"{args.role}: adopted {manifest['adopted_from']}")
    else:
        c = manifest["counts"]
        print(f"{args.role}: {c['steps']} steps, {c['examples_trained']} examples ({c['rows_rejected']} rows "
              f"rejected), {c['supervised_tokens']} supervised tokens, loss {manifest['loss_start']:.3f} -> "
              f"{manifest['loss_end']:.3f}, {manifest['wall_time_s']:.1f} s")


if __name__ == "__main__":
    main()
