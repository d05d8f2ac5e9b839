"""The Nanbeige decoder: parameter counts, HF logit parity, checkpoint round trips, KV-cache decoding, ABF."""
import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from model import KVCache, ModelConfig, NanbeigeForCausalLM, load_pretrained, save_pretrained
from model.config import ModelError
from stages.common import load_params, stage_params

# GQA (4 query heads, 2 kv heads) and head_dim * heads != hidden, so parity covers both shapes.
SMALL = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rope_theta=10000.0)


def scale_config(scale: str) -> ModelConfig:
    return ModelConfig.from_params(stage_params({**load_params(), "scale": scale}, "model"))


def random_model(cfg: ModelConfig = SMALL, seed: int = 0) -> NanbeigeForCausalLM:
    """A model whose RMSNorm weights are not all 1, so the norms' weights are exercised too."""
    torch.manual_seed(seed)
    model = NanbeigeForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    return model.eval()


def hf_logits(path, input_ids) -> torch.Tensor:
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids).logits


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- config

def test_3b_parameter_count_matches_the_paper_without_allocating():
    cfg = scale_config("3b")
    total, body = cfg.num_parameters(), cfg.num_parameters(include_embeddings=False)
    print(f"3b: {total:,} total, {body:,} without embeddings")
    assert abs(total - 3.93e9) / 3.93e9 < 0.01
    assert abs(body - 3.08e9) / 3.08e9 < 0.01
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta) == (20, 4, 128, 5e6)
    assert not cfg.tie_word_embeddings


@pytest.mark.parametrize("tied", [False, True])
def test_num_parameters_counts_the_tiny_model(tied):
    cfg = dataclasses.replace(scale_config("tiny"), tie_word_embeddings=tied)
    model = NanbeigeForCausalLM(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())
    embeddings = model.model.embed_tokens.weight.numel() * (1 if tied else 2)
    assert cfg.num_parameters(include_embeddings=False) == cfg.num_parameters() - embeddings


def test_from_params_refuses_unknown_and_missing_keys_and_reads_yaml_floats():
    good = {"vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "max_position_embeddings": 8,
            "rope_theta": "5e6", "seed": 1, "scale": "tiny"}
    assert ModelConfig.from_params(good).rope_theta == 5e6
    with pytest.raises(ModelError, match=r"unknown keys \['hiden_size'\]"):
        ModelConfig.from_params({**good, "hiden_size": 8})
    with pytest.raises(ModelError, match=r"missing keys \['head_dim'\]"):
        ModelConfig.from_params({k: v for k, v in good.items() if k != "head_dim"})
    with pytest.raises(ModelError, match="multiple of num_key_value_heads"):
        ModelConfig.from_params({**good, "num_key_value_heads": 3})


def test_hf_config_round_trips_and_loads_in_transformers():
    from transformers import LlamaConfig
    cfg = dataclasses.replace(scale_config("3b"), eos_token_id=7)
    d = cfg.to_hf_config(dtype="bfloat16")
    assert ModelConfig.from_hf_config(json.loads(json.dumps(d))) == cfg
    hf = LlamaConfig(**d)
    assert hf.rope_parameters["rope_theta"] == 5e6 and hf.head_dim == 128 and hf.num_key_value_heads == 4
    with pytest.raises(ModelError, match="rope_type 'yarn'"):
        ModelConfig.from_hf_config({**d, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})


# ----------------------------------------------------------------------------- init and forward

def test_init_is_deterministic_given_the_seed_and_scales_residual_projections():
    cfg = scale_config("tiny")
    torch.manual_seed(0)
    a = NanbeigeForCausalLM(cfg).state_dict()
    torch.manual_seed(0)
    b = NanbeigeForCausalLM(cfg).state_dict()
    torch.manual_seed(1)
    c = NanbeigeForCausalLM(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    residual_std = cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers)
    assert a["model.layers.0.mlp.down_proj.weight"].std().item() == pytest.approx(residual_std, rel=0.05)
    assert a["model.layers.0.mlp.up_proj.weight"].std().item() == pytest.approx(cfg.initializer_range, rel=0.05)
    assert torch.equal(a["model.norm.weight"], torch.ones(cfg.hidden_size))


def test_state_dict_uses_exactly_the_hugging_face_llama_names():
    names = set(NanbeigeForCausalLM(SMALL).state_dict())
    per_layer = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    want |= {f"model.layers.{i}.{m}.weight" for i in range(SMALL.num_hidden_layers) for m in per_layer}
    assert names == want


def test_loss_is_mean_fp32_cross_entropy_over_non_ignored_labels():
    model = random_model()
    ids = torch.randint(0, SMALL.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[0, :4] = -100
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).float(), dim=-1)
        keep = labels != -100
        want = -logp[keep].gather(-1, labels[keep][:, None]).mean()
        assert model.loss(ids, labels).item() == pytest.approx(want.item(), rel=1e-6)


# ----------------------------------------------------------------------------- Hugging Face parity

def test_logits_match_transformers_llama(tmp_path):
    model = random_model()
    ids = torch.randint(0, SMALL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    save_pretrained(model, tmp_path / "ckpt")
    with torch.no_grad():
        ours = model(ids)
    diff = (ours - hf_logits(tmp_path / "ckpt", ids)).abs().max().item()
    print(f"HF parity max abs diff: {diff:.3e}")
    assert diff < 1e-4


def test_set_rope_theta_changes_logits_and_still_matches_transformers(tmp_path):
    model = random_model()
    ids = torch.randint(0, SMALL.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids)
        model.set_rope_theta(1e6)
        after = model(ids)
    assert model.config.rope_theta == 1e6
    assert (before - after).abs().max().item() > 1e-3
    save_pretrained(model, tmp_path / "abf")
    assert json.loads((tmp_path / "abf" / "config.json").read_text())["rope_theta"] == 1e6
    assert (after - hf_logits(tmp_path / "abf", ids)).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_pretrained_round_trips_bitwise_and_saves_deterministically(tmp_path, dtype):
    model = random_model()
    files = save_pretrained(model, tmp_path / "a", dtype=dtype)
    assert sorted(p.name for p in files) == ["config.json", "model.safetensors"]
    save_pretrained(model, tmp_path / "b", dtype=dtype)
    assert [sha256(p) for p in files] == [sha256(tmp_path / "b" / p.name) for p in files]
    loaded = load_pretrained(tmp_path / "a")
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    assert all(got[k].dtype == dtype and torch.equal(got[k], want[k].to(dtype)) for k in want)
    assert loaded.config == model.config
    assert loaded.rope_cos.dtype == torch.float32 and torch.equal(loaded.rope_cos, model.rope_cos)


def test_tied_embeddings_save_without_lm_head_and_load_tied(tmp_path):
    model = random_model(dataclasses.replace(SMALL, tie_word_embeddings=True))
    save_pretrained(model, tmp_path)
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_load_pretrained_names_the_bad_file(tmp_path):
    with pytest.raises(ModelError, match="config.json: checkpoint file is missing"):
        load_pretrained(tmp_path)
    save_pretrained(random_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ModelError, match=r"model.safetensors: does not match .*wrong shape \['model.layers.0.mlp"):
        load_pretrained(tmp_path)


# ----------------------------------------------------------------------------- decoding

def test_cached_forward_in_chunks_equals_the_full_forward():
    model = random_model()
    ids = torch.randint(0, SMALL.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    cache = KVCache(SMALL, batch_size=2, max_len=12)
    with torch.no_grad():
        full = model(ids)
        chunks = [model(ids[:, a:b], cache) for a, b in ((0, 5), (5, 8), (8, 9), (9, 12))]
    assert cache.pos == 12
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() < 1e-5


def test_kv_cache_greedy_generate_equals_no_cache_decoding():
    model = random_model()
    prompt = torch.randint(0, SMALL.vocab_size, (3, 6), generator=torch.Generator().manual_seed(5))
    got = model.generate(prompt, max_new_tokens=10, temperature=0.0)
    want = prompt
    with torch.no_grad():
        for _ in range(10):
            want = torch.cat([want, model(want)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, want)


def test_generate_stops_rows_at_eos_and_samples_reproducibly():
    model = random_model()
    prompt = torch.randint(0, SMALL.vocab_size, (2, 4), generator=torch.Generator().manual_seed(6))
    greedy = model.generate(prompt, max_new_tokens=8, temperature=0.0)
    eos = int(greedy[0, 4])
    stopped = model.generate(prompt, max_new_tokens=8, temperature=0.0, eos_token_id=eos)
    assert (stopped[0, 4:] == eos).all()
    row1 = greedy[1, 4:].tolist()
    n1 = row1.index(eos) + 1 if eos in row1 else 8
    assert stopped[1, 4:4 + n1].tolist() == row1[:n1] and stopped.shape[1] == 4 + n1
    draw = [model.generate(prompt, 8, temperature=1.0, top_p=0.9, seeds=[7, 8]) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    # A vanishing nucleus keeps only the most likely token: sampling becomes greedy.
    narrow = model.generate(prompt, 8, temperature=1.0, top_p=1e-9, seeds=[8, 9])
    assert torch.equal(narrow, greedy)


def test_forward_refuses_positions_past_the_rope_table():
    model = random_model()
    with pytest.raises(ValueError, match="exceed max_position_embeddings 128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    model.set_rope_theta(4e4, max_position_embeddings=256)
    assert model(torch.zeros(1, 129, dtype=torch.long)).shape == (1, 129, SMALL.vocab_size)


# ----------------------------------------------------------------------------- packing (doc_ids, positions)

def _packed_row(lengths: list[int], total: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row of documents of `lengths` tokens then padding (doc id -1) up to `total`: ids, doc_ids, positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL.vocab_size, (1, total), generator=g)
    doc = torch.full((1, total), -1)
    pos = torch.zeros(1, total, dtype=torch.long)
    at = 0
    for d, n in enumerate(lengths):
        doc[0, at:at + n], pos[0, at:at + n] = d, torch.arange(n)
        at += n
    return ids, doc, pos


def test_packed_rows_score_each_document_as_if_alone():
    """fp32: every document's per-token log-probs and top-k in a packed row (block-diagonal causal mask, RoPE restarted
    per document) equal the document run alone within 1e-5; positions derived from doc_ids give the same log-probs."""
    model = random_model()
    lengths = [7, 12, 5, 1]
    ids, doc, pos = _packed_row(lengths, 30)
    targets = ids.roll(-1, dims=1)
    with torch.no_grad():
        packed = model.token_logprobs(ids, targets, doc_ids=doc, positions=pos)
        derived = model.token_logprobs(ids, targets, doc_ids=doc)
        top_vals, top_ids = model.topk_logprobs(ids, 3, doc_ids=doc, positions=pos)
        at = 0
        for n in lengths:
            alone = model.token_logprobs(ids[:, at:at + n], targets[:, at:at + n])
            assert torch.allclose(packed[:, at:at + n], alone, atol=1e-5, rtol=0)
            vals, idx = model.topk_logprobs(ids[:, at:at + n], 3)
            assert torch.allclose(top_vals[:, at:at + n], vals, atol=1e-5, rtol=0)
            assert torch.equal(top_ids[:, at:at + n], idx)
            at += n
    real = doc >= 0  # padding positions differ (pack_examples gives them position 0) and are never supervised
    assert torch.equal(packed[real], derived[real])
    # Without the mask the documents would read each other: the test can fail.
    with torch.no_grad():
        leaky = model.token_logprobs(ids, targets, positions=pos)
    assert not torch.allclose(leaky[:, 7:19], packed[:, 7:19], atol=1e-3)


def test_packed_loss_equals_the_token_mean_over_the_documents_alone():
    model = random_model()
    ids, doc, pos = _packed_row([9, 6], 18, seed=5)
    labels = ids.roll(-1, dims=1).masked_fill(doc < 0, -100)
    with torch.no_grad():
        packed = model.loss(ids, labels, doc_ids=doc, positions=pos)
        alone = [model.loss(ids[:, a:b], labels[:, a:b]) for a, b in ((0, 9), (9, 15))]
    assert torch.allclose(packed, (alone[0] * 9 + alone[1] * 6) / 15, atol=1e-5, rtol=0)


def test_document_positions_restart_at_each_document():
    from model.llama import document_positions, packed_causal_mask
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    mask = packed_causal_mask(doc)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask.diagonal().all()


def test_unpacked_forward_is_the_plain_causal_path_bit_for_bit():
    """doc_ids=None keeps today's path: the model's layers with causal attention over RoPE positions 0..T-1 (no mask
    tensor), compared with torch.equal."""
    from model import ops
    model = random_model()
    ids = torch.randint(0, SMALL.vocab_size, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        cos, sin = model.rope_cos[:20], model.rope_sin[:20]
        for layer in model.model.layers:
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(2, 20, a.n_heads, a.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(2, 20, a.n_kv_heads, a.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(2, 20, a.n_kv_heads, a.head_dim).transpose(1, 2)
            q, k = ops.apply_rotary(q, k, cos, sin)
            y = ops.attention(q, k, v, causal=True)
            x = x + a.o_proj(y.transpose(1, 2).reshape(2, 20, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        expected = model.lm_head(model.model.norm(x))
        assert torch.equal(model(ids), expected)
        assert torch.equal(model(ids, doc_ids=None, positions=None), expected)


def test_packing_refuses_a_cache():
    model = random_model()
    cache = KVCache(SMALL, 1, 16)
    with pytest.raises(ValueError, match="no-cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache, doc_ids=torch.zeros(1, 4, dtype=torch.long))


def test_model_package_imports_nothing_from_stages():
    """model/ is the lower layer: stages import it, never the other way round (so a model edit never reruns data
    stages, and the model can be used on its own)."""
    import subprocess
    import sys
    code = ("import sys, model, model.megatron, model.generation; "
            "bad = sorted(m for m in sys.modules if m == 'stages' or m.startswith('stages.')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_what_the_snakefile_imports_does_not_import_torch():
    """The Snakefile reads stages.evaluate (a checkpoint's eval inputs) and stages.training.launch (a rule's launch
    line) on every `snakemake` call; the packages' exports load on first use (model/lazy.py), so torch, ~3 s of DAG
    parsing per call, stays unloaded. The exports still resolve, and an export named like a module of its package
    would be shadowed by that module, so model/lazy.py refuses one."""
    import subprocess
    import sys
    code = ("import sys, model, stages.evaluate, stages.training.launch, stages.training; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "import model.generation; from model import generate, Request; "
            "assert callable(generate) and generate is model.generation.generate; "
            "from stages.training import Trainer; assert Trainer.__module__ == 'stages.training.loop'; "
            "assert 'NanbeigeForCausalLM' in dir(model)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
    from model.lazy import lazy_exports
    with pytest.raises(ImportError, match="share a submodule"):
        lazy_exports("model", {"generation": ["generation"]}, {})
    getattr_, _ = lazy_exports("model", {"config": ["ModelConfig"]}, {})
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        getattr_("nope")
