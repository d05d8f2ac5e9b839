"""The fused Triton kernels (kernels/, imported as nanbeige_kernels) against their references in model/ops.py:
values and gradients, fp32 and bf16, odd shapes; and model/ops.py's dispatch.

Without CUDA the kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET=1 is set while this module
imports nanbeige_kernels (Triton reads it when a kernel is decorated) and while its tests run (and at launch), and
restored after, so no other test module sees it. With CUDA the same tests run compiled, on the GPU (`gpu` marker).

Tolerance: the normwise relative error max|kernel - reference| / max|reference| of every output and every gradient,
kernel and reference in the same dtype, stays under 1e-5 in fp32 (summation order only: chunked logsumexp, fp32
gradient sums over chunks) and under 2e-2 in bf16 (a few ulps at eps 2^-8: the kernels round once from fp32 where
the reference rounds after every op; LM-head log-probs are fp32 on both sides, from the same bf16 logits).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from model import ModelConfig, NanbeigeForCausalLM, ops

CUDA = torch.cuda.is_available()


@contextlib.contextmanager
def _interpreter_env():
    """TRITON_INTERPRET=1 while the context lasts, then as before (Triton reads it at decoration and at launch)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


if CUDA or "nanbeige_kernels" in sys.modules:
    nk = importlib.import_module("nanbeige_kernels")
else:
    with _interpreter_env():
        nk = importlib.import_module("nanbeige_kernels")


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """This module's tests (only) run with the interpreter on when the kernels were imported under it."""
    with _interpreter_env() if nk.INTERPRETED else contextlib.nullcontext():
        yield


lce = importlib.import_module("nanbeige_kernels.linear_cross_entropy")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not nk.INTERPRETED, reason="kernels were compiled for CUDA in this "
                                                 "process; the interpreter path runs on machines without CUDA")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]),
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


def _leaf(*shape, device, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()


def _values_and_grads(fn, inputs, upstream_seed=99):
    """fn(*inputs) and d(sum(out * r))/d inputs for a fixed random r per output (so every element's gradient counts)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(upstream_seed)
    total = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    grads = torch.autograd.grad(total, [x for x in inputs if x.requires_grad])
    return [o.detach() for o in outs], list(grads)


def _assert_match(kernel_fn, reference_fn, inputs, tol):
    got, got_grads = _values_and_grads(kernel_fn, inputs)
    want, want_grads = _values_and_grads(reference_fn, inputs)
    for i, (a, b) in enumerate(zip(got + got_grads, want + want_grads, strict=True)):
        _assert_close_normwise(a, b, tol, f"output/gradient {i}")


def _assert_close_normwise(a, b, tol, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    err = float((a.float() - b.float()).abs().max() / b.float().abs().max())
    assert err <= tol, f"{what}: normwise relative error {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------- elementwise ops and RMSNorm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(device, dtype):
    x = _leaf(3, 5, 100, device=device, dtype=dtype, scale=3.0)  # row length 100: not a power of two
    w = _leaf(100, device=device, dtype=dtype, seed=1)
    _assert_match(lambda a, b: nk.rms_norm(a, b, 1e-5), lambda a, b: ops.rms_norm_reference(a, b, 1e-5), [x, w],
                  TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_mixed_dtypes(device):
    """bf16 activations with an fp32 weight promote to fp32, as the reference does."""
    x = _leaf(4, 96, device=device, dtype=torch.bfloat16)
    w = _leaf(96, device=device, dtype=torch.float32, seed=1)
    _assert_match(lambda a, b: nk.rms_norm(a, b, 1e-6), lambda a, b: ops.rms_norm_reference(a, b, 1e-6), [x, w],
                  TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(device, dtype):
    gate = _leaf(7, 300, device=device, dtype=dtype, scale=4.0)  # 2100 elements: not a multiple of the block
    up = _leaf(7, 300, device=device, dtype=dtype, seed=1)
    _assert_match(nk.swiglu, ops.swiglu_reference, [gate, up], TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tables", ["rope_cache", "random"])
def test_apply_rotary(device, dtype, tables):
    """q and k as the model makes them (transposed views of [B, T, H, D]); head_dim 24, so half (12) is not a power
    of two; random tables (halves differ) check the backward's transpose, rope_cache ones the model's case."""
    b, t, h, hkv, d = 2, 6, 4, 2, 24
    q = _leaf(b, t, h, d, device=device, dtype=dtype).transpose(1, 2)
    k = _leaf(b, t, hkv, d, device=device, dtype=dtype, seed=1).transpose(1, 2)
    if tables == "rope_cache":
        cos, sin = ops.rope_cache(t, d, 10000.0, device=device)
    else:
        cos, sin = (torch.randn(t, d, generator=torch.Generator().manual_seed(s)).to(device) for s in (2, 3))
    qk = [q.detach().requires_grad_(), k.detach().requires_grad_()]  # a non-contiguous leaf of its own
    _assert_match(lambda a, c: nk.apply_rotary(a, c, cos, sin), lambda a, c: ops.apply_rotary_reference(a, c, cos, sin),
                  qk, TOL[dtype])


# ----------------------------------------------------------------------------- the LM head with its log-softmax


def _head(device, dtype, n=(2, 9), hidden=48, vocab=301):
    """Hidden [2, 9, 48] and weight [301, 48]: 18 tokens over token chunks of 8, vocab 301 over chunks of 100 and
    Triton blocks of 64 (set by `small_blocks`), so every chunk and block boundary has a remainder."""
    h = _leaf(*n, hidden, device=device, dtype=dtype)
    w = _leaf(vocab, hidden, device=device, dtype=dtype, scale=0.5, seed=1)
    targets = torch.randint(0, vocab, n, generator=torch.Generator().manual_seed(2)).to(device)
    return h, w, targets


CHUNKS = dict(token_chunk=8, vocab_chunk=100)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(lce, "_BLOCK_V", 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy(device, dtype, small_blocks):
    h, w, labels = _head(device, dtype)
    for ignore_index in (-100, -7):  # the default and a custom one
        masked = labels.clone()
        masked[0, :3] = ignore_index
        masked[1, -1] = ignore_index
        _assert_match(lambda a, b: nk.linear_cross_entropy(a, b, masked, ignore_index, **CHUNKS),
                      lambda a, b: ops.linear_cross_entropy_reference(a, b, masked, ignore_index), [h, w],
                      TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_all_ignored_is_nan(device):
    h, w, labels = _head(device, torch.float32)
    labels = torch.full_like(labels, -100)
    assert nk.linear_cross_entropy(h, w, labels, **CHUNKS).isnan()
    assert ops.linear_cross_entropy_reference(h, w, labels).isnan()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_token_logprobs(device, dtype, small_blocks):
    h, w, targets = _head(device, dtype)
    _assert_match(lambda a, b: nk.linear_token_logprobs(a, b, targets, **CHUNKS),
                  lambda a, b: ops.linear_token_logprobs_reference(a, b, targets), [h, w], TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_token_logprobs_frozen_weight(device, small_blocks):
    """A frozen LM head (a teacher, a reference policy) gets no weight gradient; hidden's still matches."""
    h, w, targets = _head(device, torch.float32)
    w = w.detach()
    _assert_match(lambda a: nk.linear_token_logprobs(a, w, targets, **CHUNKS),
                  lambda a: ops.linear_token_logprobs_reference(a, w, targets), [h], TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_topk_logprobs(device, dtype, small_blocks):
    h, w, _ = _head(device, dtype)
    h, w = h.detach(), w.detach()  # the teacher side: no gradient
    values, ids = nk.linear_topk_logprobs(h, w, 5, **CHUNKS)
    want_values, _ = ops.linear_topk_logprobs_reference(h, w, 5)
    _assert_close_normwise(values, want_values, TOL[dtype], "top-k log-probs")
    # bf16 logits tie often, and ties may come out in either order: the ids must pick the reference's values.
    full = torch.log_softmax(torch.nn.functional.linear(h, w).float(), dim=-1)
    _assert_close_normwise(full.gather(-1, ids), want_values, TOL[dtype], "log-probs at the top-k ids")
    assert all(len(set(row)) == 5 for row in ids.view(-1, 5).tolist())  # k distinct tokens per position


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_linear_cross_entropy_3b_vocab_gpu():
    """The real vocabulary (166,144) with the default chunks, bf16: loss and both gradients match the reference."""
    h, w, labels = _head("cuda", torch.bfloat16, n=(2, 256), hidden=256, vocab=166_144)
    _assert_match(lambda a, b: nk.linear_cross_entropy(a, b, labels), lambda a, b: ops.linear_cross_entropy_reference(
        a, b, labels), [h, w], TOL[torch.bfloat16])


# ----------------------------------------------------------------------------- dispatch in model/ops.py


OP_CALLS = {
    "rms_norm": lambda x: ((x, torch.ones(x.shape[-1]), 1e-5), {}),
    "swiglu": lambda x: ((x, x.flip(-1)), {}),
    "apply_rotary": lambda x: ((x[None], x[None, :2], *ops.rope_cache(x.shape[1], x.shape[2], 10000.0)), {}),
    "linear_cross_entropy": lambda x: ((x, x[0], torch.tensor([[0, 1, 2, -100]] * 3)), {}),
    "linear_token_logprobs": lambda x: ((x, x[0], torch.tensor([[0, 1, 2, 3]] * 3)), {}),
    "linear_topk_logprobs": lambda x: ((x, x[0], 2), {}),
}


@pytest.fixture
def spy(monkeypatch):
    """Stand-in kernels module that records which ops the dispatch sent to it."""
    calls = []
    fake = SimpleNamespace(INTERPRETED=True, **{name: (lambda *a, _n=name, **k: calls.append(_n) or "fused")
                                                 for name in [*OP_CALLS, "apex_rms_norm"]})
    monkeypatch.setattr(ops, "_kernels_module", lambda: fake)
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    yield calls
    ops.set_kernels("auto")


def _x():
    return torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", OP_CALLS)
def test_cpu_auto_dispatch_is_the_reference_bit_for_bit(name, spy):
    """On CPU, `auto` runs the reference arithmetic itself (torch.equal), never a kernel, even with Triton present."""
    args, kwargs = OP_CALLS[name](_x())
    got = getattr(ops, name)(*args, **kwargs)
    want = getattr(ops, f"{name}_reference")(*args, **kwargs)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert spy == []


def test_cpu_auto_never_imports_triton():
    """A CPU stage under `auto` never imports Triton or the kernels (a fresh process: this one has both)."""
    code = ("import sys, torch\nfrom model import ops\nx = torch.randn(2, 8)\n"
            "ops.rms_norm(x, torch.ones(8), 1e-5); ops.swiglu(x, x)\n"
            "ops.linear_token_logprobs(x, x, torch.zeros(2, dtype=torch.long))\n"
            "print(sorted({'triton', 'nanbeige_kernels'} & set(sys.modules)))")
    env = {k: v for k, v in os.environ.items() if k not in (ops.KERNELS_ENV, "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("name", OP_CALLS)
def test_forced_triton_dispatches_every_op(name, spy):
    ops.set_kernels("triton")
    args, kwargs = OP_CALLS[name](_x())
    assert getattr(ops, name)(*args, **kwargs) == "fused"
    assert spy == [name]


def test_per_row_rope_tables_run_the_reference_even_when_triton_is_forced(spy):
    """The RoPE kernel takes one [T, D] table; a ragged KV cache gives each row its own positions ([B, 1, T, D]
    tables), which the reference runs (the kernel would refuse the shape)."""
    ops.set_kernels("triton")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 1, 1, 8, generator=g)
    cos, sin = torch.randn(2, 1, 1, 8, generator=g), torch.randn(2, 1, 1, 8, generator=g)
    got = ops.apply_rotary(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, ops.apply_rotary_reference(q, k, cos, sin))) and spy == []


def test_env_overrides_param_and_apex_picks_apex_rms_norm(spy, monkeypatch):
    ops.set_kernels("triton")
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    args, _ = OP_CALLS["rms_norm"](_x())
    assert torch.equal(ops.rms_norm(*args), ops.rms_norm_reference(*args)) and spy == []
    monkeypatch.setenv(ops.KERNELS_ENV, "apex")
    assert ops.rms_norm(*args) == "fused" and spy == ["apex_rms_norm"]


def test_bad_backend_names_fail(monkeypatch):
    with pytest.raises(ValueError, match="model.kernels"):
        ops.set_kernels("cuda")
    monkeypatch.setenv(ops.KERNELS_ENV, "Triton")
    with pytest.raises(ValueError, match=ops.KERNELS_ENV):
        ops.kernels_backend()


def test_forced_triton_on_cpu_without_interpreter_fails_clearly(spy, monkeypatch):
    monkeypatch.setattr(ops, "_kernels_module", lambda: SimpleNamespace(INTERPRETED=False))
    ops.set_kernels("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.swiglu(_x(), _x())


@pytest.mark.parametrize("device", DEVICES)
def test_model_loss_and_grads_through_kernels(device, monkeypatch):
    """The whole decoder (RMSNorm, RoPE, SwiGLU, fused LM-head CE) through the dispatch matches the reference path."""
    cfg = ModelConfig(vocab_size=130, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=16, rope_theta=10000.0)
    torch.manual_seed(0)
    model = NanbeigeForCausalLM(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv(ops.KERNELS_ENV, backend)
        model.zero_grad()
        loss = model.loss(ids, labels)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        _assert_close_normwise(a, b, TOL[torch.float32], f"loss/gradient {i}")


# ----------------------------------------------------------------------------- NVIDIA Apex (optional)


def _has_apex() -> bool:
    return importlib.util.find_spec("apex") is not None and importlib.util.find_spec("apex.optimizers") is not None


@pytest.mark.skipif(_has_apex(), reason="Apex is installed: its GPU test covers it")
def test_apex_paths_fail_clearly_without_apex():
    from nanbeige_kernels.optim import build_fused_adam
    with pytest.raises(ImportError, match="NVIDIA Apex"):
        build_fused_adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(ImportError, match="NVIDIA Apex"):
        nk.apex_rms_norm(torch.zeros(2, 4), torch.ones(4), 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and _has_apex()), reason="needs a CUDA GPU with NVIDIA Apex")
def test_apex_fused_adam_and_rms_norm_gpu():
    """FusedAdam (AdamW mode) takes the same step as torch's AdamW; Apex's RMSNorm matches the reference."""
    from nanbeige_kernels.optim import build_fused_adam
    ours = torch.nn.Parameter(torch.randn(64, device="cuda"))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt_a = build_fused_adam([ours], lr=1e-2, weight_decay=0.1)
    opt_t = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        for p, opt in ((ours, opt_a), (theirs, opt_t)):
            (p.square().sum()).backward()
            opt.step()
            opt.zero_grad()
    _assert_close_normwise(ours.detach(), theirs.detach(), 1e-5, "FusedAdam vs AdamW")
    x = _leaf(8, 2560, device="cuda", dtype=torch.bfloat16)
    w = _leaf(2560, device="cuda", dtype=torch.bfloat16, seed=1)
    _assert_match(lambda a, b: nk.apex_rms_norm(a, b, 1e-5), lambda a, b: ops.rms_norm_reference(a, b, 1e-5),
                  [x, w], TOL[torch.bfloat16])
