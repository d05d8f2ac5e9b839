"""The LM head fused with its log-softmax, never materializing the [tokens x vocab] logits; references are
`model.ops.linear_cross_entropy_reference`, `linear_token_logprobs_reference`, `linear_topk_logprobs_reference`.

Logits z = h W^T are computed one tile [token chunk x vocab chunk] at a time (a cuBLAS matmul in h's dtype,
as the reference's F.linear), and Triton kernels reduce each tile in fp32 with an online logsumexp:
m' = max(m, max_v z_v), s' = s exp(m - m') + sum_v exp(z_v - m'), lse = m + log s, and log p(y) = z_y - lse.
Backward recomputes each tile: dz_v = g (1[v = y] - exp(z_v - lse)) for upstream g = dL/d log p(y), then
dh += dz W_chunk and dW_chunk += dz^T h, accumulated in fp32. Extra memory: one tile, fp32 dh, one fp32 dW chunk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKEN_CHUNK = 4096
VOCAB_CHUNK = 8192
_BLOCK_V = 1024


@triton.jit
def _lse_tile(z_ptr, z_stride, n_cols, v_start, tgt_ptr, m_ptr, s_ptr, zt_ptr, BLOCK_V: tl.constexpr):
    # One program per token row of the tile: fold this tile's columns into the row's running (m, s, z_target).
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + row)
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    zt = tl.load(zt_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(z_ptr + row * z_stride + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        zt += tl.sum(tl.where(mask & (cols + v_start == tgt), z, 0.0), axis=0)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(zt_ptr + row, zt)


@triton.jit
def _grad_tile(z_ptr, z_stride, n_cols, v_start, tgt_ptr, lse_ptr, g_ptr, BLOCK_V: tl.constexpr):
    # In place: the logit tile becomes dL/dz = g (1[v = y] - softmax(z)_v), in the tile's dtype for the matmuls.
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(z_ptr + row * z_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dz = g * (tl.where(cols + v_start == tgt, 1.0, 0.0) - tl.exp(z - lse))
        tl.store(z_ptr + row * z_stride + cols, dz.to(z_ptr.dtype.element_ty), mask=mask)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _logsumexp_and_target(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, token_chunk: int,
                          vocab_chunk: int, on_tile=None) -> tuple[torch.Tensor, torch.Tensor]:
    """lse [N] and z_target [N] (0 where the target is outside [0, V)), fp32, one logit tile at a time;
    on_tile(z, vocab slice, token slice) sees each tile too (the top-k merge), so no tile is computed twice."""
    n = h.shape[0]
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
    s = torch.zeros(n, dtype=torch.float32, device=h.device)
    zt = torch.zeros(n, dtype=torch.float32, device=h.device)
    for vs in _chunks(w.shape[0], vocab_chunk):
        for ts in _chunks(n, token_chunk):
            z = h[ts] @ w[vs].T
            _lse_tile[(z.shape[0],)](z, z.stride(0), z.shape[1], vs.start, targets[ts], m[ts], s[ts], zt[ts],
                                     BLOCK_V=_BLOCK_V)
            if on_tile is not None:
                on_tile(z, vs, ts)
    return m + torch.log(s), zt


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, token_chunk, vocab_chunk):
        lse, zt = _logsumexp_and_target(h, w, targets, token_chunk, vocab_chunk)
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunks = (token_chunk, vocab_chunk)
        return zt - lse

    @staticmethod
    def backward(ctx, g):
        h, w, targets, lse = ctx.saved_tensors
        token_chunk, vocab_chunk = ctx.chunks
        g = g.float().contiguous()
        need_h, need_w = ctx.needs_input_grad[:2]
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        dw = torch.empty_like(w) if need_w else None
        # Vocab outer, tokens inner: each weight chunk's fp32 gradient is complete before the next one starts.
        for vs in _chunks(w.shape[0], vocab_chunk):
            dw_chunk = (torch.zeros((vs.stop - vs.start, w.shape[1]), dtype=torch.float32, device=w.device)
                        if need_w else None)
            for ts in _chunks(h.shape[0], token_chunk):
                dz = h[ts] @ w[vs].T
                _grad_tile[(dz.shape[0],)](dz, dz.stride(0), dz.shape[1], vs.start, targets[ts], lse[ts], g[ts],
                                           BLOCK_V=_BLOCK_V)
                if need_h:
                    dh[ts] += dz @ w[vs]
                if need_w:
                    dw_chunk += dz.T @ h[ts]
            if need_w:
                dw[vs] = dw_chunk.to(w.dtype)
        return (dh.to(h.dtype) if need_h else None), dw, None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          token_chunk: int = TOKEN_CHUNK, vocab_chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """log softmax(hidden_t W^T)[targets_t] in fp32, shape of targets; differentiable in hidden and weight."""
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    logp = _LinearTokenLogprobs.apply(h, weight.contiguous(), targets.reshape(-1).contiguous(), token_chunk,
                                      vocab_chunk)
    return logp.view(targets.shape)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         token_chunk: int = TOKEN_CHUNK, vocab_chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """L = -1/|M| sum_{t in M} log p(labels_t), M = {t : labels_t != ignore_index} (NaN when M is empty, as
    F.cross_entropy); ignored rows get target -1, which matches no column, and zero gradient."""
    keep = labels != ignore_index
    logp = linear_token_logprobs(hidden, weight, torch.where(keep, labels, -1), token_chunk, vocab_chunk)
    return -torch.where(keep, logp, 0.0).sum() / keep.sum()


@torch.no_grad()
def linear_topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, k: int, token_chunk: int = TOKEN_CHUNK,
                         vocab_chunk: int = VOCAB_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log-probs per position and their ids ([..., k] each): a running top-k of the logits, merged
    tile by tile, minus the online lse (no gradient: the teacher side of distillation)."""
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    n, vocab = h.shape[0], weight.shape[0]
    if not 0 < k <= vocab:
        raise ValueError(f"linear_topk_logprobs: k={k} must be in [1, {vocab}]")
    best = torch.full((n, k), float("-inf"), dtype=torch.float32, device=h.device)
    ids = torch.zeros((n, k), dtype=torch.long, device=h.device)

    def merge_topk(z: torch.Tensor, vs: slice, ts: slice) -> None:
        tile_best, tile_ids = z.float().topk(min(k, vs.stop - vs.start), dim=-1)
        merged, pick = torch.cat((best[ts], tile_best), -1).topk(k, dim=-1)
        ids[ts] = torch.cat((ids[ts], tile_ids + vs.start), -1).gather(-1, pick)
        best[ts] = merged

    no_target = torch.full((n,), -1, dtype=torch.long, device=h.device)
    lse, _ = _logsumexp_and_target(h, weight, no_target, token_chunk, vocab_chunk, on_tile=merge_topk)
    shape = (*hidden.shape[:-1], k)
    return (best - lse[:, None]).view(shape), ids.view(shape)
