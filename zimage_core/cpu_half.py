"""Half precision on CPUs that only emulate it.

Without AVX-512 (with BF16/FP16) or AMX, PyTorch's CPU GEMM and attention kernels convert bf16/fp16 operands in their
inner loops and run several times slower than in fp32 (AVX2 EPYC, 2 threads, 1152×1024 by 1024×3072: bf16 1.0 s,
fp32 0.13 s). Half-precision values are exact in fp32 and those kernels accumulate in fp32 anyway, so multiplying
in fp32 and rounding the result once gives the same products and the same accuracy, faster.
"""

from __future__ import annotations

import torch


def _native(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs ``dtype`` GEMMs natively on this CPU (its own check, as PyTorch's CPU kernels use)."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without oneDNN: keep PyTorch's own kernels
        return True


EMULATED: frozenset = frozenset(d for d in (torch.bfloat16, torch.float16) if not _native(d))


def upcast(x: torch.Tensor) -> bool:
    """Whether products with ``x`` should run in fp32: a half dtype on a CPU that only emulates it."""
    return x.device.type == "cpu" and x.dtype in EMULATED
