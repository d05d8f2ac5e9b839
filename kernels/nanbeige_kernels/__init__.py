"""Fused Triton kernels for the decoder's training hot path (issue 7), each checked against its PyTorch reference
in `model/ops.py`, which is also the one place that dispatches to them.

Imported as `nanbeige_kernels` (pyproject maps it to this folder): a top-level `kernels` package of ours would
shadow Hugging Face's hub package of that name, which `transformers` probes for.
"""
from nanbeige_kernels.linear_cross_entropy import linear_cross_entropy, linear_token_logprobs, linear_topk_logprobs
from nanbeige_kernels.rms_norm import apex_rms_norm, rms_norm
from nanbeige_kernels.rope import apply_rotary
from nanbeige_kernels.swiglu import swiglu
from triton import knobs

# Kernels are decorated once, at import: with TRITON_INTERPRET=1 then, they run on CPU tensors (tests only).
INTERPRETED = bool(knobs.runtime.interpret)

__all__ = ["INTERPRETED", "apex_rms_norm", "apply_rotary", "linear_cross_entropy", "linear_token_logprobs",
           "linear_topk_logprobs", "rms_norm", "swiglu"]
