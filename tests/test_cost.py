"""tools/cost.py: the 3b plan's parameter count and FLOPs by hand, memory sharding."""
from __future__ import annotations

import pytest

from model.config import ModelConfig
from stages.common import load_params, stage_params
from tools.cost import Plan, estimate, flops_per_token, memory_per_gpu_gib


def three_b() -> ModelConfig:
    params = load_params()
    params["scale"] = "3b"
    return ModelConfig.from_params(stage_params(params, "model"))


def test_3b_parameters_match_the_recipe():
    cfg = three_b()
    assert round(cfg.num_parameters() / 1e9, 2) == 3.93
    assert round(cfg.num_parameters(include_embeddings=False) / 1e9, 2) == 3.08


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=2, max_position_embeddings=16, rope_theta=1e4)
    body = 2 * (2 * 4 * 2 * 2 + 2 * 4 * 1 * 2 + 3 * 4 * 8 + 2 * 4) + 4
    assert flops_per_token(cfg, seq_len=16) == 6 * (body + 10 * 4) + 6 * 2 * 16 * 2 * 2


def test_memory_shards_over_gpus_and_gpu_hours_scale_with_mfu():
    cfg = three_b()
    base = Plan(tokens=23e12, seq_len=4096, micro_batch=1, tp=1, pp=1, gpus=8, mfu=0.4, gpu="h100",
                recompute="full")
    wide = Plan(**{**base.__dict__, "gpus": 16})
    assert memory_per_gpu_gib(cfg, wide)["model_states"] == pytest.approx(
        memory_per_gpu_gib(cfg, base)["model_states"] / 2)
    slow = Plan(**{**base.__dict__, "mfu": 0.2})
    assert estimate(cfg, slow)["gpu_hours"] == pytest.approx(2 * estimate(cfg, base)["gpu_hours"])
    assert memory_per_gpu_gib(cfg, base)["model_states"] == pytest.approx(18 * cfg.num_parameters() / 8 / 2 ** 30)
