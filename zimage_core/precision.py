"""Compute precision per device, and fp16 that works on Z-Image.

GPUs without bf16 (GTX 10xx/16xx, RTX 20xx) must run in fp16, but Z-Image's attention and feed-forward
outputs can pass fp16's 65504 (and the SwiGLU product silu(w1 x)·w3 x before them). ComfyUI clamps those
outputs to ±65504 (``clamp_fp16`` in ComfyUI ``comfy/ldm/lumina/model.py``), which changes the values that
overflowed. Both sublayers end in a bias-free linear followed by an RMSNorm, and RMSNorm does not care about
scale: so in fp16 we feed the last linear ``2^-FP16_SHIFT`` times its input (the output shrinks by the same
power of two, exactly) and normalise with eps scaled by the square of it — the same result as fp32 up to
fp16 rounding, where clamping would flatten the largest values. The clamp stays behind it as a safety net.
"""

from __future__ import annotations

import torch

from .layers import RMSNorm, rms_norm

FP16_MAX = 65504.0
FP16_SHIFT = 6  # outputs up to 65504·64 ≈ 4.2e6 stay finite; values under 2^-8 lose fp16 precision first


def sublayer_scale(dtype: torch.dtype) -> float:
    """Factor for the input of a sublayer's last linear: 2^-FP16_SHIFT in fp16, 1 otherwise."""
    return 2.0**-FP16_SHIFT if dtype == torch.float16 else 1.0


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's clamp_fp16: inf → ±65504, NaN → 0, in fp16 only."""
    if x.dtype == torch.float16:
        return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)
    return x


def bf16_supported(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type in ("cpu", "xpu", "mps")


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """The transformer/text-encoder compute dtype ``auto`` picks: fp32 on the CPU, bf16 on GPUs that have it,
    fp16 on those that do not."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def vae_dtype(device: torch.device | str) -> torch.dtype:
    """The FLUX autoencoder overflows fp16 (ComfyUI's working dtypes for it are bf16 and fp32, comfy/sd.py):
    bf16 where supported, else fp32."""
    device = torch.device(device)
    return torch.bfloat16 if device.type != "cpu" and bf16_supported(device) else torch.float32


def post_norm(norm: RMSNorm, y: torch.Tensor, scale: float) -> torch.Tensor:
    """``norm(y / scale)`` for a sublayer output ``y`` computed ``scale`` times its size: eps · scale² makes it
    exact (powers of two); a value that still overflowed is clamped as ComfyUI does."""
    if scale == 1.0 and y.dtype != torch.float16:
        return norm(y)
    return rms_norm(clamp_fp16(y), norm.weight, norm.eps * scale * scale)
