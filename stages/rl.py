r"""On-policy GRPO (RECIPE.md, RL): rl_stem, rl_code and rl_pref, one stage module with three roles (params slices).

  rl_stem   the distilled checkpoint trained on the math prompts its pass-rate filter kept (the paper's STEM stage;
            reward: the math verifier)
  rl_code   the rl_stem checkpoint trained on the code prompts its filter kept (reward: public + hidden tests in the
            sandbox, binary)
  rl_pref   the rl_code checkpoint trained on the math and code prompts its filter kept, rewarded by the pairwise
            reward model (stages/reward_model.py, --judge-dir): R(y, r) of the sample against the task's reference
            solution, both orders averaged, in (0, 1) (the paper's human-preference stage; tiny has no chat prompts,
            so the ladder's prompts stand in)

The kept set is stages/pass_filter.py's kept.parquet for the role (0.1 < pass rate < 0.9 under the previous model);
the loss and its formula are stages/grpo_loss.py's (no KL by default, truncated samples masked, token-level mean
over the optimizer step).

A step's rollout (GRPORollouts, the Trainer's batch source; the policy is the Trainer's model itself):
  prompts   the kept records in epochs, each a permutation seeded by (seed, epoch); a round takes the next
            prompts_per_step of that stream (the cursor is the batch source's resumable state)
  samples   group_size per prompt through the generation engine (pass_filter.sample_answers: chat prompt, stop at
            <|im_end|> / <|endoftext|>), sample j of prompt q at step t seeded by derived_seed(seed, role, t, q, j),
            j counting on when q recurs within the step, so a rollout depends on the weights, the step and the params
            alone and a resumed run draws the same samples
  rewards   pass_filter.role_rewarder: evaluation's ladder verifier (the filter, the reward and the held-out accuracy
            judge alike) or, for rl_pref, the reward model; the old log-probs are the engine's (Completion.logprobs)
  rounds    zero-variance groups are dropped (grpo_loss); while the step has no token to train, it samples another
            round, at most max_rounds (DAPO's dynamic sampling, bounded), and trains on every kept group of its
            rounds; none after max_rounds is a StageError (no prompt of the kept set is learnable for this policy)
  epochs    one rollout per optimizer step (ppo_epochs 1: on-policy); ppo_epochs E reuses a rollout for E steps, the
            rollout saved in the resume state so a stop between them resumes exactly
Generation runs under torch.no_grad with the model in eval mode, back in train mode before the micro-batches return.
Rollouts come from our engine or, with rollout_engine vllm (GPU nodes), from a colocated vLLM engine that gets the
policy's weights before every rollout (VLLMEngine.sync_weights); the old log-probs are then vLLM's raw ones, and a
resume gets samples of the same distribution, not the same samples (exactness holds on our engine).

Logged per step (dvclive, --live-dir): train/loss, train/pg, train/clip_fraction, train/ratio (train/kl with
kl_coef > 0), train/lr, train/grad_norm, and over the step's rollout (all rounds, dropped groups included):
  rl/reward_mean       mean reward                      rl/pass_rate      share of samples with reward > 0.5
  rl/response_length   mean completion tokens           rl/truncation_rate  share cut at max_new_tokens
  rl/entropy           -mean l_old over the sampled completion tokens: a Monte Carlo estimate of the per-token
                       entropy (exact in expectation at temperature 1, top_p 1) that needs no [tokens x vocab] logits
  rl/groups_dropped    zero-variance groups dropped     rl/groups_kept, rl/rounds, rl/samples, rl/truncated,
                                                        rl/tokens_trained
Outputs (--output-dir): final/ (HF checkpoint + the init checkpoint's tokenizer files) and manifest.json (steps,
totals over the run's rollouts, reward and pass rate of the first and last step, losses, wall time). Resume states
live in --resume-dir/<hash of the slice, kept set, init weights, code, torch>/: N steps == k steps + stop + resume
to N, bit for bit (tests/test_grpo.py).

A kept set smaller than `min_prompts` is an error; with min_prompts 0 and nothing kept the output is the init
checkpoint unchanged (counts.trained false, steps 0; the end-to-end test's tiny run, whose few-step models solve
nothing).

Params: the role's slice (--params-json {"rl_stem": {...}}).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from stages import common, training
from stages.chat import load_chat_tokenizer
from stages.eval_stats import derived_seed
from stages.grpo_loss import GRPOConfig, GRPOLoss, Sample, grpo_micro_batches
from stages.lr_schedule import piecewise_lr, warmup_decay
from stages.pass_filter import (ROLE_DOMAINS, Rewarder, judge_inputs, prompt_ids, role_rewarder, rollout_engine,
                                sample_answers)
from stages.tokenize import PAD

ROLES = tuple(ROLE_DOMAINS)
CODE = ("stages.rl",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOTALS = ("samples", "truncated", "groups_kept", "groups_dropped", "rounds", "tokens_trained")


def check_params(p: dict) -> None:
    problems = []
    for key, lo in (("steps", 1), ("prompts_per_step", 1), ("group_size", 2), ("ppo_epochs", 1), ("max_rounds", 1),
                    ("micro_batch_size", 1)):
        if int(p[key]) < lo:
            problems.append(f"{key} must be >= {lo}, got {p[key]}")
    if float(p["temperature"]) <= 0:
        problems.append(f"temperature must be > 0 (greedy groups have no variance), got {p['temperature']}")
    if not 0 < float(p["clip_low"]) < 1 or float(p["clip_high"]) <= 0 or float(p["kl_coef"]) < 0:
        problems.append(f"need 0 < clip_low < 1, clip_high > 0, kl_coef >= 0, got {p['clip_low']}, "
                        f"{p['clip_high']}, {p['kl_coef']}")
    if problems:
        raise common.StageError("rl: " + "; ".join(problems))


def load_kept(kept_dir: str | Path, role: str, min_prompts: int = 1) -> list[dict]:
    """The kept records of the role's pass filter (its manifest must say so), in file order; fewer than min_prompts
    is an error."""
    kept_dir = Path(kept_dir)
    manifest = common.read_manifest(kept_dir / "manifest.json")
    if manifest is None or manifest.get("stage") != "pass_filter" or manifest.get("role") != role:
        raise common.StageError(f"{kept_dir / 'manifest.json'}: missing or not the pass_filter manifest of {role}")
    records = pq.read_table(common.input_shard(kept_dir, "kept")).to_pylist()
    if len(records) < min_prompts:
        raise common.StageError(f"{kept_dir / 'kept.parquet'}: {len(records)} prompts kept, fewer than min_prompts "
                                f"{min_prompts} (histogram.json: the other candidates were too hard or too easy for "
                                f"the previous model)")
    return records


def write_final(output_dir: Path, model, init_dir: Path) -> None:
    """final/: the HF checkpoint + the init checkpoint's tokenizer files, written whole."""
    from model import save_pretrained
    with common.atomic_dir(output_dir / "final") as tmp:
        save_pretrained(model, tmp)
        for name in TOKENIZER_FILES:
            shutil.copyfile(init_dir / name, tmp / name)


def rollout_stats(groups: list[list[Sample]], dropped: int, rounds: int, micros: list[dict]) -> dict[str, float]:
    """The rl/ metrics of one rollout (module docstring), over every sampled group."""
    samples = [s for g in groups for s in g]
    n, tokens = len(samples), sum(len(s.completion_ids) for s in samples)
    return {"reward_mean": sum(s.reward for s in samples) / n, "pass_rate": sum(s.reward > 0.5 for s in samples) / n,
            "response_length": tokens / n, "entropy": -sum(sum(s.logprobs) for s in samples) / max(tokens, 1),
            "truncation_rate": sum(s.truncated for s in samples) / n, "samples": n,
            "truncated": sum(s.truncated for s in samples), "groups_kept": len(groups) - dropped,
            "groups_dropped": dropped, "rounds": rounds, "tokens_trained": sum(int(m["mask"].sum()) for m in micros)}


class GRPORollouts:
    """The batch source (module docstring): micro_batches(step) samples the step's rollout from the policy, or
    reuses the current one inside its ppo_epochs; state = the prompt cursor (+ the rollout when ppo_epochs > 1)."""

    def __init__(self, model, tok, records: list[dict], p: dict, role: str, reward_fn: Rewarder, ref_model=None,
                 engine=None):
        self.model, self.tok, self.records, self.p, self.role = model, tok, records, p, role
        self.reward_fn, self.ref, self.engine = reward_fn, ref_model, engine
        self.cfg = GRPOConfig.from_params(p)
        self.prompts = prompt_ids(tok, records)
        self.pad_id = tok.token_to_id(PAD)
        self.cursor, self.rollout, self.fresh = 0, None, False
        self._orders: dict[int, np.ndarray] = {}

    def record_at(self, position: int) -> int:
        """Index of the record at `position` of the epoch-permuted prompt stream."""
        n = len(self.records)
        epoch = position // n
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([int(self.p["seed"]), epoch]).permutation(n)}
        return int(self._orders[epoch][position % n])

    def sample_round(self, step: int, seen: dict[str, int]) -> list[list[Sample]]:
        """The next prompts_per_step prompts, group_size samples each, rewarded; `seen` counts samples per prompt
        id in this step (the sample index of the seed)."""
        p, size = self.p, int(self.p["group_size"])
        chosen = [self.record_at(self.cursor + i) for i in range(int(p["prompts_per_step"]))]
        self.cursor += len(chosen)
        seeds = []
        for i in chosen:
            q = self.records[i]["id"]
            first = seen.get(q, 0)
            seen[q] = first + size
            seeds.append([derived_seed(int(p["seed"]), self.role, step, q, j) for j in range(first, first + size)])
        completions = sample_answers(self.model, self.tok, [self.prompts[i] for i in chosen], seeds, p, self.engine)
        rewards = self.reward_fn([self.records[i] for i in chosen for _ in range(size)],
                                 [c.text for row in completions for c in row], p)
        return [[Sample(self.prompts[i], c.token_ids, c.logprobs, float(rewards[g * size + j]),
                        c.finish_reason == "length") for j, c in enumerate(row)]
                for g, (i, row) in enumerate(zip(chosen, completions))]

    def collect(self, step: int) -> dict:
        """{"step", "micros", "stats"}: rounds until the step has tokens to train (at most max_rounds)."""
        groups, seen = [], {}
        self.model.eval()
        if self.engine is not None:  # the policy's current weights into vLLM before its rollout (model/vllm_engine.py)
            self.engine.sync_weights(self.model)
        with torch.no_grad():
            for rounds in range(1, int(self.p["max_rounds"]) + 1):
                groups += self.sample_round(step, seen)
                micros, dropped = grpo_micro_batches(groups, self.cfg, int(self.p["micro_batch_size"]), self.pad_id)
                if any(bool(m["mask"].any()) for m in micros):
                    break
            else:
                raise common.StageError(
                    f"{self.role} step {step}: {rounds} rounds of {self.p['prompts_per_step']} prompts left nothing "
                    f"to train ({dropped} of {len(groups)} groups had equal rewards, every sample of the others was "
                    f"truncated): rerun the pass filter for this policy, or raise max_rounds / max_new_tokens")
            if self.ref is not None:
                device = self.ref.lm_head.weight.device
                for m in micros:
                    m["ref_logprobs"] = self.ref.token_logprobs(m["input_ids"].to(device),
                                                                m["targets"].to(device)).cpu()
        self.model.train()
        return {"step": step, "micros": micros, "stats": rollout_stats(groups, dropped, rounds, micros)}

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        epochs = int(self.p["ppo_epochs"])
        self.fresh = step % epochs == 0
        if self.fresh:
            self.rollout = self.collect(step)
        elif self.rollout is None or self.rollout["step"] != step - step % epochs:
            raise common.StageError(f"{self.role} step {step}: the resume state lacks the rollout of step "
                                    f"{step - step % epochs}")
        return self.rollout["micros"]

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "rollout": self.rollout if int(self.p["ppo_epochs"]) > 1 else None}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.rollout = int(state["cursor"]), state["rollout"]


def run_rl(role: str, kept_dir: str | Path, init_dir: str | Path, output_dir: str | Path, resume_dir: str | Path,
           live_dir: str | Path, p: dict, max_steps: int | None = None, reward_fn: Rewarder | None = None,
           judge_dir: str | Path | None = None) -> dict | None:
    """Train `role` from init_dir on the kept set (resuming this run's newest state); write final/ and the manifest.
    max_steps stops after that many optimizer steps in all (what a kill leaves) and returns None; reward_fn scores
    the completions (None: the role's reward, pass_filter.role_rewarder, the judge read from judge_dir; tests pass
    their own)."""
    from model import load_pretrained
    if role not in ROLES:
        raise common.StageError(f"role must be one of {ROLES}, got {role!r}")
    check_params(p)
    kept_dir, init_dir, output_dir = Path(kept_dir), Path(init_dir), Path(output_dir)
    records = load_kept(kept_dir, role, int(p["min_prompts"]))
    torch.set_num_threads(int(p["cpu_threads"]))
    device = training.default_device()
    training.seed_run(int(p["seed"]), device)
    tok = load_chat_tokenizer(init_dir)
    model = load_pretrained(init_dir, device=device, dtype=torch.float32)
    inputs = [kept_dir / "kept.parquet", init_dir / "model.safetensors", init_dir / "config.json",
              *judge_inputs(judge_dir)]
    if not records:  # min_prompts 0: nothing to learn from, the init checkpoint passes through (module docstring)
        write_final(output_dir, model, init_dir)
        live = common.open_live(live_dir)
        live.log_metric("rl/steps", 0)  # a plots/ dir too: dvc.yaml declares it
        live.end()
        return common.write_manifest(
            output_dir / "manifest.json", stage=role, params=p, inputs=inputs,
            outputs=sorted((output_dir / "final").iterdir()),
            counts={"steps": 0, "kept_prompts": 0, **dict.fromkeys(TOTALS, 0), "tokens_seen": 0, "trained": False},
            code=common.code_version_closure(*CODE),
            extra={"role": role, "init": str(init_dir), "judge": None if judge_dir is None else str(judge_dir),
                   "reward_start": None, "reward_end": None, "pass_rate_start": None, "pass_rate_end": None,
                   "loss_start": None, "loss_end": None, "wall_time_s": 0.0})
    reward_fn = reward_fn or role_rewarder(role, judge_dir, p)
    ref = None
    if float(p["kl_coef"]):
        ref = load_pretrained(init_dir, device=device, dtype=torch.float32).eval().requires_grad_(False)
    steps = int(p["steps"])
    lr = warmup_decay(steps, int(p["warmup_steps"]), float(p["lr_peak"]), float(p["lr_final"]), p["lr_shape"])
    root = training.run_dir(resume_dir, {role: p, "inputs": {f.name: common.sha256_file(f) for f in inputs}}, CODE)
    batches = GRPORollouts(model, tok, records, p, role, reward_fn, ref, rollout_engine(init_dir, p))
    live = common.open_live(live_dir)
    trainer = training.Trainer(model, training.build_optimizer(model, p, device), lambda t: piecewise_lr(lr, t),
                               GRPOLoss(batches.cfg), batches, training.LoopConfig.from_params(p),
                               training.ResumeDir(root), live, device, desc=role)
    trainer.state["stage"] = {"first": None, "last": None, "totals": dict.fromkeys(TOTALS, 0)}

    def after_step(out: training.StepOutput) -> None:
        stats, stage = batches.rollout["stats"], trainer.state["stage"]
        out.metrics.update({f"rl/{name}": float(v) for name, v in stats.items()})
        if batches.fresh:
            for name in TOTALS:
                stage["totals"][name] += int(stats[name])
        stage["first"] = stage["first"] or dict(stats)
        stage["last"] = dict(stats)

    finished = trainer.run(steps, stop=max_steps, after_step=after_step)
    live.end()
    if not finished:
        return None
    write_final(output_dir, model, init_dir)
    state = trainer.state
    first, last = state["stage"]["first"], state["stage"]["last"]
    counts = {"steps": steps, "kept_prompts": len(records), **state["stage"]["totals"],
              "tokens_seen": state["tokens_seen"], "trained": True}
    extra = {"role": role, "init": str(init_dir), "judge": None if judge_dir is None else str(judge_dir),
             "reward_start": first["reward_mean"],
             "reward_end": last["reward_mean"], "pass_rate_start": first["pass_rate"],
             "pass_rate_end": last["pass_rate"], "loss_start": state["loss_start"], "loss_end": state["loss_end"],
             "wall_time_s": round(state["wall_time"], 3), "resume_dir": str(root)}
    return common.write_manifest(output_dir / "manifest.json", stage=role, params=p, inputs=inputs,
                                 outputs=sorted((output_dir / "final").iterdir()), counts=counts,
                                 code=common.code_version_closure(*CODE), extra=extra)


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--role", required=True, choices=ROLES, help="which params slice (and stage name) this run is")
    ap.add_argument("--kept-dir", required=True, help="the role's pass filter: artifacts/<scale>/pass_filter/<role>")
    ap.add_argument("--init-dir", required=True,
                    help="checkpoint to start from: artifacts/<scale>/distill (rl_stem), "
                         "artifacts/<scale>/rl_stem/final (rl_code), artifacts/<scale>/rl_code/final (rl_pref)")
    ap.add_argument("--judge-dir", default=None,
                    help="the reward model, for rl_pref: artifacts/<scale>/reward_model/judge")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--resume-dir", required=True,
                    help="resume states, outside the outputs: checkpoints/<scale>/<role>")
    ap.add_argument("--live-dir", required=True, help="dvclive metrics and plots: dvclive/<role>")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all (tests: a kill)")
    args = ap.parse_args()
    try:
        manifest = run_rl(args.role, args.kept_dir, args.init_dir, args.output_dir, args.resume_dir, args.live_dir,
                          common.resolve_cli_params(args, args.role), args.max_steps, judge_dir=args.judge_dir)
    except common.StageError as exc:
        common.fail(exc)
    if manifest is None:
        print(f"{args.role}: stopped at --max-steps {args.max_steps}; rerun to resume")
        return
    c = manifest["counts"]
    if not c["trained"]:
        print(f"{args.role}: no prompt kept (min_prompts 0): the init checkpoint passed through untrained")
        return
    print(f"{args.role}: {c['steps']} steps, {c['samples']} samples ({c['groups_dropped']} zero-variance groups "
          f"dropped, {c['truncated']} truncated), reward {manifest['reward_start']:.3f} -> "
          f"{manifest['reward_end']:.3f}, {manifest['wall_time_s']:.1f} s")


if __name__ == "__main__":
    main()
