"""The shared training loop: pretrain, SFT, distillation (DPD), the reward model and GRPO plug in a batch source
and a loss; none copies the loop. One small piece per concern (torchtitan's components):

  optim.py     OPTIMIZERS registry (adamw: fused on CUDA, foreach on CPU; apex_fused_adam), param_groups
  losses.py    Loss (units per normalizer + a micro-batch's share given the step totals), TokenCrossEntropy
  loop.py      optimizer_step (normalizer once per step), Trainer (steps, hooks, rows, saves), LoopConfig
  resume.py    run_dir (keyed by params, inputs, code closure, torch), ResumeDir, materialize
  progress.py  tqdm on a TTY, flushed lines in a log file
  engine.py    Engine: how a step runs and the full state is gathered; TorchEngine (one process, or FSDP2)
  parallel.py  World (torchrun's rank / size), init_world, shard_rows (rank r trains rows r::W of the step),
               reduce_sums (one all-reduce), apply_fsdp (fully_shard per layer + root, activation checkpointing)
  megatron_backend.py  MegatronEngine: Megatron-core GPTModel, its schedule, DDP and optimizer (imported lazily)
  launch.py    the srun + torchrun line for a rule's nodes x GPUs
  LR           stages/lr_schedule.py: lr_at(schedule, step) for FG-WSD / WSD / cosine (pretrain);
               piecewise_lr(warmup_decay(total, warmup, peak, final, shape), step) for the later stages

API:

    device = default_device(); seed_run(seed, device)
    model = NanbeigeForCausalLM(cfg).to(device)
    trainer = Trainer(model, build_optimizer(model, p, device), lr_at: Callable[[int], float], loss_fn: Loss,
                      batches: BatchSource, LoopConfig.from_params(p),
                      ResumeDir(run_dir(resume_root, {"<stage>": p, "inputs": hashes}, ("stages.<stage>",))),
                      live=common.open_live(live_dir), device=device, desc="<stage>")
    finished = trainer.run(total_steps, stop=max_steps, before_step=None, after_step=None)  # -> bool
    trainer.state  # step, tokens_seen, wall_time, loss_start, loss_end, history, stage (the hooks' own dict)

A step: batches.micro_batches(step) -> [micro, ...], each micro a dict of CPU tensors with at least input_ids
[B, T] (counted as tokens/s) and whatever the loss reads. The loop sums loss_fn.units(m) ({normalizer: count})
over the step's micro-batches into `totals` ONCE per optimizer step, before any backward, and backpropagates
loss_fn(model, m, totals)["loss"], m's sum divided by the step total: L = sum_m S_m / N, so the update does not
depend on the micro-batch split (1 x 8 == 4 x 2). A loss with several terms declares several totals.

How the next stages plug in:
  SFT   TokenCrossEntropy with mask = 1 on assistant tokens and the end token, 0 on prompts and tool output;
        normalizer "tokens": L = mean CE over the step's supervised tokens (not a mean of per-sequence means).
  DPD   a Loss over stages/dpd_loss.py: units(m) = {"pairs", "pos_tokens", "neg_tokens"} (its StepCounts), and
        __call__ returns {"loss": dpd_loss(...)[0], "dpo": ..., "kd_pos": ..., "kd_neg": ...} from
        model.token_logprobs of y+ / y- and the teacher's stored top-k (model.topk_logprobs, cached): the DPO
        term a mean per pair, each KD term a mean per completion token of the step. Parts log as train/<part>.
  RM    a pairwise Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected), normalizer per pair.
  GRPO  the batch source holds the policy (the Trainer's model) and generates the rollouts of step t inside
        micro_batches(t) under torch.no_grad() (back to model.train() before it returns), each sample from its own
        torch.Generator seeded by a hash of (stage, step, prompt, sample), never the global RNG; it returns mask
        (completion tokens), advantages A (reward - group mean) and the old log-probs; the loss sums
        -min(r_t A, clip(r_t, 1 - eps, 1 + eps) A), r_t = exp(logp_t - logp_old_t), over completion tokens, with
        normalizer "tokens": the token-level mean is over ALL completion tokens of the optimizer step (DAPO),
        computed once per step however the rollouts are split into micro-batches. Its state_dict is {} (prompts
        a pure function of the step) or the prompt cursor.
  hooks before_step(step) changes the model before a step (pretrain: ABF at a phase start); after_step(out) adds
        metrics to out.metrics and sets out.milestone to log the row and save a resume state now (phase-end
        checkpoint and held-out eval).
Resume: a state every checkpoint_every steps, at milestones and at `stop`; it holds model, optimizer, RNG, the
loop's state and batches.state_dict(), so N steps == k steps + kill + resume to N, bit for bit (torch.equal).
Many processes: Trainer(..., engine=TorchEngine(apply_fsdp(model, world, ...), optimizer, device, world)) under
torchrun; every rank runs the same loop and batch source, trains its rows of each step's global batch with the
normalizer all-reduced once per step, and rank 0 writes states (full tensors by name: any world size resumes them)
and dvclive rows (pass live=None elsewhere). Tests: tests/test_fsdp.py, tests/test_megatron_backend.py.
"""
from model.lazy import lazy_exports

_EXPORTS = {
    "engine": ["Engine", "TorchEngine"],
    "losses": ["NORMALIZERS", "Loss", "TokenCrossEntropy"],
    "loop": ["BatchSource", "LoopConfig", "StepOutput", "Trainer", "autocast", "default_device", "optimizer_step",
             "seed_run"],
    "optim": ["OPTIMIZERS", "build_optimizer", "param_groups"],
    "parallel": ["World", "apply_fsdp", "init_world", "reduce_sums", "shard_rows"],
    "progress": ["make_progress"],
    "resume": ["ResumeDir", "materialize", "run_dir"],
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())  # loaded on first use: model/lazy.py


def _static_imports() -> None:  # never called: the submodules above, stated for stages.common.repo_imports' AST scan
    from stages.training import engine, losses, loop, optim, parallel, progress, resume  # noqa: F401


__all__ = ["NORMALIZERS", "OPTIMIZERS", "BatchSource", "Engine", "Loss", "LoopConfig", "ResumeDir", "StepOutput",
           "TokenCrossEntropy", "TorchEngine", "Trainer", "World", "apply_fsdp", "autocast", "build_optimizer",
           "default_device", "init_world", "make_progress", "materialize", "optimizer_step", "param_groups",
           "reduce_sums", "run_dir", "seed_run", "shard_rows"]
