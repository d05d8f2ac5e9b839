"""pretrain.backend: megatron on CPU (gloo): at TP = PP = 1 (world size 1) the same init (hf_to_megatron of the torch
backend's seeded init), plan, LR and batches give the torch backend's losses and weights; the outputs are HF Llama
checkpoints; N steps == N/2 + resume + N/2 (windows exact, weights bit for bit); on 2 processes as TP = 2 (each rank
holding its slice: tp_shard / tp_unshard), PP = 2 (each rank one pipeline stage: pp_shard / pp_unshard, activations
passed point to point) or DP = 2 the same, across a resume; a PP that does not divide the layers is refused by name.

Tolerances (fp32): the two backends compute the same function with different kernels: Megatron fuses q/k/v and
gate/up into one matmul each, uses its own softmax and cross-entropy, its grad buffer and clip; the per-step
difference is float rounding (~1e-7 relative), which 12 Adam steps carry to the weights (Adam divides small gradients
by their own RMS, so their rounding shows most). Measured over the 12-step micro plan: weights max |dw| 3.2e-6,
losses rel 1.3e-7, gradient norms rel 4.9e-7; asserted with >= 6x margin: WEIGHT_ATOL 2e-5, LOSS_RTOL 1e-5 (losses,
gradient norms and held-out losses). A normalizer error is a factor (tokens, micro-batches) and fails by far."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures_tokens import MODEL_PARAMS, PRETRAIN_PARAMS, make_tokens, write_plan
from stages import common, pretrain
from stages.training.megatron_backend import te_available

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[dev]')")

WEIGHT_ATOL = 2e-5
LOSS_RTOL = 1e-5
MEGATRON = {**PRETRAIN_PARAMS, "backend": "megatron",
            "megatron": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                         "sequence_parallel": False, "recompute_granularity": None, "transformer_engine": False}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mcore")
    return tmp, make_tokens(tmp), write_plan(tmp / "plan.json")


def train(setup, name: str, params: dict, max_steps: int | None = None, log: list | None = None):
    tmp, tokens, plan = setup
    out = tmp / name
    on_step = None if log is None else (lambda step, windows: log.extend((step, b, c) for b, c in windows))
    return pretrain.run_pretrain(plan, tokens, out / "pretrain", out / "ckpt", dict(params), dict(MODEL_PARAMS),
                                 out / "live", max_steps=max_steps, on_step=on_step)


def series(setup, name: str, metric: str) -> list[float]:
    tsv = (setup[0] / name / "live" / "plots" / "metrics" / "train" / f"{metric}.tsv").read_text().splitlines()[1:]
    return [float(r.split("\t")[1]) for r in tsv]


def final(setup, name: str) -> dict[str, torch.Tensor]:
    return load_file(setup[0] / name / "pretrain" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(setup):
    logs = {"torch": [], "megatron": []}
    manifests = {"torch": train(setup, "torch", PRETRAIN_PARAMS, log=logs["torch"]),
                 "megatron": train(setup, "megatron", MEGATRON, log=logs["megatron"])}
    return manifests, logs


def test_megatron_backend_matches_the_torch_backend(setup, runs):
    manifests, logs = runs
    assert logs["megatron"] == logs["torch"]  # the same batch source: the same windows in the same order
    a, b = final(setup, "torch"), final(setup, "megatron")
    assert a.keys() == b.keys()  # HF Llama names: megatron_to_hf on the way out
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    diffs = {m: max(abs(x / y - 1) for x, y in zip(series(setup, "megatron", m), series(setup, "torch", m)))
             for m in ("loss", "grad_norm", "lr")}
    print(f"megatron vs torch: max |dw| {worst:.3g}, max rel diff {diffs}")
    assert worst <= WEIGHT_ATOL
    assert diffs["lr"] == 0.0  # the same FG-WSD LR table
    assert diffs["loss"] <= LOSS_RTOL and diffs["grad_norm"] <= LOSS_RTOL
    mt, mm = manifests["torch"], manifests["megatron"]
    assert mt["counts"] == mm["counts"] and mt["bucket_cursors"] == mm["bucket_cursors"]
    for phase, held in mt["heldout_loss"].items():  # evaluated through Megatron's forward
        assert mm["heldout_loss"][phase] == pytest.approx(held, rel=LOSS_RTOL)
    config = json.loads((setup[0] / "megatron" / "pretrain" / "final" / "config.json").read_text())
    assert config["rope_theta"] == 4 * MODEL_PARAMS["rope_theta"]  # ABF reached the Megatron model's config too


def test_megatron_checkpoint_loads_in_our_model(setup, runs):
    from model import load_pretrained
    final_dir = setup[0] / "megatron" / "pretrain" / "final"
    model = load_pretrained(final_dir)
    ids = torch.arange(20)[None] % MODEL_PARAMS["vocab_size"]
    assert model(ids).shape == (1, 20, MODEL_PARAMS["vocab_size"])


def test_megatron_stop_and_resume_equals_uninterrupted(setup, runs):
    log: list = []
    assert train(setup, "mresume", MEGATRON, max_steps=5, log=log) is None
    manifest = train(setup, "mresume", MEGATRON, log=log)
    assert log == runs[1]["megatron"]  # cursors exact: no window repeated or skipped
    a, b = final(setup, "megatron"), final(setup, "mresume")
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights and Megatron's optimizer state restored bit for bit
    assert manifest["outputs"] == runs[0]["megatron"]["outputs"]
    assert series(setup, "mresume", "loss") == series(setup, "megatron", "loss")


@pytest.mark.parametrize("recompute", [{"recompute_granularity": "selective"},
                                       {"recompute_granularity": "full", "recompute_method": "uniform",
                                        "recompute_num_layers": 1}], ids=["selective", "full"])
def test_activation_recompute_trains_the_same_weights(setup, runs, recompute):
    name = f"recompute_{recompute['recompute_granularity']}"
    train(setup, name, {**MEGATRON, "megatron": {**MEGATRON["megatron"], **recompute}})
    a, b = final(setup, "megatron"), final(setup, name)
    assert all(torch.equal(a[k], b[k]) for k in a)  # recomputing the same forward: bit for bit on CPU


def test_tp_shard_then_unshard_is_exact_and_splits_whole_query_groups():
    from model import ModelConfig, NanbeigeForCausalLM
    from model.megatron import hf_to_megatron, split_qkv, tp_shard, tp_unshard
    cfg = ModelConfig.from_params({**MODEL_PARAMS, "num_attention_heads": 4, "num_key_value_heads": 2})
    torch.manual_seed(0)
    full = hf_to_megatron(NanbeigeForCausalLM(cfg).state_dict(), cfg)
    shards = [tp_shard(full, cfg, 2, r) for r in range(2)]
    back = tp_unshard(shards)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    half = ModelConfig.from_params({**MODEL_PARAMS, "num_attention_heads": 2, "num_key_value_heads": 1,
                                    "intermediate_size": cfg.intermediate_size // 2})
    for r, shard in enumerate(shards):  # rank r's qkv is query group r whole; its fc1 is [gate_r; up_r]
        q, k, v = split_qkv(shard["decoder.layers.0.self_attention.linear_qkv.weight"], half)
        q_full, k_full, _ = split_qkv(full["decoder.layers.0.self_attention.linear_qkv.weight"], cfg)
        assert torch.equal(q, q_full.chunk(2)[r]) and torch.equal(k, k_full.chunk(2)[r])
        gate, up = shard["decoder.layers.0.mlp.linear_fc1.weight"].chunk(2)
        gate_full, up_full = full["decoder.layers.0.mlp.linear_fc1.weight"].chunk(2)
        assert torch.equal(gate, gate_full.chunk(2)[r]) and torch.equal(up, up_full.chunk(2)[r])
    with pytest.raises(ValueError, match="does not divide num_key_value_heads=2"):
        tp_shard(full, cfg, 4, 0)


def test_pp_shard_then_unshard_is_exact_and_gives_each_stage_its_layers():
    from model import ModelConfig, NanbeigeForCausalLM
    from model.megatron import hf_to_megatron, pp_shard, pp_unshard, tp_shard, tp_unshard
    cfg = ModelConfig.from_params({**MODEL_PARAMS, "num_hidden_layers": 4, "num_key_value_heads": 2})
    torch.manual_seed(0)
    full = hf_to_megatron(NanbeigeForCausalLM(cfg).state_dict(), cfg)
    stages = [pp_shard(full, cfg, 2, r) for r in range(2)]
    back = pp_unshard(stages, cfg)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    first, last = stages
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert "output_layer.weight" in last and "decoder.final_layernorm.weight" in last
    assert "embedding.word_embeddings.weight" not in last
    assert {k.split(".")[2] for k in first if k.startswith("decoder.layers.")} == {"0", "1"}
    assert torch.equal(last["decoder.layers.0.mlp.linear_fc2.weight"], full["decoder.layers.2.mlp.linear_fc2.weight"])
    # TP within each stage, then PP, joined in either order: the same full state
    grid = [[tp_shard(pp_shard(full, cfg, 2, p), cfg, 2, t) for t in range(2)] for p in range(2)]
    joined = pp_unshard([tp_unshard(row) for row in grid], cfg)
    assert all(torch.equal(joined[k], full[k]) for k in full)
    with pytest.raises(ValueError, match="does not divide num_hidden_layers=4"):
        pp_shard(full, cfg, 3, 0)


@pytest.fixture(scope="module")
def torch_kv2(setup):
    """The single-process torch reference for the 2-process runs: a model with 2 query groups (one per TP rank)."""
    from test_fsdp import run_world
    return run_world(1, job(setup, "torch_kv2", dict(PRETRAIN_PARAMS)))


def job(setup, name: str, params: dict) -> dict:
    tmp, tokens, plan = setup
    return {"plan": str(plan), "tokens": str(tokens), "out": str(tmp / name), "ckpt": str(tmp / name / "ckpt"),
            "params": params, "model": {**MODEL_PARAMS, "num_key_value_heads": 2}, "log": str(tmp / f"{name}.log")}


@pytest.mark.parametrize("tp,pp,stop", [(2, 1, None), (1, 2, 5), (1, 1, None)],
                         ids=["tp2_dp1", "pp2_dp1_resumed", "tp1_dp2"])
def test_two_processes_match_the_torch_backend(setup, torch_kv2, tp, pp, stop):
    """2 gloo processes as TP = 2 (each rank holds half of every parallel weight and its optimizer state), as PP = 2
    (each rank one layer of the two, the first with the embedding, the last with norm, output layer and loss;
    Megatron's 1F1B schedule over the step's micro-batches; stopped at step 5 and resumed: each model-parallel
    rank's optimizer state gathered, saved and given back to its rank, the path TP's slices take too), or as DP = 2
    (each rank trains on half the rows; Megatron's DDP sums the gradients and finalize_model_grads divides by the
    all-reduced token count): the run equals the single-process torch run."""
    from test_fsdp import run_world
    name = f"megatron_tp{tp}_pp{pp}_w2"
    params = {**MEGATRON, "megatron": {**MEGATRON["megatron"], "tensor_model_parallel_size": tp,
                                       "pipeline_model_parallel_size": pp}}
    log = run_world(2, {**job(setup, name, params), "max_steps": stop}) if stop else []
    log += run_world(2, {**job(setup, name, params), "log": str(setup[0] / f"{name}.2.log")})
    assert log == torch_kv2  # cursors exact (across the resume)
    a, b = final(setup, "torch_kv2"), final(setup, name)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    diffs = {m: max(abs(x / y - 1) for x, y in zip(series(setup, name, m), series(setup, "torch_kv2", m)))
             for m in ("loss", "grad_norm")}
    print(f"{name} vs torch: max |dw| {worst:.3g}, max rel diff {diffs}")
    assert a.keys() == b.keys() and worst <= WEIGHT_ATOL
    assert diffs["loss"] <= LOSS_RTOL and diffs["grad_norm"] <= LOSS_RTOL


@pytest.mark.parametrize("knob,error", [
    ({"pipeline_model_parallel_size": 3}, "pipeline_model_parallel_size=3 does not divide num_hidden_layers=2"),
    pytest.param({"sequence_parallel": True}, "sequence_parallel needs the Transformer Engine layer spec",
                 marks=pytest.mark.skipif(te_available(), reason="Transformer Engine is installed here"))])
def test_unsupported_megatron_layouts_are_refused_clearly(setup, tmp_path, knob, error):
    tmp, tokens, plan = setup
    params = {**MEGATRON, "megatron": {**MEGATRON["megatron"], **knob}}
    with pytest.raises(common.StageError, match=error):
        pretrain.run_pretrain(plan, tokens, tmp_path / "out", tmp_path / "ckpt", params, dict(MODEL_PARAMS),
                              tmp_path / "live")


def test_unknown_backend_is_refused(setup, tmp_path):
    tmp, tokens, plan = setup
    with pytest.raises(common.StageError, match="pretrain.backend must be one of"):
        pretrain.run_pretrain(plan, tokens, tmp_path / "out", tmp_path / "ckpt", {**PRETRAIN_PARAMS, "backend": "jax"},
                              dict(MODEL_PARAMS), tmp_path / "live")
