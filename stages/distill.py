r"""Dual Preference Distillation (DPD): the student trained on the pairs and teacher targets of distill_targets.

The loss is stages/dpd_loss.py's (formula there): L = w_dpo L_DPO + w_pos L_KD(y+) + w_neg L_KD(y-), with the
reference log-probs and the teacher's top-k log-probs read from the artifact (stages/distill_targets.py: how pairs are
built and what is stored), the student's log-probs computed here. The three normalizers (pairs, positive completion
tokens, negative completion tokens) are summed over the optimizer step once (DPDLoss.units), so the update does not
depend on the micro-batch split.

Logged per step (dvclive/distill/): train/loss, train/dpo, train/kd_pos, train/kd_neg, and the implicit reward
  r(y) = beta (log pi_theta(y|x) - log pi_ref(y|x)):
  train/reward_margin    1/P sum_pairs r(y+) - r(y-)
  train/reward_accuracy  1/P #{pairs with r(y+) - r(y-) > 0}

Data: epoch e visits the pairs in the order of a permutation seeded by (seed, e); step t takes pairs
t * pairs_per_step .. (t + 1) * pairs_per_step - 1 of that concatenated stream, micro_batch_pairs to a micro-batch
(a pure function of t: nothing else to resume). Steps = ceil(epochs * pairs / pairs_per_step), at most max_steps. Fewer than `min_pairs` pairs is an error; with
min_pairs 0 and no pairs the output is the student unchanged (counts.trained false; the end-to-end test's tiny run).

Output (artifacts/<scale>/distill/): the checkpoint (model.safetensors + config.json in HF Llama layout, the
student's tokenizer files) and manifest.json (pairs, steps, the three loss parts at the first and last step, wall
time, targets_key). Resume states live in checkpoints/<scale>/distill/<hash of the slice, the targets manifest, the
student weights, the code, torch>/ (stages/training/resume.py): N steps == k steps + kill + resume (torch.equal).

Params: the `distill` slice (--params-json {"distill": {...}}).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from stages import common, training
from stages.dpd_loss import DPDWeights, StepCounts, dpd_loss, sequence_logprob
from stages.lr_schedule import piecewise_lr, warmup_decay
from stages.training import Loss, build_optimizer

STAGE = "distill"
CODE = (f"stages.{STAGE}",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The columns of distill_targets' pairs.parquet this stage reads (not imported from it: the training stage's code
# version, hence its reruns, must not follow the sampling and verifier code).
COLUMNS = ("pair_id", "pos_ids", "neg_ids", "pos_prompt_len", "neg_prompt_len", "pos_topk_logprobs", "pos_topk_ids",
           "neg_topk_logprobs", "neg_topk_ids", "ref_pos", "ref_neg")


# ----------------------------------------------------------------------------- the artifact

def load_pairs(targets_dir: str | Path, vocab_size: int) -> tuple[list[dict], dict]:
    """(pairs, the distill_targets manifest); a malformed pair is a StageError naming it (the artifact is ours: a
    bad row is corruption or a version mismatch, never data to skip)."""
    targets_dir = Path(targets_dir)
    manifest = common.read_manifest(targets_dir / "manifest.json")
    if manifest is None or manifest.get("stage") != "distill_targets":
        raise common.StageError(f"{targets_dir / 'manifest.json'}: missing or not a distill_targets manifest")
    path = targets_dir / "pairs.parquet"
    missing = sorted(set(COLUMNS) - set(pq.read_schema(path).names))
    if missing:
        raise common.StageError(f"{path}: no columns {missing}")
    k = int(manifest["top_k"])
    pairs = pq.read_table(path, columns=list(COLUMNS)).to_pylist()
    for q in pairs:
        for side in ("pos", "neg"):
            ids, n0 = q[f"{side}_ids"], q[f"{side}_prompt_len"]
            n = len(ids) - n0
            problem = None
            if not 1 <= n0 < len(ids):
                problem = f"prompt_len {n0} outside [1, {len(ids)})"
            elif len(q[f"{side}_topk_logprobs"]) != n * k or len(q[f"{side}_topk_ids"]) != n * k:
                problem = f"top-k lengths {len(q[f'{side}_topk_logprobs'])}, {len(q[f'{side}_topk_ids'])} != {n} x {k}"
            elif max(ids) >= vocab_size or max(q[f"{side}_topk_ids"]) >= vocab_size or min(ids) < 0:
                problem = f"token ids outside the student's vocabulary of {vocab_size}"
            if problem:
                raise common.StageError(f"{path}: pair {q['pair_id']} {side}: {problem}")
    return pairs, manifest


def collate(pairs: list[dict], k: int) -> dict[str, torch.Tensor]:
    """A micro-batch of B pairs, row 0 the positive and row 1 the negative of each: input_ids / targets / mask
    [B, 2, T] (right-padded; mask 1 at positions whose target is a completion token), teacher topk_logprobs /
    topk_ids [B, 2, T, k] (0 off the mask), ref_logps [B, 2]. Pairs stay together under data-parallel row sharding."""
    t = max(max(len(q["pos_ids"]), len(q["neg_ids"])) for q in pairs) - 1
    b = len(pairs)
    ids = torch.zeros(b, 2, t + 1, dtype=torch.long)
    mask = torch.zeros(b, 2, t, dtype=torch.bool)
    top_lp = torch.zeros(b, 2, t, k, dtype=torch.float32)
    top_ids = torch.zeros(b, 2, t, k, dtype=torch.long)
    ref = torch.zeros(b, 2, dtype=torch.float32)
    for i, q in enumerate(pairs):
        for j, side in enumerate(("pos", "neg")):
            seq, n0 = q[f"{side}_ids"], q[f"{side}_prompt_len"]
            ids[i, j, :len(seq)] = torch.tensor(seq)
            mask[i, j, n0 - 1:len(seq) - 1] = True
            n = len(seq) - n0
            top_lp[i, j, n0 - 1:len(seq) - 1] = torch.tensor(q[f"{side}_topk_logprobs"]).view(n, k)
            top_ids[i, j, n0 - 1:len(seq) - 1] = torch.tensor(q[f"{side}_topk_ids"]).view(n, k)
        ref[i] = torch.tensor([q["ref_pos"], q["ref_neg"]])
    return {"input_ids": ids[:, :, :-1], "targets": ids[:, :, 1:], "mask": mask, "topk_logprobs": top_lp,
            "topk_ids": top_ids, "ref_logps": ref}


class DPDBatches:
    """The batch source (module docstring: per-epoch seeded permutations, pairs_per_step per step)."""

    def __init__(self, pairs: list[dict], k: int, seed: int, pairs_per_step: int, micro_batch_pairs: int):
        self.pairs, self.k, self.seed = pairs, k, seed
        self.pairs_per_step, self.micro_batch_pairs = pairs_per_step, micro_batch_pairs

    def step_pairs(self, step: int) -> list[int]:
        """Indices of the pairs of step `step`: positions step * pairs_per_step ... of the epoch-permuted stream."""
        n = len(self.pairs)
        orders: dict[int, np.ndarray] = {}
        out = []
        for at in range(step * self.pairs_per_step, (step + 1) * self.pairs_per_step):
            epoch = at // n
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.append(int(orders[epoch][at % n]))
        return out

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        chosen = [self.pairs[i] for i in self.step_pairs(step)]
        return [collate(chosen[i:i + self.micro_batch_pairs], self.k)
                for i in range(0, len(chosen), self.micro_batch_pairs)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ----------------------------------------------------------------------------- the loss

def student_logprobs(model, input_ids: torch.Tensor, targets: torch.Tensor,
                     topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probs of the targets [N, T] and at the teacher's top-k ids [N, T, k], fp32, from one
    [N, T, vocab] log-softmax. Fine at tiny and small; at 3b this is a fused LM-head op (model/ops.py
    linear_token_logprobs generalized to gather at [N, T, k] ids) so the full-vocabulary tensor never exists."""
    logp = torch.log_softmax(model(input_ids).float(), dim=-1)
    return logp.gather(-1, targets[..., None])[..., 0], logp.gather(-1, topk_ids)


class DPDLoss(Loss):
    """stages/dpd_loss.py's L over a micro-batch of pairs (collate's layout); units: pairs, pos_tokens, neg_tokens.
    Parts (each the micro-batch's sum over the step's count): dpo, kd_pos, kd_neg, reward_margin, reward_accuracy."""

    def __init__(self, weights: DPDWeights):
        self.w = weights

    def units(self, micro):
        mask = micro["mask"]
        return {"pairs": int(mask.shape[0]), "pos_tokens": int(mask[:, 0].sum()), "neg_tokens": int(mask[:, 1].sum())}

    def __call__(self, model, micro, totals):
        b, _, t = micro["input_ids"].shape
        flat = lambda x: x.reshape(b * 2, *x.shape[2:])  # noqa: E731  (pos, neg) rows -> one forward
        tok, at_topk = student_logprobs(model, flat(micro["input_ids"]), flat(micro["targets"]),
                                        flat(micro["topk_ids"]))
        tok, at_topk = tok.view(b, 2, t), at_topk.view(b, 2, t, -1)
        mask = micro["mask"].to(tok.dtype)
        ref, teacher = micro["ref_logps"], micro["topk_logprobs"]
        counts = StepCounts(totals["pairs"], totals["pos_tokens"], totals["neg_tokens"])
        loss, parts = dpd_loss(tok[:, 0], tok[:, 1], mask[:, 0], mask[:, 1], ref[:, 0], ref[:, 1],
                               teacher[:, 0], at_topk[:, 0], teacher[:, 1], at_topk[:, 1], self.w, counts)
        with torch.no_grad():
            margin = self.w.beta * ((sequence_logprob(tok[:, 0], mask[:, 0]) - ref[:, 0])
                                    - (sequence_logprob(tok[:, 1], mask[:, 1]) - ref[:, 1]))
        return {"loss": loss, **{name: torch.tensor(v) for name, v in parts.items()},
                "reward_margin": margin.sum() / counts.pairs, "reward_accuracy": (margin > 0).sum() / counts.pairs}


def dpd_weights(p: dict) -> DPDWeights:
    return DPDWeights(beta=float(p["beta"]), w_dpo=float(p["w_dpo"]), w_pos=float(p["w_pos"]),
                      w_neg=float(p["w_neg"]), kd_reverse_weight=float(p["kd_reverse_weight"]))


# ----------------------------------------------------------------------------- the run

def total_steps(p: dict, n_pairs: int) -> int:
    """ceil(epochs * pairs / pairs_per_step), capped at max_steps when set (a budget whatever the pair yield)."""
    if n_pairs == 0:
        return 0
    steps = max(1, math.ceil(float(p["epochs"]) * n_pairs / int(p["pairs_per_step"])))
    return steps if p.get("max_steps") is None else min(steps, int(p["max_steps"]))


PARTS = ("loss", "dpo", "kd_pos", "kd_neg", "reward_margin", "reward_accuracy")


def run_distill(targets_dir: str | Path, student_dir: str | Path, output_dir: str | Path, resume_dir: str | Path,
                p: dict, live_dir: str | Path, stop: int | None = None) -> dict | None:
    """Train (resuming this run's newest state), then write the checkpoint and the manifest; `stop` ends after that
    many steps in all with a resume state and returns None (what a kill leaves)."""
    from model import load_pretrained, save_pretrained
    targets_dir, student_dir, output_dir = Path(targets_dir), Path(student_dir), Path(output_dir)
    torch.set_num_threads(int(p["cpu_threads"]))
    device = training.default_device()
    training.seed_run(int(p["seed"]), device)
    model = load_pretrained(student_dir, device=device)
    pairs, targets_manifest = load_pairs(targets_dir, model.config.vocab_size)
    if len(pairs) < int(p["min_pairs"]):
        raise common.StageError(f"{targets_dir / 'pairs.parquet'}: {len(pairs)} pairs, fewer than min_pairs "
                                f"{p['min_pairs']} (dropped: {targets_manifest['counts'].get('dropped')})")
    steps = total_steps(p, len(pairs))
    if int(p["pairs_per_step"]) % int(p["micro_batch_pairs"]):
        raise common.StageError(f"{STAGE}: pairs_per_step {p['pairs_per_step']} is not a multiple of "
                                f"micro_batch_pairs {p['micro_batch_pairs']}")
    batches = DPDBatches(pairs, int(targets_manifest["top_k"]), int(p["seed"]), int(p["pairs_per_step"]),
                         int(p["micro_batch_pairs"]))
    lr = warmup_decay(max(steps, 1), int(p["warmup_steps"]), float(p["lr_peak"]), float(p["lr_final"]),
                      p["lr_shape"])
    root = training.run_dir(resume_dir, {STAGE: p, "targets": common.sha256_file(targets_dir / "manifest.json"),
                                         "student": common.sha256_file(student_dir / "model.safetensors")}, CODE)
    live = common.open_live(live_dir)
    trainer = training.Trainer(model, build_optimizer(model, p, device), lambda t: piecewise_lr(lr, t),
                               DPDLoss(dpd_weights(p)), batches, training.LoopConfig.from_params(p),
                               training.ResumeDir(root), live, device, desc=STAGE)
    trainer.state["stage"] = {"parts_start": None, "parts_end": None}

    def after_step(out: training.StepOutput) -> None:
        parts = {name: out.metrics[f"train/{name}"] for name in PARTS}
        stage = trainer.state["stage"]
        stage["parts_start"] = stage["parts_start"] or parts
        stage["parts_end"] = parts

    if steps:
        finished = trainer.run(steps, stop=stop, after_step=after_step)
    else:  # 0 pairs (min_pairs 0): the student unchanged; one row, so the dvclive metrics and plots exist
        finished = True
        live.log_metric("train/pairs", 0)
        live.next_step()
    live.end()
    if not finished:
        return None
    files = save_pretrained(model, output_dir)
    for name in TOKENIZER_FILES:
        with common.atomic_path(output_dir / name) as tmp:
            tmp.write_bytes((student_dir / name).read_bytes())
        files.append(output_dir / name)
    state = trainer.state
    counts = {"pairs": len(pairs), "steps": steps, "trained": steps > 0, "pairs_trained": steps * int(p["pairs_per_step"]),
              "tokens_seen": state["tokens_seen"]}
    extra = {"parts_start": state["stage"]["parts_start"], "parts_end": state["stage"]["parts_end"],
             "loss_start": state["loss_start"], "loss_end": state["loss_end"],
             "wall_time_s": round(state["wall_time"], 3), "targets_key": targets_manifest["targets_key"],
             "top_k": targets_manifest["top_k"], "resume_dir": str(root)}
    return common.write_manifest(output_dir / "manifest.json", stage=STAGE, params=p,
                                 inputs=[targets_dir / "manifest.json", targets_dir / "pairs.parquet",
                                         student_dir / "model.safetensors"],
                                 outputs=files, counts=counts, code=common.code_version_closure(*CODE), extra=extra)


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--targets-dir", required=True, help="artifacts/<scale>/distill_targets")
    ap.add_argument("--student", required=True, help="student checkpoint (sft_full): the initial weights and pi_ref")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--resume-dir", required=True, help="resume states (not an output): checkpoints/<scale>/distill")
    ap.add_argument("--live-dir", default="dvclive/distill", help="dvclive metrics and plots")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop after this many optimizer steps in all, leaving a resume state (tests: a kill)")
    args = ap.parse_args()
    try:
        manifest = run_distill(args.targets_dir, args.student, args.output_dir, args.resume_dir,
                               common.resolve_cli_params(args, STAGE), args.live_dir, stop=args.stop_at)
    except common.StageError as exc:
        common.fail(exc)
    if manifest is None:
        print(f"{STAGE}: stopped at --stop-at {args.stop_at}; rerun to resume")
        return
    print(f"{STAGE}: {manifest['counts']['pairs']} pairs, {manifest['counts']['steps']} steps, "
          f"parts {manifest['parts_start']} -> {manifest['parts_end']}, {manifest['wall_time_s']} s")


if __name__ == "__main__":
    main()
