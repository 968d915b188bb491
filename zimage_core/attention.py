"""Attention and rotary position embedding: the one place where attention kernels are chosen.

``attention(q, k, v, mask)`` takes B×H×S×D tensors and an optional boolean key mask B×S (True = attend);
k and v may have fewer heads (grouped-query attention).
Backends: ``sdpa`` (PyTorch scaled_dot_product_attention, the default, any device), ``flash``
(flash-attn 2/3 if installed, CUDA fp16/bf16) and ``sage`` (SageAttention if installed, CUDA). A
backend that cannot serve a call (masked batch, fp32, CPU) falls back to SDPA, so results never
depend on what is installed beyond rounding.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import cpu_half
from .errors import ZImageError


def _sdpa(q, k, v, mask, causal=False):
    if cpu_half.upcast(q):  # same math in fp32 kernels, result rounded once (cpu_half.py)
        return _sdpa(q.float(), k.float(), v.float(), mask, causal).to(q.dtype)
    m = None if mask is None else mask[:, None, None, :]
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal and m is None, enable_gqa=gqa)


def _fast_ok(q, mask) -> bool:
    return mask is None and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)


def _flash(q, k, v, mask, causal=False):
    if not _fast_ok(q, mask):
        return _sdpa(q, k, v, mask, causal)
    try:
        from flash_attn_interface import flash_attn_func  # FA3 (Hopper)
    except ImportError:
        from flash_attn import flash_attn_func
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def _sage(q, k, v, mask, causal=False):
    if not _fast_ok(q, mask) or k.shape[1] != q.shape[1]:
        return _sdpa(q, k, v, mask, causal)
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=causal)


BACKENDS: dict[str, tuple[Callable, str | None]] = {
    "sdpa": (_sdpa, None),
    "flash": (_flash, "flash_attn"),
    "sage": (_sage, "sageattention"),
}


def available_backends() -> list[str]:
    out = []
    for name, (_, module) in BACKENDS.items():
        if module is None or importlib.util.find_spec(module) is not None or (
            name == "flash" and importlib.util.find_spec("flash_attn_interface") is not None
        ):
            out.append(name)
    return out


def resolve_backend(name: str | None) -> str:
    name = (name or "sdpa").lower()
    if name == "auto":
        avail = available_backends()
        return "sage" if "sage" in avail else "flash" if "flash" in avail else "sdpa"
    if name not in BACKENDS:
        raise ZImageError(f"Unknown attention backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}.")
    if name not in available_backends():
        raise ZImageError(
            f"Attention backend {name!r} needs the Python package {BACKENDS[name][1]!r}, which is not installed "
            "in this environment. Install it, or choose 'sdpa'."
        )
    return name


def attention(q, k, v, mask: torch.Tensor | None, backend: str = "sdpa", causal: bool = False) -> torch.Tensor:
    """B×H×S×D attention; k/v may have fewer heads (grouped-query); ``causal`` for the text encoder."""
    return BACKENDS[backend][0](q, k, v, mask, causal)


# ---- rotary position embedding --------------------------------------------------------------------


def rope_angles(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float, dtype: torch.dtype) -> torch.Tensor:
    """Angles for position ids (… × n_axes, integer) → … × (head_dim/2).

    Frequencies and the products are formed in float64 and rounded once, exactly as the reference
    builds its table, so any position (no table length limit) gives the reference's value.
    """
    parts = []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d))
        parts.append(ids[..., i].to(torch.float64)[..., None] * freqs)
    ang = torch.cat(parts, dim=-1)
    return ang if dtype == torch.float64 else ang.float()


def rope_freqs(angles: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers e^{iθ} (complex64, or complex128 for float64 angles)."""
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, real: bool | None = None) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as complex numbers; x is B×S×H×D, freqs B×S×1×D/2 complex.

    ``real`` (default: when compiling for CUDA) spells the product out with cos and sin: inductor generates no
    code for complex numbers, and this way fuses the rotation with the norm before it into one kernel. (Under
    CPU inductor the complex form measured faster, so it stays there.)
    """
    dtype = x.dtype
    if real if real is not None else x.is_cuda and torch.compiler.is_compiling():
        cs = torch.view_as_real(freqs)  # fp32 (fp64 for a complex128 table), as below
        cos, sin = cs[..., 0], cs[..., 1]
        xe, xo = x.to(cs.dtype).unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([xe * cos - xo * sin, xe * sin + xo * cos], -1).flatten(-2).to(dtype)
    xc = torch.view_as_complex(x.to(torch.float64 if freqs.dtype == torch.complex128 else torch.float32).unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2).to(dtype)
