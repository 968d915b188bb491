"""int8 compute for ComfyUI's ``int8_tensorwise`` weights (with or without ConvRot): int8 activations times the
stored int8 weight on the integer tensor cores (``torch._int_mm``), instead of expanding the weight for every call.

The arithmetic is ComfyUI's own (comfy-kitchen ``backends/eager/quantization.py``: ``int8_linear``,
``quantize_int8_rowwise``, ``_round_int8``, ``_int8_matmul_accumulate``; ``backends/eager/convrot_w4a4.py``:
``_rotate_activation``): activations rotated by the grouped Hadamard the weight's columns were rotated with
(ConvRot), quantised per row (scale = amax / 127, round half to even, clamp to [-128, 127]), multiplied with int32
accumulation, and rescaled by row scale × weight scale.
"""

from __future__ import annotations

import torch

from .packed import Packed
from .quant_formats import convrot_group, hadamard


def device_supports_int8(device: torch.device | str) -> bool:
    """int8 tensor cores: NVIDIA compute capability 7.5 (Turing) and later (comfy-kitchen's MIN_SM_VERSION)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (7, 5)


def int8_parts(weight) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """A packed ``int8_tensorwise`` weight's int8 rows [N, K], its scale (scalar or per row) and ConvRot group
    (0: not rotated); None for any other weight (those expand as usual)."""
    fmt = getattr(weight, "fmt", None) if isinstance(weight, Packed) else None
    if getattr(fmt, "name", None) != "int8_tensorwise" or "pre_quant_scale" in weight.tensors:
        return None
    data = weight.tensors[""]
    if tuple(data.shape) != tuple(weight.shape):  # padded storage: let dequantize cut it
        return None
    conf = fmt.conf
    rotated = conf.get("convrot", (conf.get("params") or {}).get("convrot", False))
    return data.view(torch.int8), weight.tensors["_scale"], convrot_group(conf) if rotated else 0


def can_use(weight, x: torch.Tensor) -> bool:
    parts = int8_parts(weight)
    return parts is not None and x.dtype in (torch.bfloat16, torch.float16) and (
        not parts[2] or x.shape[-1] % parts[2] == 0)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M×K activations → (int8 M×K, fp32 M×1 scales), ComfyUI's rounding (the division in x's dtype)."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127.0).clamp(min=1e-30)
    s = scale.to(x.dtype)
    s = torch.where(s == 0, torch.full_like(s, torch.finfo(x.dtype).tiny), s)
    return (x / s).round_().clamp_(-128.0, 127.0).to(torch.int8), scale


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] × int8 [K, N] → int32 [M, N]; on CUDA padded to cuBLASLt's shape rules (M ≥ 32 and a multiple
    of 32, K and N multiples of 8) and cut back."""
    m, k = a.shape
    n = b.shape[1]
    if a.is_cuda:
        pm, pk, pn = max(32, -(-m // 32) * 32), -(-k // 8) * 8, -(-n // 8) * 8
        if (pm, pk) != (m, k):
            a = torch.nn.functional.pad(a, (0, pk - k, 0, pm - m))
        if (pk, pn) != (k, n):
            b = torch.nn.functional.pad(b, (0, pn - n, 0, pk - k))
    return torch._int_mm(a, b)[:m, :n]


def int8_linear(x: torch.Tensor, weight: Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ Wᵀ + bias with int8 operands for a packed int8_tensorwise ``weight``; the result in x's dtype."""
    data, w_scale, group = int8_parts(weight)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if group:
        h = hadamard(group, x.device, x.dtype)
        x2 = torch.matmul(x2.reshape(-1, k // group, group), h).reshape(-1, k)
    q, x_scale = quantize_rows(x2)
    acc = int_mm(q, data.t())
    y = (acc.float() * (x_scale * w_scale.to(device=x.device, dtype=torch.float32).reshape(1, -1))).to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], data.shape[0])
