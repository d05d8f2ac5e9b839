"""RMSNorm in Triton, forward and backward; the reference is `model.ops.rms_norm_reference`.

Forward, per row x of length D: r = 1 / sqrt(mean(x^2) + eps), n = x * r (fp32, rounded to x's dtype as HF does),
y = w * n. Backward with upstream g: dn = g * w, dx = r * (dn - n * mean(dn * n)), dw = sum_rows g * n.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # Round the normalized row to x's dtype before the weight, as the reference (and HF) does.
    n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (w * n).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd(g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols, BLOCK: tl.constexpr):
    # A persistent program walks rows pid, pid + P, ...; it keeps its own dw partial sum so no atomics are needed.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(pid, n_rows, n_programs):
        offs = tl.cast(row, tl.int64) * n_cols + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        dn = g * w
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += g * n.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


def persistent_programs(n_rows: int, device: torch.device) -> int:
    """Programs for a row-walking kernel: a few per SM on CUDA (enough to fill it), a handful in the interpreter."""
    if device.type == "cuda":
        return min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty(x2.shape, dtype=torch.result_type(x, weight), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        _rms_norm_fwd[(n_rows,)](x2, weight, y, rstd, n_cols, eps, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        g2 = g.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        programs = persistent_programs(n_rows, x2.device)
        dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd[(programs,)](g2, x2, weight, rstd, dx, dw_partial, n_rows, n_cols,
                                   BLOCK=triton.next_power_of_2(n_cols))
        return dx.view(g.shape), dw_partial.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * x / sqrt(mean(x^2) + eps) over the last dim, fused in one Triton pass (forward) and one (backward)."""
    return _RMSNorm.apply(x, weight, eps)


def apex_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """NVIDIA Apex's fused RMSNorm (CUDA), the same formula; needs Apex built from github.com/NVIDIA/apex."""
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError as e:
        raise ImportError("kernels=apex needs NVIDIA Apex (built from source, not the unrelated PyPI 'apex')") from e
    return fused_rms_norm_affine(x, weight, weight.shape, eps)
