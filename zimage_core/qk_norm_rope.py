"""q and k of an attention layer from the fused projection: per-head RMSNorm, then RoPE.

Eager on a GPU the plain path is several memory passes over q and k (the norm, an fp32 copy, the complex
product, the cast back); one Triton kernel reads both straight from the B×S×3×H×D projection output, normalises
each head row in fp32, rotates it and rounds once, in a single launch. It runs where Triton compiles it (CUDA,
fp16/bf16, head dim a power of two) or under ``TRITON_INTERPRET=1`` (CPU tests); under ``torch.compile`` the
plain path is traced (on CUDA with ``apply_rope``'s real arithmetic) so that inductor fuses it into one kernel itself.
Everything else (fp32, fp64, no Triton) is the plain path.
The norm weight is taken as stored (fp32 in the kernel, not rounded to the activation dtype first as
``layers.rms_norm`` does): identical for bf16 checkpoints, closer to float64 for fp32 ones.
``ZIMAGE_FUSED_ROPE=0`` (read at import) or ``qk_norm_rope.ENABLED = False`` turns the kernel off, for A/B runs.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .attention import apply_rope

ENABLED = os.environ.get("ZIMAGE_FUSED_ROPE", "1") != "0"
tl = None  # triton.language, bound on first use (_kernel)


def _kernel_source(qkv, out, wq, wk, cs, S, H, sb, ss, st, sh, cb, cn, eps, D: tl.constexpr, BH: tl.constexpr):
    """One token of q (axis 1 = 0) or k (= 1): all its heads, rows of D read and written whole (vector accesses)."""
    row, which = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, s = row // S, row % S
    h, j = tl.arange(0, BH)[:, None], tl.arange(0, D)[None, :]
    x = tl.load(qkv + b * sb + s * ss + which * st + h * sh + j, mask=h < H, other=0.0).to(tl.float32)
    w = tl.load(wq + j).to(tl.float32) if which == 0 else tl.load(wk + j).to(tl.float32)  # as stored (may differ)
    x = x * tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None] * w
    xe, xo = tl.split(tl.reshape(x, (BH, D // 2, 2)))  # the interleaved pairs (x[2i], x[2i+1])
    cos, sin = tl.split(tl.load(cs + b * cb + s * cn + tl.arange(0, D)).reshape(D // 2, 2))
    y = tl.interleave(xe * cos[None] - xo * sin[None], xe * sin[None] + xo * cos[None])
    tl.store(out + ((which * tl.num_programs(0) + row) * H + h) * D + j, y.to(out.dtype.element_ty), mask=h < H)


@functools.cache
def _kernel(interpret: bool = False):  # noqa: ARG001 (a cache key: triton.jit reads TRITON_INTERPRET itself)
    """The jitted kernel, one for Triton's interpreter and one compiled, or None where Triton does not import
    (imported on first use, never at package import)."""
    global tl
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton.jit(_kernel_source)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_ok(qkv: torch.Tensor, q_norm, k_norm, rope: torch.Tensor) -> bool:
    """Whether the kernel serves this call (checked per call; cheap)."""
    if torch.compiler.is_compiling() or not ENABLED or qkv.dtype not in (torch.float16, torch.bfloat16):
        return False
    d = qkv.shape[-1]
    return (
        (qkv.is_cuda or _interpreting()) and d & (d - 1) == 0 and qkv.stride(-1) == 1
        and rope.dtype == torch.complex64 and rope.stride(-1) == 1 and q_norm.eps == k_norm.eps
        and all(w.device == qkv.device and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for w in (q_norm.weight, k_norm.weight))
        and _kernel(_interpreting()) is not None
    )


def fused_qk_norm_rope(qkv, wq, wk, eps: float, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel: qkv B×S×3×H×D (any strides, last dim contiguous), rope B×S×1×D/2 complex64 → q, k B×S×H×D."""
    b, s, _, h, d = qkv.shape
    out = torch.empty(2, b, s, h, d, device=qkv.device, dtype=qkv.dtype)
    cs = torch.view_as_real(rope.expand(b, s, 1, d // 2))  # cos, sin pairs in fp32: a view of the table, no copy
    _kernel(_interpreting())[(b * s, 2)](qkv, out, wq, wk, cs, s, h, *qkv.stride()[:4], cs.stride(0), cs.stride(1), eps,
                                         D=d, BH=1 << (h - 1).bit_length(), num_warps=4, enable_fp_fusion=True)
    return out[0], out[1]


def qk_norm_rope(qkv: torch.Tensor, q_norm, k_norm, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (B×S×H×D) from the fused projection's B×S×3×H×D output: ``apply_rope(norm(·), rope)`` each."""
    global ENABLED
    if fused_ok(qkv, q_norm, k_norm, rope):
        try:
            return fused_qk_norm_rope(qkv, q_norm.weight, k_norm.weight, q_norm.eps, rope)
        except Exception as e:  # a Triton that cannot build it (too old, an unusual GPU): the plain path from now on
            if qkv.is_cuda and torch.cuda.is_current_stream_capturing():
                raise  # inside a CUDA graph capture the error is the capture's (cuda_graphs.py), not the kernel's
            ENABLED = False
            warnings.warn(f"Z-Image: the fused q/k norm + RoPE kernel failed ({type(e).__name__}: {e}); using the "
                          "plain path (same results, slower).", stacklevel=2)
    return apply_rope(q_norm(qkv[:, :, 0]), rope), apply_rope(k_norm(qkv[:, :, 1]), rope)
