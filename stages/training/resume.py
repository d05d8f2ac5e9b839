"""The resume piece: where a run's states live and how they are written and read back.

A run's directory is <root>/<hash of (key, code closure, torch version)>: `key` holds the params slices and input
hashes, the code closure every repo file the stage imports (stages.common.code_version_closure), so a change to the
params, the inputs, the code or torch starts a fresh run instead of resuming (or re-linking) a stale one. It holds
`latest` (the name of the newest complete state) and state-<step>/ (model.safetensors + trainer.pt: optimizer, RNG,
the loop's state and the batch source's; weights and optimizer state are full tensors
keyed by parameter name, stages/training/engine.py); every directory is written whole then renamed, so `kill -9` is
safe.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from stages import common

LATEST = "latest"
TRAINER_STATE = "trainer.pt"
WEIGHTS = "model.safetensors"


def run_dir(root: str | os.PathLike, key: dict, modules: tuple[str, ...] | list[str]) -> Path:
    """<root>/<16 hex>: the resume directory of the run with this key whose code is `modules` and what they import."""
    return Path(root) / common.params_hash({**key, "code": common.code_version_closure(*modules),
                                            "torch": torch.__version__})


class ResumeDir:
    """Saves and restores (full weights by name, optimizer state, RNG, payload) under one run directory. Only the
    writer (rank 0) saves and clears debris; every rank loads (the directory is on a shared filesystem)."""

    def __init__(self, root: str | os.PathLike, writer: bool = True):
        self.root, self.writer = Path(root), writer
        if writer:
            self.root.mkdir(parents=True, exist_ok=True)

    def save(self, step: int, weights: dict[str, torch.Tensor], optimizer: dict, payload: dict) -> None:
        """state-<step>/ written whole, then `latest` points at it, then older states go."""
        from safetensors.torch import save_file
        name = f"state-{step:09d}"
        with common.atomic_dir(self.root / name) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
            rng = {"rng_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["rng_cuda"] = torch.cuda.get_rng_state_all()
            torch.save({"payload": payload, **rng, "optimizer": optimizer}, tmp / TRAINER_STATE)
        common.write_text(self.root / LATEST, name)
        for old in self.root.glob("state-*"):
            if old.name != name:
                shutil.rmtree(old)

    def load(self) -> tuple[dict[str, torch.Tensor], dict, dict] | None:
        """(weights, optimizer state, payload) of the newest complete state, with the RNG restored (None: fresh),
        after the writer deleted the debris of writes a kill interrupted."""
        from safetensors.torch import load_file
        if self.writer:
            for debris in sorted(self.root.rglob(".*.tmp"), reverse=True):
                shutil.rmtree(debris) if debris.is_dir() else debris.unlink()
        if not (self.root / LATEST).is_file():
            return None
        state_dir = self.root / (self.root / LATEST).read_text(encoding="utf-8").strip()
        state = torch.load(state_dir / TRAINER_STATE, map_location="cpu", weights_only=True)
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        return load_file(str(state_dir / WEIGHTS)), state["optimizer"], state["payload"]


def materialize(src: Path, dest: Path) -> list[Path]:
    """A finished checkpoint directory of the run at `dest`, an output (hard links: checkpoint files are never
    modified in place; a copy across filesystems). Returns dest's files."""
    with common.atomic_dir(dest) as tmp:
        for f in sorted(src.iterdir()):
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copyfile(f, tmp / f.name)
    return sorted(dest.iterdir())
