"""fp8 weight storage: ComfyUI's scaled-fp8 conventions and our own per-tensor quantisation.

ComfyUI files come in three fp8 flavours (see ComfyUI ``comfy/utils.py: convert_old_quants`` and
``comfy/ops.py``):
  * plain: weights stored as float8_e4m3fn / float8_e5m2, no scale (real = w);
  * legacy scaled: a ``scaled_fp8`` marker tensor, per layer ``<layer>.scale_weight`` (and an ignorable
    ``scale_input``), real = w · scale_weight;
  * quantisation metadata v1: ``<layer>.comfy_quant`` (uint8 JSON, e.g. {"format": "float8_e4m3fn"}) or a
    ``_quantization_metadata`` JSON in the file header, per layer ``weight_scale`` (and ``input_scale``),
    weights possibly in a uint8 container. Only the fp8 formats are read; others get a clear error.
"""

from __future__ import annotations

import json

import torch

from .errors import ZImageError
from .layers import FP8_DTYPES

FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")


def layer_formats(files, wanted: set[str] | None = None) -> dict[str, str]:
    """Layer (file key without '.weight') → quantisation format named by the file, if any.

    ``wanted`` limits which per-layer configs are read (layers we never load are not touched)."""
    out: dict[str, str] = {}
    meta = files.metadata.get("_quantization_metadata")
    if meta:
        try:
            for layer, conf in json.loads(meta).get("layers", {}).items():
                out[layer] = conf.get("format")
        except (ValueError, AttributeError):
            raise ZImageError(f"{files.path}: unreadable _quantization_metadata in the file header.") from None
    for k in files.keys():
        if k.endswith(".comfy_quant") and (wanted is None or k[: -len(".comfy_quant")] in wanted):
            try:
                conf = json.loads(files.get(k).numpy().tobytes())
            except ValueError:
                raise ZImageError(f"{files.path}: unreadable quantisation config {k}.") from None
            out[k[: -len(".comfy_quant")]] = conf.get("format")
    for layer, fmt in out.items():
        if fmt not in FP8_FORMATS and (wanted is None or layer in wanted):
            raise ZImageError(
                f"{files.path}: layer {layer} uses quantisation format {fmt!r}, which this pack does not run "
                f"(supported: bf16/fp16/fp32 and {', '.join(FP8_FORMATS)}). Use a bf16 or fp8 file instead."
            )
    return out


def scale_key(files, weight_key: str) -> str | None:
    base = weight_key[: -len(".weight")]
    for s in SCALE_SUFFIXES:
        if base + s in files:
            return base + s
    return None


def read_weight(files, key: str, formats: dict[str, str]) -> torch.Tensor:
    """The stored weight, with a uint8 fp8 container viewed as its fp8 type."""
    w = files.get(key)
    fmt = formats.get(key[: -len(".weight")])
    if fmt and w.dtype == torch.uint8:
        w = w.view(FP8_FORMATS[fmt])
    return w


def quantize_fp8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax quantisation to fp8 → (fp8 weight, fp32 scale); real ≈ weight · scale."""
    if dtype not in FP8_DTYPES:
        raise ValueError(dtype)
    if w.dtype in FP8_DTYPES:
        return w, torch.ones((), dtype=torch.float32)
    fmax = torch.finfo(dtype).max
    amax = w.abs().amax().float().clamp(min=1e-12)
    scale = amax / fmax
    q = (w.float() / scale).clamp(-fmax, fmax).to(dtype)
    return q, scale.reshape(())
