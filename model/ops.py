"""The decoder's numeric ops: the one seam where the fused kernels (kernels/, imported as `nanbeige_kernels`) plug in.

Each `*_reference` function is pure PyTorch and matches Hugging Face Llama's arithmetic (dtype casts included), so
logits agree with `transformers.LlamaForCausalLM` on the same weights. The public op of the same name without the
suffix dispatches: the Triton kernel when its tensors are on CUDA and Triton imports, the reference otherwise.
`set_kernels` (params.yaml `model.kernels`) or the env var NANBEIGE_KERNELS (which wins) forces a backend:
auto | triton | torch | apex (Apex's fused RMSNorm, Triton for the rest). CPU tensors never reach a kernel unless
"triton" is forced and the kernels were imported under Triton's interpreter (the kernel tests).
"""
from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
import torch.nn.functional as F

KERNELS_ENV = "NANBEIGE_KERNELS"
KERNEL_BACKENDS = ("auto", "triton", "torch", "apex")
_backend = "auto"


def set_kernels(backend: str) -> None:
    """Choose the ops' backend for this process (params.yaml `model.kernels`); NANBEIGE_KERNELS overrides it."""
    global _backend
    _backend = _checked_backend(backend, "model.kernels")


def kernels_backend() -> str:
    """The backend in force: NANBEIGE_KERNELS if set, else the last set_kernels (default auto)."""
    env = os.environ.get(KERNELS_ENV)
    return _checked_backend(env, KERNELS_ENV) if env else _backend


def _checked_backend(backend: str, source: str) -> str:
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"{source}={backend!r}: expected one of {KERNEL_BACKENDS}")
    return backend


@functools.cache
def _kernels_module() -> ModuleType | None:
    try:
        import nanbeige_kernels
    except ImportError:  # no Triton in this environment (CPU-only installs without the dev extra)
        return None
    return nanbeige_kernels


def _fused(*tensors: torch.Tensor) -> ModuleType | None:
    """The kernels module if this call runs fused kernels, else None (run the reference)."""
    backend = kernels_backend()
    if backend == "torch":
        return None
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto" and not on_cuda:
        return None  # before importing Triton: CPU runs never pay for it
    kernels = _kernels_module()
    if backend == "auto":
        return kernels
    if kernels is None:
        raise RuntimeError(f"kernels={backend!r} needs Triton, which does not import here")
    if not on_cuda and not kernels.INTERPRETED:
        raise RuntimeError(f"kernels={backend!r} on {tensors[0].device} tensors: Triton needs CUDA "
                           f"(or TRITON_INTERPRET=1 before nanbeige_kernels is first imported)")
    return kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (formula at rms_norm_reference), dispatched."""
    kernels = _fused(x, weight)
    if kernels is None:
        return rms_norm_reference(x, weight, eps)
    return (kernels.apex_rms_norm if kernels_backend() == "apex" else kernels.rms_norm)(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (formula at swiglu_reference), dispatched."""
    kernels = _fused(gate, up)
    return swiglu_reference(gate, up) if kernels is None else kernels.swiglu(gate, up)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k (formula at apply_rotary_reference), dispatched. The kernel takes one position table
    cos/sin [T, D] shared by every row; per-row positions (cos/sin [B, 1, T, D]: a ragged KV cache, packed rows)
    run the reference."""
    kernels = _fused(q, k, cos, sin) if cos.dim() == 2 else None
    return apply_rotary_reference(q, k, cos, sin) if kernels is None else kernels.apply_rotary(q, k, cos, sin)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """The LM head's mean CE (formula at linear_cross_entropy_reference), dispatched; the kernel never
    materializes the [tokens x vocab] logits."""
    kernels = _fused(hidden, weight, labels)
    if kernels is None:
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index)
    return kernels.linear_cross_entropy(hidden, weight, labels, ignore_index)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of targets (formula at linear_token_logprobs_reference), dispatched."""
    kernels = _fused(hidden, weight, targets)
    if kernels is None:
        return linear_token_logprobs_reference(hidden, weight, targets)
    return kernels.linear_token_logprobs(hidden, weight, targets)


def linear_topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs and ids per position (formula at linear_topk_logprobs_reference), dispatched."""
    kernels = _fused(hidden, weight)
    if kernels is None:
        return linear_topk_logprobs_reference(hidden, weight, k)
    return kernels.linear_topk_logprobs(hidden, weight, k)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back before the weight (as HF)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up, with silu(g) = g * sigmoid(g); down_proj follows outside."""
    return F.silu(gate) * up


def rope_cache(seq_len: int, head_dim: int, theta: float, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [seq_len, head_dim] for RoPE in the rotate_half layout.

    inv_freq_i = theta^(-2i/head_dim), angle[p, i] = p * inv_freq_i, duplicated over both halves of head_dim.
    Angles are computed in fp32 (inv_freq on CPU, as HF does) and cast to `dtype` last."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    positions = torch.arange(seq_len, dtype=torch.float, device=device)
    freqs = positions[:, None] * inv_freq.to(device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, T, D] and k [B, Hkv, T, D] by position: x*cos + rotate_half(x)*sin, cos/sin [T, D]."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over q [B, H, T, D] and k, v [B, Hkv, S, D] with S >= T; returns [B, H, T, D].

    GQA: query head h reads kv head h // (H / Hkv) (SDPA's enable_gqa, the same grouping as HF's repeat_kv).
    Causal with a KV cache (S > T): the T queries are the last T positions, so query t sees keys j <= S - T + t.
    mask (bool, broadcast to [B, H, T, S], True where query t may read key s) replaces `causal` when given: a ragged
    batch's mask folds causality and padding together (KVCache.begin)."""
    t, s = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if not causal or t == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # SDPA's is_causal aligns the mask top-left; a cache needs it bottom-right.
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token CE of the LM head: L = -1/|M| sum_{t in M} log softmax(hidden_t W^T)[labels_t] in fp32, over
    M = {t : labels_t != ignore_index}; hidden [..., H], weight [V, H], labels [...] already aligned to positions."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)


def linear_token_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                    targets: torch.Tensor) -> torch.Tensor:
    """log p(targets_t) = log softmax(hidden_t W^T)[targets_t] in fp32, shape of targets: the per-token log-probs that
    SFT masking, DPO, distillation and GRPO weight themselves."""
    logits = F.linear(hidden, weight).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def linear_topk_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log softmax(hidden_t W^T) values per position in fp32 and their token ids ([..., k] each): what a
    teacher stores for distillation instead of the full [tokens x vocab] distribution."""
    logits = F.linear(hidden, weight).float()
    return torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
