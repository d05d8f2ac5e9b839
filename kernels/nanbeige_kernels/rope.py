"""RoPE on q and k in one Triton pass (rotate_half layout), forward and backward; the reference is
`model.ops.apply_rotary_reference`.

With x = [x1, x2] split in halves of head_dim and cos = [c1, c2], sin = [s1, s2] likewise:
forward  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2   (x cos + rotate_half(x) sin);
backward dx1 = g1 c1 + g2 s2,  dx2 = g2 c2 - g1 s1  (the transpose: the same kernel with (s1, s2) -> (-s2, -s1)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, y_ptr, b, t, n_heads, sxb, sxh, sxt, syb, syh, syt, c1, c2, s1, s2, half,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (cols < half)
    x_row = x_ptr + b * sxb + t * sxt + heads * sxh + cols
    y_row = y_ptr + b * syb + t * syt + heads * syh + cols
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_row, (x1 * c1 - x2 * s1).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + half, (x2 * c2 + x1 * s2).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, seq_len, n_q_heads, n_k_heads, half,
             sqb, sqh, sqt, skb, skh, skt, sqob, sqoh, sqot, skob, skoh, skot,
             BACKWARD: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (batch, position): the cos/sin row is read once for every q and k head.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    cols = tl.arange(0, BLOCK_D)[None, :]
    cmask = cols < half
    table = t * 2 * half + cols
    c1 = tl.load(cos_ptr + table, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + table + half, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + table, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + table + half, mask=cmask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    _rotate_heads(q_ptr, qo_ptr, b, t, n_q_heads, sqb, sqh, sqt, sqob, sqoh, sqot, c1, c2, s1, s2, half,
                  BLOCK_QH, BLOCK_D)
    _rotate_heads(k_ptr, ko_ptr, b, t, n_k_heads, skb, skh, skt, skob, skoh, skot, c1, c2, s1, s2, half,
                  BLOCK_KH, BLOCK_D)


def _rope_launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Head dim must be unit-stride; [B, H, T, D] views of a [B, T, H*D] projection already are.
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    bsz, n_q, seq_len, dim = q.shape
    n_k = k.shape[1]
    _rope_qk[(bsz * seq_len,)](
        q, k, qo, ko, cos, sin, seq_len, n_q, n_k, dim // 2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        BACKWARD=backward, BLOCK_QH=triton.next_power_of_2(n_q), BLOCK_KH=triton.next_power_of_2(n_k),
        BLOCK_D=triton.next_power_of_2(dim // 2))
    return qo, ko


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(gq, gk, cos, sin, backward=True)
        return dq, dk, None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, T, D] and k [B, Hkv, T, D] by cos/sin [T, D] in one launch; cos/sin take q's dtype first
    (as the reference does), so the tables' rounding matches; no gradient flows into the tables."""
    if q.shape[-1] % 2 or cos.shape != (q.shape[2], q.shape[3]) or sin.shape != cos.shape:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)} needs cos/sin [T, D] with D even, got {tuple(cos.shape)}")
    cos = cos.to(q.dtype).contiguous()
    sin = sin.to(q.dtype).contiguous()
    return _RoPE.apply(q, k, cos, sin)
