"""Filling a module built on the meta device from a file, tensor by tensor.

Each target tensor is produced from its source keys only when it is assigned, converted once, and the
source pages are released, so peak memory stays near the weights at their target dtype. ``Linear``
and ``Embedding`` weights keep a storage dtype (fp8 stays fp8; a bf16 file run in fp32 stays bf16) or stay ``Packed``
(GGUF blocks); everything else is stored in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ZImageError
from .layers import FP8_DTYPES
from .packed import Packed, stack_rows
from .quant import quantize_fp8, read_weight


@dataclass
class Source:
    """Where one internal tensor comes from: file keys concatenated along dim 0, each with an optional scale key."""

    keys: list[str]
    scales: list[str | None] = field(default_factory=list)
    view: tuple[int, ...] | None = None  # reshape after reading (e.g. a linear stored for a 1×1 conv)


# The dtype names users choose from (CLI, loader nodes): compute dtypes, and storage-only fp8 types.
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STORAGE_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def storage_dtype_for(file_dtype: torch.dtype, compute: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    if file_dtype in FP8_DTYPES:
        return file_dtype
    if file_dtype.is_floating_point and file_dtype.itemsize <= compute.itemsize:
        return file_dtype
    return compute


def _scale(files, key: str) -> torch.Tensor:
    """A per-tensor fp8 scale: one finite positive number (other layouts are not ComfyUI's tensorwise fp8)."""
    if files.nbytes(key) > 16 or len(files.shape(key)) > 1 or (files.shape(key) and files.shape(key)[0] != 1):
        raise ZImageError(f"{files.path}: fp8 scale {key} has shape {list(files.shape(key))}; a per-tensor scale is one "
                          "number. The file is corrupt or uses a quantisation this pack does not run.")
    v = files.get(key).float().reshape(())
    if not torch.isfinite(v) or v <= 0:
        raise ZImageError(f"{files.path}: fp8 scale {key} is {float(v)}; the file's weights are broken. Download it again.")
    return v


def _gather(files, src: Source, formats) -> tuple[torch.Tensor | Packed, torch.Tensor | None]:
    parts = [read_weight(files, k, formats) if k.endswith(".weight") else files.get(k) for k in src.keys]
    scales = src.scales or [None] * len(parts)
    if all(s is None for s in scales):
        scale = None
    elif len(parts) == 1:
        scale = _scale(files, scales[0])
    else:  # e.g. separately scaled q, k, v fused into one qkv: a per-row scale keeps it exact
        rows = []
        for p, s in zip(parts, scales):
            v = _scale(files, s) if s is not None else torch.ones(())
            rows.append(v.expand(p.shape[0]))
        scale = torch.cat(rows)[:, None]
    if len(parts) == 1:
        return parts[0], scale
    if any(isinstance(p, Packed) for p in parts):
        return stack_rows(parts), scale
    dtypes = {p.dtype for p in parts}
    if len(dtypes) > 1:  # mixed storage across fused parts: fall back to the widest float
        parts = [p.float() for p in parts]
    return torch.cat(parts, dim=0), scale


def fill_module(
    module: nn.Module,
    files,
    plan: dict[str, Source],
    *,
    compute_dtype: torch.dtype,
    storage_dtype: torch.dtype | None,
    device: torch.device | str,
    formats: dict[str, str] | None = None,
    what: str = "model",
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Assign every parameter of ``module`` (on meta) from ``plan``; shapes are checked against the module."""
    formats = formats or {}
    device = torch.device(device)
    # modules whose weight keeps a storage dtype (Linear, Embedding): they carry a weight_scale slot
    stored = {name for name, m in module.named_modules() if hasattr(m, "weight_scale")}
    wanted = dict(module.named_parameters())
    missing = [k for k in wanted if k not in plan]
    if missing:
        raise ZImageError(
            f"{files.path}: {len(missing)} tensor(s) the {what} needs are missing, e.g. {', '.join(missing[:4])}. "
            "The file is incomplete or is a different variant."
        )
    for name, param in wanted.items():
        src = plan[name]
        t, scale = _gather(files, src, formats)
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if isinstance(t, Packed) and (owner_name not in stored or leaf != "weight" or storage_dtype is not None):
            t = t.dequantize(torch.float32)  # a packed norm or bias, or a storage dtype asked for: expand once
        if isinstance(t, Packed):
            if tuple(t.shape) != tuple(param.shape):
                raise ZImageError(f"{files.path}: tensor {src.keys[0]} has shape {list(t.shape)}, expected "
                                  f"{list(param.shape)} for {name}. The file does not match this {what}'s architecture.")
            owner.weight_scale = None
            owner.weight = t.map(lambda x: x.to(device))
            if on_tensor:
                on_tensor(name)
            continue
        if src.view is not None and t.numel() == param.numel():
            t = t.reshape(src.view)
        if tuple(t.shape) != tuple(param.shape):
            raise ZImageError(
                f"{files.path}: tensor {src.keys[0]} has shape {list(t.shape)}, expected {list(param.shape)} "
                f"for {name}. The file does not match this {what}'s architecture."
            )
        if owner_name in stored and leaf == "weight":
            target = storage_dtype_for(t.dtype, compute_dtype, storage_dtype)
            if target in FP8_DTYPES and t.dtype != target:
                base = t.to(torch.float32) * scale if scale is not None else t
                t, scale = quantize_fp8(base, target)
            elif target not in FP8_DTYPES and scale is not None:  # dequantise fp8 into a float storage
                t, scale = (t.to(torch.float32) * scale).to(target), None
            else:
                t = t.to(target)
            owner.weight_scale = None if scale is None else scale.to(device)
            inp = src.keys[0][: -len(".weight")] + ".input_scale"  # ComfyUI's calibrated fp8 activation scale
            if hasattr(owner, "input_scale") and len(src.keys) == 1 and t.dtype in FP8_DTYPES and inp in files:
                owner.input_scale = _scale(files, inp).to(device)
        else:
            t = t.to(torch.float32) * scale if scale is not None else t
            t = t.to(compute_dtype)
        t = t.to(device)
        setattr(owner, leaf, nn.Parameter(t, requires_grad=False))
        for k in src.keys:
            files.release(k)
        if on_tensor:
            on_tensor(name)


def first_nonfinite(module: nn.Module) -> str | None:
    """The name of the first parameter holding NaN/inf (weights broken in their file), or None; for error paths."""
    for name, p in module.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p.float() if p.dtype in FP8_DTYPES else p).all():
            return name
    return None


def nonfinite_error(model: nn.Module, where: str) -> ZImageError:
    """Why NaN/inf appeared ``where`` in a run: broken weights in the model's file (named), or an overflow of the
    compute dtype (fp16: run in bf16), or out-of-range inputs."""
    bad = first_nonfinite(model)
    if bad is not None:
        src = getattr(model, "source_path", None) or "the model file"
        return ZImageError(f"NaN/inf appeared {where}: weight {bad} of {src} holds NaN/inf, so that file (or a LoRA "
                           "merged into it) is broken. Download it again or use another file; no dtype setting fixes it.")
    dtype = getattr(model, "compute_dtype", None)
    fix = ("fp16 overflows on Z-Image: run it in bf16 (or fp32)." if dtype == torch.float16 else
           "The weights are finite, so an input (latents, conditioning, a LoRA at a high strength) is out of range; "
           "check them, or run in fp32.")
    return ZImageError(f"NaN/inf appeared {where} while computing in {str(dtype).replace('torch.', '')}. {fix}")
