"""Checkpoints in Hugging Face Llama layout: model.safetensors + config.json, loadable by transformers unchanged."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig, ModelError
from model.llama import NanbeigeForCausalLM

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def save_pretrained(model: NanbeigeForCausalLM, out_dir: str | os.PathLike,
                    dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write out_dir/model.safetensors (weights cast to `dtype`) and out_dir/config.json, each atomically;
    returns the two paths. With tied embeddings lm_head.weight is left out, as Hugging Face does."""
    if dtype not in _DTYPE_NAMES:
        raise ModelError(f"save_pretrained: dtype {dtype} is not one of {sorted(_DTYPE_NAMES.values())}")
    out_dir = Path(out_dir)
    tensors = {name: t.detach().to(device="cpu", dtype=dtype).contiguous()
               for name, t in model.state_dict().items()
               if not (model.config.tie_word_embeddings and name == "lm_head.weight")}
    weights, config = out_dir / WEIGHTS, out_dir / CONFIG
    out_dir.mkdir(parents=True, exist_ok=True)
    _replace_durably(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(model.config.to_hf_config(dtype=_DTYPE_NAMES[dtype]), indent=2, sort_keys=True) + "\n"
    _replace_durably(config, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return [weights, config]


def _replace_durably(final: Path, write) -> None:
    """write(tmp) beside `final`, fsync, rename over it: a reader never sees a half-written checkpoint file."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def load_pretrained(path: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> NanbeigeForCausalLM:
    """A model from a checkpoint directory (config.json + model.safetensors), in the stored dtype unless `dtype`."""
    path = Path(path)
    config_path, weights_path = path / CONFIG, path / WEIGHTS
    for p in (config_path, weights_path):
        if not p.is_file():
            raise ModelError(f"{p}: checkpoint file is missing")
    try:
        cfg = ModelConfig.from_hf_config(json.loads(config_path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except KeyError as exc:
        raise ModelError(f"{config_path}: missing key {exc}") from None
    try:
        tensors = load_file(str(weights_path), device=str(device))
    except SafetensorError as exc:
        raise ModelError(f"{weights_path}: unreadable safetensors file ({exc})") from None
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    # Build on the meta device: the stored weights replace the init, so skip computing it.
    with torch.device("meta"):
        model = NanbeigeForCausalLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ModelError(f"{weights_path}: does not match {config_path}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope_cache()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
