"""The decoder's numeric ops, in pure PyTorch: the one seam where fused kernels plug in later.

Each function matches Hugging Face Llama's arithmetic (dtype casts included), so logits agree with
`transformers.LlamaForCausalLM` on the same weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back before the weight (as HF)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
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


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, T, D] and k [B, Hkv, T, D] by position: x*cos + rotate_half(x)*sin, cos/sin [T, D]."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over q [B, H, T, D] and k, v [B, Hkv, S, D] with S >= T; returns [B, H, T, D].

    GQA: query head h reads kv head h // (H / Hkv) (SDPA's enable_gqa, the same grouping as HF's repeat_kv).
    Causal with a KV cache (S > T): the T queries are the last T positions, so query t sees keys j <= S - T + t."""
    t, s = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if not causal or t == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # SDPA's is_causal aligns the mask top-left; a cache needs it bottom-right.
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token CE of the LM head: L = -1/|M| sum_{t in M} log softmax(hidden_t W^T)[labels_t] in fp32, over
    M = {t : labels_t != ignore_index}; hidden [..., H], weight [V, H], labels [...] already aligned to positions."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets_t) = log softmax(hidden_t W^T)[targets_t] in fp32, shape of targets: the per-token log-probs that
    SFT masking, DPO, distillation and GRPO weight themselves."""
    logits = F.linear(hidden, weight).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def linear_topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log softmax(hidden_t W^T) values per position in fp32 and their token ids ([..., k] each): what a
    teacher stores for distillation instead of the full [tokens x vocab] distribution."""
    logits = F.linear(hidden, weight).float()
    return torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
