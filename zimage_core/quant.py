"""ComfyUI's quantized weight files (fp8 and the packed formats) and our own per-tensor fp8 quantisation.

ComfyUI files come in three fp8 flavours (see ComfyUI ``comfy/utils.py: convert_old_quants`` and
``comfy/ops.py``):
  * plain: weights stored as float8_e4m3fn / float8_e5m2, no scale (real = w);
  * legacy scaled: a ``scaled_fp8`` marker tensor, per layer ``<layer>.scale_weight`` (and an ignorable
    ``scale_input``), real = w · scale_weight;
  * quantisation metadata v1: ``<layer>.comfy_quant`` (uint8 JSON, e.g. {"format": "float8_e4m3fn"}) or a
    ``_quantization_metadata`` JSON in the file header, per layer ``weight_scale`` (and ``input_scale``),
    weights possibly in a uint8 container. The block and integer formats of the same scheme (mxfp8, nvfp4,
    int8_tensorwise, convrot_w4a4, asym_w4a8_int8; quant_formats.py) are read as ``Packed`` weights through
    ``QuantizedView``; "mixed" files quantise only some layers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from .errors import ZImageError
from .layers import FP8_DTYPES
from .packed import Packed
from .quant_formats import EXTRA_KEYS, FORMAT_KEYS, dequantize, layout_problem, logical_shape, read_config

FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
PACKED_FORMATS = set(FORMAT_KEYS) - set(FP8_FORMATS)


def layer_configs(files, wanted: set[str] | None = None, check: bool = True) -> dict[str, dict]:
    """Layer (file key without '.weight') → its ``comfy_quant`` config (``{"format": …, …}``), from the per-layer
    tensors or the ``_quantization_metadata`` header. ``wanted`` limits which layers are read and (``check``)
    refused when their format is unknown."""
    out: dict[str, dict] = {}
    meta = files.metadata.get("_quantization_metadata")
    if meta:
        try:
            out.update({layer: conf for layer, conf in json.loads(meta).get("layers", {}).items()})
        except (ValueError, AttributeError, TypeError, RecursionError):
            raise ZImageError(f"{files.path}: unreadable _quantization_metadata in the file header.") from None
    for k in files.keys():
        if k.endswith(".comfy_quant") and (wanted is None or k[: -len(".comfy_quant")] in wanted):
            try:
                if files.nbytes(k) > 65536 or files.dtype(k) != torch.uint8:
                    raise ValueError("not a small uint8 JSON blob")
                out[k[: -len(".comfy_quant")]] = read_config(files.get(k))
            except (ValueError, RecursionError):
                raise ZImageError(f"{files.path}: unreadable quantisation config {k}.") from None
    for layer, conf in out.items():
        if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
            raise ZImageError(f"{files.path}: the quantisation config of layer {layer} is not a {{\"format\": …}} "
                              "object; the file is damaged or hand-edited. Download it again.")
        if check and conf.get("format") not in FORMAT_KEYS and (wanted is None or layer in wanted):
            raise ZImageError(
                f"{files.path}: layer {layer} uses quantisation format {conf.get('format')!r}, which this pack does not "
                f"run (supported: bf16/fp16/fp32 and ComfyUI's {', '.join(FORMAT_KEYS)}). Use a bf16 or fp8 file instead."
            )
    return out


def layer_formats(files, wanted: set[str] | None = None) -> dict[str, str]:
    """Layer → quantisation format name (see ``layer_configs``)."""
    return {layer: conf.get("format") for layer, conf in layer_configs(files, wanted).items()}


@dataclass(frozen=True)
class ComfyFormat:
    """A ComfyUI block/integer format as a ``packed.Format``: the layer's stored tensors (keyed by weight-key
    suffix, see quant_formats.FORMAT_KEYS) expand to the dense weight; padding is cut to the weight's shape and an
    AWQ ``pre_quant_scale`` (ComfyUI multiplies the input by it) is folded into the columns."""

    name: str
    config: str  # the layer's comfy_quant JSON (a string keeps the format hashable)

    @property
    def rowwise(self) -> bool:  # int8 and ConvRot W4A4 keep only per-row (or scalar) data
        return self.name in ("int8_tensorwise", "convrot_w4a4")

    @functools.cached_property
    def conf(self) -> dict:
        return json.loads(self.config)

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        w = dequantize(self.name, tensors, self.conf, dtype)[: shape[0], : shape[1]]
        pre = tensors.get("pre_quant_scale")
        return w if pre is None else w * pre.to(device=w.device, dtype=dtype)


class QuantizedView:
    """A ``WeightFiles`` in which every layer stored in one of ComfyUI's packed formats (mxfp8, nvfp4, int8,
    ConvRot, W4A8) reads as one ``<layer>.weight`` key: its dense shape, and a ``Packed`` of all its tensors.
    Their scale and config keys disappear from ``keys()``; fp8 layers and plain tensors pass through."""

    def __init__(self, files, configs: dict[str, dict]):
        self.files = files
        self.packed = {layer: conf for layer, conf in configs.items()
                       if conf.get("format") in PACKED_FORMATS and layer + ".weight" in files}
        self.parts = {layer + ".weight": [layer + ".weight" + s for s in FORMAT_KEYS[c["format"]] if layer + ".weight" + s in files]
                      + [layer + "." + e for e in EXTRA_KEYS if layer + "." + e in files] for layer, c in self.packed.items()}
        self.hidden = {k for ks in self.parts.values() for k in ks[1:]} | {layer + ".comfy_quant" for layer in self.packed}
        for layer, conf in self.packed.items():
            names = self._names(layer + ".weight")
            problem = layout_problem(conf["format"], {n: (files.shape(k), files.dtype(k).itemsize) for n, k in names.items()},
                                     conf)
            if problem:
                raise ZImageError(f"{files.path}: layer {layer} ({conf['format']}) {problem}; the file is damaged or was "
                                  "written by a quantizer this pack does not know. Download it again.")

    def _names(self, key: str) -> dict[str, str]:
        """A packed weight's tensors: the name its format reads them by → file key."""
        return {(k[len(key):] if k.startswith(key) else k.rsplit(".", 1)[1]): k for k in self.parts[key]}

    def __getattr__(self, name):  # path, metadata, config()
        return getattr(self.files, name)

    def keys(self) -> list[str]:
        return [k for k in self.files.keys() if k not in self.hidden]

    def __contains__(self, key: str) -> bool:
        return key not in self.hidden and key in self.files

    def shape(self, key: str) -> tuple[int, ...]:
        conf = self.packed.get(key[: -len(".weight")])
        return logical_shape(conf["format"], self.files.shape(key)) if conf else self.files.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.files.dtype(key)

    def get(self, key: str, read: str = "get"):
        conf = self.packed.get(key[: -len(".weight")])
        if conf is None:
            return getattr(self.files, read)(key)
        tensors = {name: getattr(self.files, read)(k) for name, k in self._names(key).items()}
        fmt = ComfyFormat(conf["format"], json.dumps(conf, sort_keys=True))
        return Packed(fmt, self.shape(key), tensors)

    def meta(self, key: str):
        return self.get(key, "meta")

    def release(self, key: str) -> None:
        for k in self.parts.get(key, [key]):
            self.files.release(k)


def comfy_quantized(files, wanted: set[str] | None = None):
    """``files`` seen through ``QuantizedView`` when it holds packed ComfyUI layers, else as it is."""
    configs = layer_configs(files, wanted, check=False)  # unknown formats are refused by the loader, for the layers it reads
    return QuantizedView(files, configs) if any(c.get("format") in PACKED_FORMATS for c in configs.values()) else files


def scale_key(files, weight_key: str) -> str | None:
    base = weight_key[: -len(".weight")]
    for s in SCALE_SUFFIXES:
        if base + s in files:
            return base + s
    return None


def read_weight(files, key: str, formats: dict[str, str]) -> torch.Tensor | Packed:
    """The stored weight, with a uint8 fp8 container viewed as its fp8 type (packed formats come as ``Packed``)."""
    w = files.get(key)
    fmt = formats.get(key[: -len(".weight")])
    if fmt in FP8_FORMATS and w.dtype == torch.uint8:
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
