"""model/vllm_engine.py against a fake `vllm` module (the real one is an optional GPU dependency): one vLLM request per
(prompt, seed) with our sampling params, outputs regrouped per request in order, finish reasons, the sampled
token's log-prob, weight sync by HF name in place, and the error when vllm is missing. The fake returns vLLM's own
output shapes: RequestOutput.outputs[0] with token_ids, logprobs (one {token id: Logprob} dict per token, here with
a decoy entry beside the sampled token), finish_reason and stop_reason.

The last test runs a tiny checkpoint on real vLLM and is skipped without vllm and a CUDA GPU."""
import dataclasses
import importlib.util
import math
import os
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from model import ModelConfig, NanbeigeForCausalLM, Request, SamplingParams, generate, save_pretrained
from model.vllm_engine import VLLMEngine

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=40, rope_theta=10000.0)


def decode(ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: list | None
    outputs: list
    finished: bool


def canned(prompt, seed, n):
    """The fake engine's sample of (prompt, seed): n tokens and their log-probs."""
    return [(seed * 7 + sum(prompt) + 3 * k) % CFG.vocab_size for k in range(n)], \
        [-0.1 * (k + 1) - 0.01 * seed for k in range(n)]


class FakeVLLMModel:
    """vLLM's Llama layout (fused qkv_proj and gate_up_proj); load_weights records what it is given and returns the
    vLLM names it wrote, as vLLM's does."""

    def __init__(self, tied=False, extra=False):
        # Tied, vLLM's lm_head is the embedding module itself: named_parameters lists it once, as embed_tokens.
        self.names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if tied else ["lm_head.weight"])
        for i in range(CFG.num_hidden_layers):
            self.names += [f"model.layers.{i}.{n}.weight" for n in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                                    "mlp.gate_up_proj", "mlp.down_proj",
                                                                    "input_layernorm", "post_attention_layernorm")]
        self.names += ["model.extra.weight"] if extra else []
        self.loaded = {}

    def named_parameters(self):
        return [(n, None) for n in self.names]

    def load_weights(self, weights):
        written = set()
        for name, tensor in weights:
            self.loaded[name] = tensor.clone()
            for shard, fused in ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
                                 (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj")):
                name = name.replace(shard, fused)
            written.add(name)
        return written


class FakeLLM:
    """vllm.LLM: records its arguments and the requests; samples canned() up to max_tokens or a stop token id."""
    instances = []

    def __init__(self, model, **kwargs):
        self.model_path, self.kwargs = model, kwargs
        self.calls, self.events = [], []
        self.vllm_model = FakeVLLMModel()
        self.stop_string_at = None      # (token index, stop string): a stop string completes at that token
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        outputs = []
        for i, (prompt, sp) in enumerate(zip(prompts, sampling_params)):
            ids, lps = canned(prompt["prompt_token_ids"], sp.seed, sp.max_tokens)
            finish, stop = "length", None
            for k, t in enumerate(ids):
                if t in sp.stop_token_ids:
                    ids, lps, finish, stop = ids[:k + 1], lps[:k + 1], "stop", t
                    break
                if self.stop_string_at and k == self.stop_string_at[0]:
                    ids, lps, finish, stop = ids[:k + 1], lps[:k + 1], "stop", self.stop_string_at[1]
                    break
            logprobs = [{t: Logprob(lp, 1), (t + 1) % CFG.vocab_size: Logprob(-50.0, 2)} for t, lp in zip(ids, lps)]
            outputs.append(RequestOutput(str(i), None, prompt["prompt_token_ids"], None,
                                         [CompletionOutput(0, "", ids, sum(lps), logprobs, finish, stop)], True))
        return outputs

    def apply_model(self, fn):
        self.events.append("apply_model")
        return [fn(self.vllm_model)]

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(kw)
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    FakeLLM.instances.clear()
    return vllm


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    save_pretrained(NanbeigeForCausalLM(CFG), tmp_path)
    return tmp_path


@pytest.fixture
def with_tokenizer(checkpoint):
    (checkpoint / "tokenizer.json").write_text("{}")
    return checkpoint


def test_engine_is_built_from_the_checkpoint_in_process(fake_vllm, checkpoint):
    engine = VLLMEngine(checkpoint, gpu_memory_utilization=0.3, enforce_eager=True)
    (llm,) = FakeLLM.instances
    assert llm.model_path == str(checkpoint) and engine.config == CFG
    assert llm.kwargs == {"dtype": "bfloat16", "gpu_memory_utilization": 0.3, "logprobs_mode": "raw_logprobs",
                          "seed": 0, "skip_tokenizer_init": True, "max_model_len": CFG.max_position_embeddings,
                          "enforce_eager": True}
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_one_vllm_request_per_prompt_and_seed(fake_vllm, checkpoint):
    engine = VLLMEngine(checkpoint)
    p1, p2 = [5, 9, 2], [7, 1, 1, 4, 30]
    engine.generate([Request(p1, (5, 6)), Request(p2, (11,))],
                    SamplingParams(8, temperature=0.7, top_p=0.9, stop_token_ids=(3, 4)))
    ((prompts, sampling),) = FakeLLM.instances[0].calls
    assert prompts == [{"prompt_token_ids": p1}, {"prompt_token_ids": p1}, {"prompt_token_ids": p2}]
    assert [sp.seed for sp in sampling] == [5, 6, 11]
    assert sampling[0].kwargs == {"n": 1, "seed": 5, "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 0,
                                  "stop_token_ids": [3, 4], "stop": [], "ignore_eos": True, "logprobs": 0,
                                  "detokenize": False, "skip_special_tokens": False,
                                  "spaces_between_special_tokens": False}


def test_max_tokens_leaves_the_prompt_its_room_in_the_context(fake_vllm, checkpoint):
    engine = VLLMEngine(checkpoint)
    long = [1] * (CFG.max_position_embeddings - 3)
    ((c,), (d,)) = engine.generate([Request(long, (0,)), Request([2, 3], (0,))], SamplingParams(10, 0.0))
    ((_, sampling),) = FakeLLM.instances[0].calls
    assert [sp.max_tokens for sp in sampling] == [3, 10]
    assert (len(c.token_ids), c.finish_reason, c.stop) == (3, "length", None) and len(d.token_ids) == 10


def test_outputs_regrouped_per_request_in_order(fake_vllm, with_tokenizer):
    engine = VLLMEngine(with_tokenizer)
    reqs = [Request([5, 9, 2], (5, 6, 7)), Request([7, 1], (11,)), Request([3, 3, 3, 3], (1, 2))]
    out = engine.generate(reqs, SamplingParams(6, temperature=0.0), decode)
    assert FakeLLM.instances[0].kwargs["skip_tokenizer_init"] is False       # tokenizer.json: vLLM loads it
    assert [len(samples) for samples in out] == [3, 1, 2]
    for req, samples in zip(reqs, out):
        for seed, c in zip(req.seeds, samples):
            ids, lps = canned(list(req.prompt_ids), seed, 6)
            assert c.token_ids == ids and c.logprobs == pytest.approx(lps)   # the sampled token's, not the decoy's
            assert c.sampling_logprobs == [0.0] * 6 and c.text == decode(ids)


def test_finish_reasons_stop_token_and_stop_string(fake_vllm, with_tokenizer):
    engine = VLLMEngine(with_tokenizer)
    prompt, seed = [5, 9, 2], 5
    ids, _ = canned(prompt, seed, 10)
    (c,), = engine.generate([Request(prompt, (seed,))], SamplingParams(10, 0.0, stop_token_ids=(ids[3],)), decode)
    assert (c.token_ids, c.finish_reason, c.stop, c.text) == (ids[:4], "stop", ids[3], decode(ids[:3]))
    FakeLLM.instances[0].stop_string_at = (5, decode(ids[4:6]))
    (c,), = engine.generate([Request(prompt, (seed,))], SamplingParams(10, 0.0, stop_strings=(decode(ids[4:6]),)),
                            decode)
    ((_, sampling),) = FakeLLM.instances[0].calls[1:]
    assert sampling[0].stop == [decode(ids[4:6])] and sampling[0].detokenize
    assert (c.token_ids, c.finish_reason, c.stop, c.text) == (ids[:6], "stop", decode(ids[4:6]), decode(ids[:4]))


@pytest.mark.parametrize("mode, temperature, top_p, raw_given, sampling_given", [
    ("raw_logprobs", 0.0, 1.0, True, "zero"),
    ("raw_logprobs", 1.0, 1.0, True, True),
    ("raw_logprobs", 0.7, 0.9, True, False),
    ("processed_logprobs", 0.0, 1.0, True, "zero"),
    ("processed_logprobs", 1.0, 1.0, True, True),
    ("processed_logprobs", 0.7, 0.9, False, True),
])
def test_logprob_fields_by_mode(fake_vllm, checkpoint, mode, temperature, top_p, raw_given, sampling_given):
    engine = VLLMEngine(checkpoint, logprobs_mode=mode)
    (c,), = engine.generate([Request([4, 2], (3,))], SamplingParams(5, temperature, top_p))
    _, lps = canned([4, 2], 3, 5)
    assert c.logprobs == pytest.approx(lps) if raw_given else all(map(math.isnan, c.logprobs))
    if sampling_given == "zero":
        assert c.sampling_logprobs == [0.0] * 5
    else:
        assert c.sampling_logprobs == pytest.approx(lps) if sampling_given else all(map(math.isnan,
                                                                                        c.sampling_logprobs))


@pytest.mark.parametrize("params, decoder, match", [
    (SamplingParams(4, 3.0), None, "temperature"),
    (SamplingParams(4, 0.005), None, "temperature"),
    (SamplingParams(4, 1.0, stop_strings=("x",)), None, "decode function"),
    (SamplingParams(4, 1.0, stop_strings=("x",)), decode, "tokenizer.json"),
])
def test_refused_params(fake_vllm, checkpoint, params, decoder, match):
    with pytest.raises(ValueError, match=match):
        VLLMEngine(checkpoint).generate([Request([1, 2])], params, decoder)


def test_refused_logprobs_mode(fake_vllm, checkpoint):
    with pytest.raises(ValueError, match="logprobs_mode"):
        VLLMEngine(checkpoint, logprobs_mode="raw_logits")


def test_refused_requests(fake_vllm, checkpoint):
    engine = VLLMEngine(checkpoint)
    for req in (Request([]), Request([1] * CFG.max_position_embeddings), Request([1, 2], ())):
        with pytest.raises(ValueError, match="prompt tokens and a seed"):
            engine.generate([req], SamplingParams(4))


@pytest.mark.parametrize("tied", [False, True])
def test_sync_weights_loads_every_parameter_by_hf_name(fake_vllm, checkpoint, tied):
    engine = VLLMEngine(checkpoint)
    llm = FakeLLM.instances[0]
    llm.vllm_model = FakeVLLMModel(tied=tied)
    torch.manual_seed(1)
    trainer = NanbeigeForCausalLM(dataclasses.replace(CFG, tie_word_embeddings=tied))
    engine.sync_weights(trainer)
    want = {n: t for n, t in trainer.state_dict().items() if not (tied and n == "lm_head.weight")}
    assert set(llm.vllm_model.loaded) == set(want)
    assert all(torch.equal(llm.vllm_model.loaded[n], t) for n, t in want.items())
    assert llm.events == ["apply_model", "reset_prefix_cache"]     # the old weights' KV cache is dropped after


def test_sync_weights_names_are_hf_under_activation_checkpointing(fake_vllm, checkpoint):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from model.llama import DecoderLayer
    engine = VLLMEngine(checkpoint)
    trainer = NanbeigeForCausalLM(CFG)
    plain = set(trainer.state_dict())
    apply_activation_checkpointing(trainer, check_fn=lambda m: isinstance(m, DecoderLayer))
    assert any("_checkpoint_wrapped_module" in n for n, _ in trainer.named_parameters())
    engine.sync_weights(trainer)
    assert set(FakeLLM.instances[0].vllm_model.loaded) == plain


def test_fsdp_shards_are_gathered_one_at_a_time():
    from model.vllm_engine import hf_tensors
    gathered = []

    class Shard:     # a DTensor's face: full_tensor() all-gathers it
        def __init__(self, name):
            self.name = name

        def full_tensor(self):
            gathered.append(self.name)
            return torch.zeros(2)

    class Sharded(torch.nn.Module):
        config = CFG

        def state_dict(self):
            return {n: Shard(n) for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}

    pairs = hf_tensors(Sharded())
    assert next(pairs)[0] == "model.embed_tokens.weight" and gathered == ["model.embed_tokens.weight"]
    assert [n for n, _ in pairs] == ["model.norm.weight", "lm_head.weight"] and len(gathered) == 3


def test_sync_weights_refuses_a_vllm_parameter_left_unwritten(fake_vllm, checkpoint):
    engine = VLLMEngine(checkpoint)
    FakeLLM.instances[0].vllm_model = FakeVLLMModel(extra=True)
    with pytest.raises(RuntimeError, match="model.extra.weight"):
        engine.sync_weights(NanbeigeForCausalLM(CFG))


def test_missing_vllm_is_a_clear_error(monkeypatch, checkpoint):
    monkeypatch.setitem(sys.modules, "vllm", None)    # import vllm raises ImportError
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ImportError, match="needs vllm.*requirements-gpu.txt"):
        VLLMEngine(checkpoint)


HAVE_VLLM_GPU = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_VLLM_GPU, reason="skipped: needs vllm and a CUDA GPU")
def test_real_vllm_greedy_equals_our_engine(tmp_path):
    from model import load_pretrained
    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                      rope_theta=10000.0)
    torch.manual_seed(0)
    model = NanbeigeForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)     # peaky next-token distributions: greedy has no near-ties
    save_pretrained(model, tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 1, 12)]
    params = SamplingParams(24, temperature=0.0)
    ours = generate(load_pretrained(tmp_path, device="cuda").eval(), [Request(p) for p in prompts], params)
    engine = VLLMEngine(tmp_path, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    theirs = engine.generate([Request(p) for p in prompts], params)
    assert [c.token_ids for (c,) in theirs] == [c.token_ids for (c,) in ours]
    for (a,), (b,) in zip(theirs, ours):
        assert a.finish_reason == b.finish_reason == "length"
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3)
