"""fp8 compute: an e4m3 weight times e4m3 activations on the tensor cores (``torch._scaled_mm``), instead of
up-casting the weight to bf16 for every call.

Scale bookkeeping, real = fp8 · scale on both sides, the product rescaled by scale_a · scale_b:
* weight: the file's per-tensor ``weight_scale`` (or a per-row column when separately scaled q/k/v were fused);
* activations: with a calibrated ``input_scale`` in the file, ComfyUI's TensorCoreFP8 convention (x / scale
  clamped to ±448, one scale per tensor; ComfyUI ``comfy/quant_ops.py`` ``_TensorCoreFP8LayoutBase.quantize``,
  comfy-kitchen ``quantize_per_tensor_fp8``); without one, one scale per token row (amax / 448). ComfyUI's own
  default without ``input_scale`` is scale 1, which clips every activation beyond ±448: Z-Image's feed-forward
  inputs go well past that, so we scale per row instead, which also keeps small rows precise.
Row-wise scales need per-row weight scales as a 1×N row, so a per-tensor weight scale is expanded.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def device_supports_fp8(device: torch.device | str) -> bool:
    """fp8 tensor cores: NVIDIA compute capability 8.9 (Ada) and later."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def can_use(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """_scaled_mm's shape and dtype rules: e4m3 weight, bf16 output, K and N multiples of 16."""
    if not isinstance(weight, torch.Tensor) or weight.dtype != FP8:
        return False
    n, k = weight.shape
    return x.dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M×K activations → (e4m3 M×K, fp32 M×1 scales); an all-zero row gets scale 1."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_static(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's per-tensor activation quantisation with a calibrated scale (values beyond it clip)."""
    s = input_scale.to(device=x.device, dtype=torch.float32).reshape(())
    q = (x * (1.0 / s).to(x.dtype)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, s


def weight_scales(weight_scale: torch.Tensor | None, n: int, device, rowwise: bool) -> torch.Tensor:
    """The weight's scale as _scaled_mm wants it: a scalar, or a 1×N row for row-wise scaling."""
    s = torch.ones((), device=device) if weight_scale is None else weight_scale.to(device=device, dtype=torch.float32)
    if not rowwise:
        return s.reshape(())
    return s.reshape(-1, 1).expand(n, 1).reshape(1, n).contiguous()


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ (weight · weight_scale)ᵀ + bias with fp8 operands; x in bf16 (any leading dims), result in bf16."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    per_row_weight = weight_scale is not None and weight_scale.numel() > 1
    if input_scale is not None and not per_row_weight:
        q, sa = quantize_static(x2, input_scale)
        sb = weight_scales(weight_scale, n, x.device, rowwise=False)
    else:
        q, sa = quantize_rows(x2) if input_scale is None else quantize_static(x2, input_scale)
        sa = sa.reshape(-1, 1).expand(x2.shape[0], 1).contiguous()
        sb = weight_scales(weight_scale, n, x.device, rowwise=True)
    y = torch._scaled_mm(q, weight.t(), scale_a=sa, scale_b=sb, out_dtype=x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)
