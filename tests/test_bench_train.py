"""bench/bench_train.py's reference model, tiktoken conversion and worker path (no timing assertions)."""
import importlib.util
import json
import sys

import pytest
import torch

from model import ModelConfig, NanbeigeForCausalLM
from stages import common
from stages.tokenize import load_tokenizer, save_tokenizer, train_tokenizer

spec = importlib.util.spec_from_file_location("bench_train", common.REPO / "bench" / "bench_train.py")
bench_train = importlib.util.module_from_spec(spec)
sys.modules["bench_train"] = bench_train
spec.loader.exec_module(bench_train)

MICRO = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
         "rope_theta": 10000.0}
SENTENCE = "Hello world, it's 2024!\n\tThe café's naïve résumé costs 3.50 € — déjà vu.  <|im_end|> done"


def tiny_spec() -> dict:
    return bench_train.shape_spec(common.load_params(), "tiny", steps=None, threads=1)


def test_reference_has_our_parameter_count_and_first_loss_for_the_tiny_shape():
    cfg = ModelConfig.from_params(tiny_spec()["model"])
    torch.manual_seed(0)
    ours = NanbeigeForCausalLM(cfg)
    torch.manual_seed(0)
    reference = bench_train.ReferenceGPT(cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert sum(p.numel() for p in reference.parameters()) == n_ours == cfg.num_parameters()
    batch = torch.randint(cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # The same init stream and the same function: equal losses (not just equal sizes).
        assert reference(batch[:, :-1], batch[:, 1:]).item() == pytest.approx(
            ours.loss(batch[:, :-1], batch[:, 1:]).item(), abs=1e-5)


def test_reference_optimizer_decays_matrices_and_embeddings_only():
    cfg = ModelConfig.from_params(MICRO)
    model = bench_train.ReferenceGPT(cfg)
    decay, no_decay = bench_train.reference_optimizer(model, tiny_spec()["pretrain"]).param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.wte.weight for p in decay["params"])


def test_flops_per_token_counts_lm_head_but_not_the_embedding_lookup():
    cfg = ModelConfig.from_params(MICRO)
    matmul_weights = cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size
    assert bench_train.flops_per_token(cfg, 16) == 6 * matmul_weights + 12 * 2 * 4 * 8 * 16


def test_isolated_train_worker_reports_steps_peak_rss_and_profile():
    spec = {"model": MICRO, "pretrain": tiny_spec()["pretrain"], "batch_size": 2, "seq_len": 16, "warmup": 1,
            "steps": 2, "threads": 1, "seed": 0, "impl": "ours", "profile": True}
    out = bench_train.run_isolated("train", spec, threads=1)
    assert out["parameters"] == ModelConfig.from_params(MICRO).num_parameters()
    assert out["tokens_per_step"] == 32 and len(out["step_s"]) == 2 and len(out["losses"]) == 3
    assert out["peak_rss_bytes"] > out["rss_base_bytes"] > 0
    assert any(op["op"] == "aten::mm" for op in out["profile_top_ops"])


def test_byte_decoder_inverts_the_byte_level_alphabet():
    from tokenizers import pre_tokenizers
    decoder = bench_train.gpt2_byte_decoder()
    assert sorted(decoder.values()) == list(range(256))
    assert set(decoder) == set(pre_tokenizers.ByteLevel.alphabet())
    assert decoder["Ġ"] == ord(" ") and decoder["A"] == ord("A")


def test_tiktoken_from_our_ranks_gives_our_ids_and_round_trips(tmp_path):
    pytest.importorskip("tiktoken")
    texts = [SENTENCE, "The quick brown fox jumps over the lazy dog. " * 20, "def f(x):\n    return x * 2\n" * 10]
    save_tokenizer(train_tokenizer(texts, vocab_size=320, min_frequency=1), tmp_path)
    ours = load_tokenizer(tmp_path)
    enc = bench_train.tiktoken_encoding(tmp_path)
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert ids == ours.encode(text, add_special_tokens=False).ids
        assert enc.decode(ids) == text


def test_tiktoken_ranks_refuse_a_non_bpe_tokenizer():
    with pytest.raises(common.StageError, match="byte-level BPE"):
        bench_train.tiktoken_ranks({"model": {"type": "WordPiece", "vocab": {}}})


def test_load_texts_falls_back_to_the_corpus_and_caps_bytes(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"document number {i} " * 5 for i in range(10)]
    (corpus / "unit.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    texts, where = bench_train.load_texts(tmp_path / "no_pool", corpus, max_bytes=250)
    assert where == str(corpus)
    assert texts == docs[:3]  # 90 bytes each: the third one reaches 270 >= 250
