"""HF Llama <-> Megatron-core mapping: parameter counts, an exact round trip, equal logits (megatron-core on CPU).

megatron-core builds its GPTModel on CPU with use_cpu_initialization; its forward asks for a CUDA device (RoPE
inv_freq) and the model-parallel RNG tracker (dropout), which these tests patch to CPU / a no-op.
"""
from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch

from model import ModelConfig, NanbeigeForCausalLM
from model.megatron import fuse_qkv, hf_to_megatron, megatron_to_hf, split_qkv

megatron = pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[dev]')")

CFG = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rope_theta=10000.0)


@pytest.fixture(scope="module")
def mcore(tmp_path_factory):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.cuda, "current_device", lambda: "cpu")
    mp.setattr(mrandom.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())
    yield
    mp.undo()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def ours(seed: int = 0) -> NanbeigeForCausalLM:
    torch.manual_seed(seed)
    return NanbeigeForCausalLM(CFG).eval()


def test_qkv_fusion_groups_heads_by_query_group():
    d, h = CFG.head_dim, CFG.hidden_size
    q = torch.arange(6 * d)[:, None].float().expand(-1, h)            # row r of q belongs to query head r // d
    k = 1000 + torch.arange(2 * d)[:, None].float().expand(-1, h)
    v = 2000 + torch.arange(2 * d)[:, None].float().expand(-1, h)
    fused = fuse_qkv(q, k, v, CFG)[:, 0]
    # group 0: q heads 0-2, k head 0, v head 0; then group 1
    expected = torch.cat([q[:3 * d, 0], k[:d, 0], v[:d, 0], q[3 * d:, 0], k[d:, 0], v[d:, 0]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fuse_qkv(q, k, v, CFG), CFG), (q, k, v)))


def test_parameter_counts_and_names_match_megatron(mcore):
    from model.megatron import build_gpt_model
    gpt = build_gpt_model(CFG, cpu=True)
    theirs = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    mapped = hf_to_megatron(ours().state_dict(), CFG)
    assert sorted(mapped) == sorted(theirs)
    assert all(mapped[k].shape == theirs[k].shape for k in theirs)
    assert sum(p.numel() for p in gpt.parameters()) == sum(p.numel() for p in ours().parameters())
    assert CFG.num_parameters() == sum(p.numel() for p in gpt.parameters())


@pytest.mark.parametrize("te", [False, True])
def test_hf_megatron_hf_round_trip_is_exact(te):
    state = ours(1).state_dict()
    back = megatron_to_hf(hf_to_megatron(state, CFG, te=te), CFG, te=te)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_converted_megatron_model_gives_our_logits(mcore):
    from model.megatron import build_gpt_model
    model = ours(2)
    gpt = build_gpt_model(CFG, cpu=True).eval()
    missing, unexpected = gpt.load_state_dict(hf_to_megatron(model.state_dict(), CFG), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    ids = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    causal = torch.triu(torch.ones(17, 17, dtype=torch.bool), diagonal=1)[None, None]   # True = masked
    with torch.no_grad():
        theirs = gpt(ids, positions, attention_mask=causal)
        mine = model(ids)
    assert theirs.shape == mine.shape
    torch.testing.assert_close(theirs, mine, atol=2e-5, rtol=1e-4)
    # and back: Megatron's weights convert to a model with identical logits
    again = NanbeigeForCausalLM(CFG).eval()
    again.load_state_dict(megatron_to_hf(gpt.state_dict(), CFG))
    with torch.no_grad():
        assert torch.equal(again(ids), mine)
