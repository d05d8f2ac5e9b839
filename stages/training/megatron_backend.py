"""The Megatron-core backend: the same stage, plan, LR schedule and batch source as the PyTorch backend, with the
step run by Megatron-core (pretrain.backend: megatron). Imported only when a run picks it (megatron-core is a
dev / GPU dependency).

What runs where:
  model      megatron.core GPTModel of our shape (model/megatron.py build_gpt_model; Transformer Engine layer spec
             when pretrain.megatron.transformer_engine and TE imports, the local spec otherwise), initialized from
             the stage's NanbeigeForCausalLM init by hf_to_megatron, so both backends start from the same weights
  step       megatron.core.pipeline_parallel.get_forward_backward_func() over the rank's micro-batches, Megatron's
             DistributedDataParallel (fp32 grad buffers) and get_megatron_optimizer (Adam(W) with clip_grad; the
             same decay rule as stages/training/optim.param_groups: none on 1-D weights and the embedding table)
  layout     world W = TP x PP x DP (parallel_state.initialize_model_parallel); data-parallel rank d of DP trains
             on rows d::DP of the step's global batch (shard_rows), TP / PP ranks of one DP rank on the same rows
  PP         stage r of PP builds the GPTModel's layers [r L / PP, (r + 1) L / PP) (pre_process: the embedding on
             the first, post_process: norm, output layer and loss on the last) and takes pp_shard of the converted
             weights; Megatron's 1F1B schedule passes activations between stages (point-to-point; gloo on CPU); the
             loss sums, known on the last stage, are all-reduced over the pipeline group so every rank logs them
  normalizer calculate_per_token_loss: each micro-batch returns (sum of masked token CE, its token count); the
             schedule sums the counts over micro-batches and finalize_model_grads all-reduces them over DP and
             divides the summed gradient by the total: g = grad(S / N), N the step's global token count, the
             PyTorch backend's normalizer (stages/training/losses.py)
  state      weights converted back by megatron_to_hf (resume states and the phase / final checkpoints stay HF
             Llama safetensors); the optimizer's own state_dict (fp32 master weights + moments) per (PP, TP) rank, the
             same on every DP rank (use_distributed_optimizer is off), gathered to rank 0: one file
  TP         hf_to_megatron then tp_shard give each tensor-parallel rank its slice at init and resume; saves
             gather every (PP, TP) rank's slice to the writer (gather_object over the model-parallel group of DP
             rank 0) and join them (tp_unshard per stage, then pp_unshard) before megatron_to_hf

Limits: PP must divide the layer count (an even split) and the embeddings be untied (RECIPE.md: they are); no
virtual (interleaved) pipeline stages; sequence_parallel needs the Transformer Engine spec.
use_distributed_optimizer is off: each rank holds bf16 weights, fp32 grads, fp32 master weights and moments of its
(PP, TP) slice, 18 bytes per parameter / (TP x PP) (71 GB at 3b and TP = PP = 1): on 80 GB GPUs use TP = 2 or PP = 2,
or the torch backend (FSDP2 shards all of it over the world).
On CPU (tests, tiny) Megatron's hard-coded CUDA tensors are redirected to CPU by cpu_emulation(), active only
inside this backend's calls.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from stages.common import StageError
from stages.training.losses import Loss, Micro, TokenCrossEntropy
from stages.training.parallel import World, process_group_backend, reduce_sums, shard_rows

MEGATRON_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel",
                 "recompute_granularity", "recompute_method", "recompute_num_layers")


@contextlib.contextmanager
def cpu_emulation(active: bool) -> Iterator[None]:
    """Megatron-core on CPU: torch.cuda.current_device() -> "cpu", device="cuda" factory arguments -> CPU,
    Tensor.cuda() -> itself, Tensor.type() reports torch.cuda.* (its grad-clip asserts it), the model-parallel
    RNG tracker's fork a no-op and the CUDA RNG state that activation recompute saves the CPU one (no dropout here,
    so no draw depends on it). A no-op when not `active`."""
    if not active:
        yield
        return
    from torch.overrides import TorchFunctionMode

    from megatron.core.tensor_parallel import random as mrandom

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                return func(*args).replace("torch.", "torch.cuda.", 1)
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    mp = _Patches()
    mp.setattr(torch.cuda, "current_device", lambda: "cpu")
    mp.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # pipeline p2p after batch_isend_irecv
    mp.setattr(mrandom.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())
    mp.setattr(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())  # activation recompute
    mp.setattr(mrandom, "_set_cuda_rng_state", lambda *a, **k: None)
    try:
        with CudaToCpu():
            yield
    finally:
        mp.undo()


class _Patches:
    """setattr with undo (monkeypatch without pytest)."""

    def __init__(self):
        self._undo = []

    def setattr(self, obj, name, value):
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self):
        for obj, name, value in reversed(self._undo):
            setattr(obj, name, value)
        self._undo.clear()


def parallel_config(megatron_p: dict):
    from model.megatron import MegatronParallel
    return MegatronParallel(**{k: megatron_p[k] for k in MEGATRON_KEYS if k in megatron_p})


class MegatronEngine:
    """An Engine (stages/training/engine.py) over a Megatron-core GPTModel; `model` is the HF-layout module whose
    config (and ABF) the stage reads; its own weights are dropped after they initialized the GPTModel."""

    def __init__(self, model: torch.nn.Module, p: dict, device: torch.device, world: World):
        import torch.distributed as dist
        from megatron.core import parallel_state
        self.cfg, self.device, self.world = model.config, device, world
        self.cpu = device.type == "cpu"
        mp = dict(p.get("megatron") or {})
        self.par = parallel_config(mp)
        from model.megatron import pp_layers
        try:
            pp_layers(self.cfg, self.par.pipeline_model_parallel_size, 0)
        except ValueError as e:
            raise StageError(f"pretrain.megatron.pipeline_model_parallel_size: {e}") from None
        self.te = bool(mp.get("transformer_engine", False)) and te_available()
        if self.par.sequence_parallel and not self.te:
            raise StageError("pretrain.megatron.sequence_parallel needs the Transformer Engine layer spec "
                             "(transformer_engine: true, with transformer-engine installed): Megatron's local spec "
                             "norms (torch) do not support sequence parallelism")
        self._own_group = not dist.is_initialized()
        if self._own_group:  # a world of one without torchrun: an in-memory store, no network
            dist.init_process_group(process_group_backend(device), store=dist.HashStore(),
                                    rank=0, world_size=1)
        self._own_mp = not parallel_state.model_parallel_is_initialized()
        if self._own_mp:
            parallel_state.initialize_model_parallel(self.par.tensor_model_parallel_size,
                                                     self.par.pipeline_model_parallel_size)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.weight_decay, self.grad_clip = float(p["weight_decay"]), float(p["grad_clip"])
        with cpu_emulation(self.cpu):
            self._build(model, p)
        model.to("meta")  # only its config is used from here on
        self.model = model

    def _build(self, model: torch.nn.Module, p: dict) -> None:
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
        from megatron.core.optimizer_param_scheduler import ParamGroupOverride
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        from model.megatron import build_gpt_model
        if not self.cpu:
            model_parallel_cuda_manual_seed(int(p["seed"]))
        dtype = torch.float32 if self.cpu else torch.bfloat16
        gpt = build_gpt_model(self.cfg, self.par, dtype, cpu=self.cpu, transformer_engine=self.te,
                              pre_process=self.pp_rank == 0, post_process=self.pp_rank == self.pp_size - 1)
        if not self.cpu:
            gpt = gpt.to(self.device)
        self._load_hf(gpt, {k: v.detach() for k, v in model.state_dict().items()})
        config = gpt.config
        config.calculate_per_token_loss = True
        config.finalize_model_grads_func = finalize_model_grads
        self.ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False), gpt)
        config.no_sync_func = self.ddp.no_sync
        betas = [float(b) for b in p["adam_betas"]]
        no_decay = ParamKey(with_name_predicate=ParamWithNamePredicate(
            name="no_decay_1d_and_embedding", fn=lambda param, name: param.ndim < 2 or "word_embeddings" in name))
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=0.0, min_lr=0.0, weight_decay=self.weight_decay,
                            adam_beta1=betas[0], adam_beta2=betas[1], adam_eps=float(p["adam_eps"]),
                            clip_grad=self.grad_clip, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                            use_distributed_optimizer=False),
            [self.ddp], config_overrides={no_decay: ParamGroupOverride(wd_mult=0.0)})
        self.gpt = gpt

    def _load_hf(self, gpt, weights: dict[str, torch.Tensor]) -> None:
        """Full HF weights -> this (pipeline stage, tensor-parallel rank)'s slice of the GPTModel."""
        from model.megatron import hf_to_megatron, pp_shard, tp_shard
        state = tp_shard(hf_to_megatron(weights, self.cfg, te=self.te), self.cfg, self.tp_size, self.tp_rank)
        state = pp_shard(state, self.cfg, self.pp_size, self.pp_rank)
        missing, unexpected = gpt.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("_extra_state") for k in missing):
            raise StageError(f"Megatron GPTModel does not match the HF weights: missing {missing}, "
                             f"unexpected {unexpected}")

    def _causal(self, t: int) -> torch.Tensor | None:
        """The local spec's attention takes an explicit mask (True = masked); TE's fused attention is causal."""
        if self.te:
            return None
        return torch.triu(torch.ones(t, t, dtype=torch.bool, device=self.device), diagonal=1)[None, None]

    def _forward_step(self, data_iterator, model):
        micro = {k: v.to(self.device) for k, v in next(data_iterator).items()}
        ids, targets, mask = micro["input_ids"], micro["targets"], micro["mask"]
        positions = torch.arange(ids.shape[1], device=self.device)[None].expand_as(ids)
        per_token = model(ids, positions, attention_mask=self._causal(ids.shape[1]), labels=targets)

        def loss_func(token_ce: torch.Tensor):
            total = (token_ce.float() * mask.float()).sum()
            count = mask.sum().to(torch.int)
            return total, count, {"sum_count": torch.stack([total.detach(), count.detach().float()])}
        return per_token, loss_func

    def _run(self, micros: list[Micro], forward_only: bool) -> tuple[float, float]:
        """(sum of token CE, token count) over this rank's micro-batches through Megatron's schedule; with PP the
        last stage computes them, and they are summed over the pipeline group (the other stages contribute 0)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        rows, seq = micros[0]["input_ids"].shape
        out = get_forward_backward_func()(forward_step_func=self._forward_step, data_iterator=iter(micros),
                                          model=[self.ddp], num_microbatches=len(micros), seq_length=seq,
                                          micro_batch_size=rows, forward_only=forward_only)
        total = sum(float(o["sum_count"][0]) for o in out)
        count = sum(float(o["sum_count"][1]) for o in out)
        if self.pp_size > 1:
            from megatron.core import parallel_state
            sums = reduce_sums({"count": count, "total": total}, self.pp_size,
                               group=parallel_state.get_pipeline_model_parallel_group())
            total, count = float(sums["total"]), float(sums["count"])
        return total, count

    def step(self, micros: list[Micro], loss_fn: Loss, lr: float, grad_clip: float) -> tuple[dict[str, float], float]:
        if type(loss_fn) is not TokenCrossEntropy:
            raise StageError(f"the Megatron backend trains TokenCrossEntropy only, not {type(loss_fn).__name__}")
        if grad_clip != self.grad_clip:
            raise StageError(f"Megatron's optimizer clips at {self.grad_clip} (set at construction), not {grad_clip}")
        micros = shard_rows(micros, self.dp_rank, self.dp_size)
        with cpu_emulation(self.cpu):
            for group in self.optimizer.param_groups:  # Megatron's own scheduler would set both
                group["lr"] = lr
                group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            total, count = self._run(micros, forward_only=False)
            ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise StageError("Megatron optimizer step skipped (non-finite gradients)")
        sums = reduce_sums({"count": count, "total": total}, self.dp_size, group=_dp_group())
        return {"loss": float(sums["total"] / sums["count"])}, float(grad_norm)

    @torch.no_grad()
    def eval_loss(self, windows: torch.Tensor) -> float:
        micro = {"input_ids": windows[:, :-1], "targets": windows[:, 1:],
                 "mask": torch.ones(windows[:, 1:].shape, dtype=torch.bool)}
        with cpu_emulation(self.cpu):
            total, count = self._run([micro], forward_only=True)
        return total / count

    def set_rope_theta(self, theta: float, max_position_embeddings: int) -> None:
        """ABF: the HF config's base and context, and the GPTModel's RoPE inv_freq (its cached tables dropped)."""
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        self.model.set_rope_theta(theta, max_position_embeddings)
        rope = self.gpt.rotary_pos_emb
        d = self.cfg.head_dim
        rope.inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(rope.inv_freq.device)
        RotaryEmbedding.forward.cache_clear()
        self.cfg = self.model.config

    def _gather_model_parallel(self, obj) -> dict[tuple[int, int], object] | None:
        """{(PP rank, TP rank): obj of that rank} on the writer (global rank 0: PP, TP and DP rank 0), None
        elsewhere; the model-parallel group of DP rank 0 gathers, the other data-parallel replicas hold the same
        values and skip it."""
        import torch.distributed as dist
        from megatron.core import parallel_state
        if self.dp_rank != 0:
            return None
        key = (self.pp_rank, self.tp_rank)
        if self.tp_size * self.pp_size == 1:
            return {key: obj}
        group = parallel_state.get_model_parallel_group()
        dst = dist.get_global_rank(group, 0)
        out = [None] * (self.tp_size * self.pp_size) if dist.get_rank() == dst else None
        dist.gather_object((key, obj), out, dst=dst, group=group)
        return dict(out) if out is not None else None

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """The full HF state: every (PP, TP) rank's slice gathered, joined (tp_unshard per stage, then pp_unshard),
        then megatron_to_hf."""
        from model.megatron import megatron_to_hf, pp_unshard, tp_unshard
        local = {k: v.detach().cpu() for k, v in self.gpt.state_dict().items() if not k.endswith("_extra_state")}
        slices = self._gather_model_parallel(local)
        if not self.world.is_writer:
            return {}
        stages = [tp_unshard([slices[(pp, tp)] for tp in range(self.tp_size)]) for pp in range(self.pp_size)]
        return megatron_to_hf(pp_unshard(stages, self.cfg), self.cfg, te=self.te)

    def state_dicts(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(hf_weights(), {"layout": [PP, TP], "ranks": {"<pp>.<tp>": optimizer state of that rank}}): a rank's
        state covers its slices, so a resume needs the same PP and TP sizes (they are params: the run directory's
        key has them; load_state_dicts checks)."""
        with cpu_emulation(self.cpu):
            optimizer = self._gather_model_parallel(_on_cpu(self.optimizer.state_dict()))
        weights = self.hf_weights()
        if not self.world.is_writer:
            return weights, {}
        return weights, {"layout": [self.pp_size, self.tp_size],
                         "ranks": {f"{pp}.{tp}": state for (pp, tp), state in sorted(optimizer.items())}}

    def load_state_dicts(self, weights: dict[str, torch.Tensor], optimizer: dict) -> None:
        if list(optimizer.get("layout", [])) != [self.pp_size, self.tp_size]:
            raise StageError(f"the Megatron resume state was saved at [PP, TP] = {optimizer.get('layout')}, this run "
                             f"is [{self.pp_size}, {self.tp_size}]: a rank's optimizer state covers its own slices")
        with cpu_emulation(self.cpu):
            self._load_hf(self.gpt, weights)
            self.optimizer.load_state_dict(optimizer["ranks"][f"{self.pp_rank}.{self.tp_rank}"])

    def close(self) -> None:
        """Tear down the model-parallel state and process group this engine created."""
        import torch.distributed as dist
        from megatron.core import parallel_state
        if self._own_mp:
            parallel_state.destroy_model_parallel()
        if self._own_group:
            dist.destroy_process_group()


def _on_cpu(obj):
    """A nested state (dicts, lists, tuples of tensors) with every tensor moved to CPU: what is gathered and saved."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def _dp_group():
    from megatron.core import parallel_state
    return parallel_state.get_data_parallel_group()


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True
