"""The parallelism piece: which process this is (torchrun's env), the slice of a step's data it trains on, the
one-collective reductions the loop needs, and the FSDP2 wrap of the PyTorch backend.

Layout (data parallel, PyTorch backend): every rank builds the SAME global micro-batches of step t (the batch source
is a pure function of its state, so every rank's copy of the cursors stays identical without communication) and
trains on rows r::W of the step's B x A sequences (shard_rows), regrouped into micro-batches of B rows. The global
batch is therefore exactly the single-process one, split W ways; each rank's loss share is S_r / N with
N = sum over ranks of the units in their rows, all-reduced ONCE per optimizer step (reduce_sums) before any backward;
each rank backpropagates W x S_r / N and FSDP2's gradient reduce-scatter averages over W, so the update is
grad(sum_r S_r / N) = grad(S / N): the same normalizer as one process. Only float reduction order differs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from stages.common import StageError
from stages.training.losses import Micro


@dataclass(frozen=True)
class World:
    """This process in the job: rank r of W (torchrun's RANK / WORLD_SIZE / LOCAL_RANK; 0 of 1 without torchrun)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the outputs and resume states; the others only compute."""
        return self.rank == 0


def init_world(device: torch.device, timeout_s: float = 1800.0) -> World:
    """The torchrun world, with its process group initialized when W > 1 and this rank's GPU selected (LOCAL_RANK):
    gloo on CPU; on CUDA NCCL for CUDA tensors and gloo for CPU ones (process_group_backend), since the loss sums
    (reduce_sums) and the gathered resume states are CPU tensors."""
    import torch.distributed as dist
    world = World.from_env()
    if world.size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(process_group_backend(device), rank=world.rank,
                                world_size=world.size, timeout=timedelta(seconds=timeout_s))
    return world


def process_group_backend(device: torch.device) -> str:
    """gloo on CPU; "cpu:gloo,cuda:nccl" on CUDA: one process group whose collectives run on NCCL for CUDA tensors
    and gloo for CPU tensors (an NCCL-only group refuses a CPU tensor)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def shard_rows(micros: list[Micro], rank: int, size: int) -> list[Micro]:
    """Rows rank::size of the step's micro-batches (concatenated in order), regrouped into micro-batches of the
    first micro-batch's row count. Every rank gets the same number of rows (the step's rows must divide by size),
    so all ranks run the same number of forward/backward passes (FSDP's collectives require it)."""
    if size == 1:
        return micros
    rows = sum(m["input_ids"].shape[0] for m in micros)
    if rows % size:
        raise StageError(f"a step's {rows} sequences do not split over {size} data-parallel ranks: make "
                         f"batch_size x grad_accum a multiple of the data-parallel size")
    per = micros[0]["input_ids"].shape[0]
    try:
        whole = {k: torch.cat([m[k] for m in micros]) for k in micros[0]}
    except RuntimeError as exc:
        raise StageError(f"data-parallel sharding needs micro-batches of one shape per key ({exc})") from None
    mine = {k: v[rank::size] for k, v in whole.items()}
    return [{k: v[i:i + per] for k, v in mine.items()} for i in range(0, rows // size, per)]


def reduce_sums(values: dict[str, float | torch.Tensor], size: int, group=None) -> dict[str, torch.Tensor]:
    """{name: sum over ranks} in ONE all_reduce (float64, keys in sorted order, the same on every rank)."""
    names = sorted(values)
    flat = torch.stack([torch.as_tensor(values[n], dtype=torch.float64).detach().cpu() for n in names])
    if size > 1:
        import torch.distributed as dist
        dist.all_reduce(flat, group=group)
    return dict(zip(names, flat))


def apply_fsdp(model: torch.nn.Module, world: World, device: torch.device, activation_checkpointing: bool,
               forward_methods: tuple[str, ...] = ("loss", "token_logprobs", "topk_logprobs"),
               shard_single: bool = False) -> torch.nn.Module:
    """FSDP2 (fully_shard) over a 1-D mesh of all W ranks: each decoder layer its own unit, then the root (embedding,
    final norm, lm_head); bf16 compute with fp32 reduce on CUDA (fp32 on CPU). Its gradient reduce-scatter
    AVERAGES over the W ranks, so optimizer_step backpropagates W x each share: the average of
    W x grad(S_r / N) is the sum, grad(S / N). (A divide factor of 1 would say it directly, but gloo has no
    PREMUL_SUM reduction for it.) With activation_checkpointing,
    each layer's activations are recomputed in backward (torch.utils.checkpoint, non-reentrant). The model's
    loss methods become FSDP forward methods, so their calls all-gather the root's weights as forward() does.
    At W = 1 the model stays unwrapped (plain tensors, nothing to shard) unless shard_single (the GPU smoke script
    measures FSDP2 itself on one GPU; it needs an initialized process group)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        layers = model.model.layers
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    if world.size == 1 and not shard_single:
        return model
    mesh = init_device_mesh(device.type, (world.size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
          else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model
