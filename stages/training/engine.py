"""The backend piece: how one optimizer step runs and how the weights are gathered, behind one small interface the
Trainer and the stage hooks call, so the stage code is the same on one CPU, under torchrun + FSDP2 and on
Megatron-core (stages/training/megatron_backend.py).

An Engine has:
  model                    the Hugging Face-layout NanbeigeForCausalLM whose `config` is current (ABF included)
  optimizer                the optimizer it steps
  world                    this process (rank, size); world.is_writer writes outputs and resume states
  step(micros, loss_fn, lr, grad_clip) -> (losses, ||g||)   one update from the step's GLOBAL micro-batches
  hf_weights()             full HF-named weights on the writer, {} on other ranks; collective
  state_dicts()            (hf_weights(), full optimizer state) likewise
  load_state_dicts(w, o)   the inverse, on every rank (each reads the same full state and keeps its shard)
  set_rope_theta(theta, n) ABF in place
  eval_loss(windows)       mean next-token CE of token windows [n, T + 1] (forward only, every rank the same batch)

Resume states are FULL (unsharded) tensors written by rank 0: weights by HF name, the optimizer state keyed by
parameter name (torch.distributed.checkpoint's full_state_dict format), so a run saved at world size W resumes at
any W' (2 -> 1, 1 -> 2): rows r::W of a step are a different split of the same global batch. At 3b (3.9B
parameters) a full state is 16 GB of weights + 32 GB of Adam moments gathered to rank 0's CPU memory per save
(nodes hold 1 TB); sharded DCP saves are the next step past ~10B parameters.
"""
from __future__ import annotations

from typing import Protocol

import torch

from stages.training.losses import Loss, Micro
from stages.training.parallel import World

CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module."


class Engine(Protocol):
    model: torch.nn.Module
    optimizer: object
    world: World

    def step(self, micros: list[Micro], loss_fn: Loss, lr: float,
             grad_clip: float) -> tuple[dict[str, float], float]: ...

    def hf_weights(self) -> dict[str, torch.Tensor]: ...

    def state_dicts(self) -> tuple[dict[str, torch.Tensor], dict]: ...

    def load_state_dicts(self, weights: dict[str, torch.Tensor], optimizer: dict) -> None: ...

    def set_rope_theta(self, theta: float, max_position_embeddings: int) -> None: ...

    def eval_loss(self, windows: torch.Tensor) -> float: ...


def clean_name(name: str) -> str:
    """A parameter's name without activation checkpointing's wrapper prefix (the HF name)."""
    return name.replace(CHECKPOINT_WRAPPED, "")


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with parameter indices replaced by parameter names (DCP's full_state_dict format)."""
    index = {id(p): clean_name(n) for n, p in model.named_parameters()}
    names = [index[id(p)] for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    return {"state": {names[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of optimizer_state_by_name."""
    index = {id(p): clean_name(n) for n, p in model.named_parameters()}
    position = {index[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    optimizer.load_state_dict({"state": {position[n]: s for n, s in state["state"].items()},
                               "param_groups": [{**g, "params": [position[n] for n in g["params"]]}
                                                for g in state["param_groups"]]})


class TorchEngine:
    """The PyTorch backend: `model` trained in place by a torch optimizer, FSDP2-sharded over the world when W > 1
    (parallel.apply_fsdp; the normalizer and data layout are in stages/training/parallel.py)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 world: World = World()):
        self.model, self.optimizer, self.device, self.world = model, optimizer, device, world

    def step(self, micros: list[Micro], loss_fn: Loss, lr: float, grad_clip: float) -> tuple[dict[str, float], float]:
        from stages.training.loop import optimizer_step
        return optimizer_step(self.model, self.optimizer, micros, loss_fn, lr, grad_clip, self.device, self.world)

    def hf_weights(self) -> dict[str, torch.Tensor]:
        if self.world.size == 1:
            return {clean_name(k): v for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def state_dicts(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self.world.size == 1:
            return self.hf_weights(), optimizer_state_by_name(self.model, self.optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return self.hf_weights(), get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def load_state_dicts(self, weights: dict[str, torch.Tensor], optimizer: dict) -> None:
        if self.world.size == 1:
            self.model.load_state_dict(weights)
            load_optimizer_state_by_name(self.model, self.optimizer, optimizer)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=options)

    def set_rope_theta(self, theta: float, max_position_embeddings: int) -> None:
        self.model.set_rope_theta(theta, max_position_embeddings)

    @torch.no_grad()
    def eval_loss(self, windows: torch.Tensor) -> float:
        from stages.training.loop import autocast
        windows = windows.to(self.device)
        with autocast(self.device):
            return self.model.loss(windows[:, :-1], windows[:, 1:]).item()
