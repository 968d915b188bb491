"""ComfyUI's block-scaled and integer weight formats: reading a layer's storage tensors and dequantizing them.

Each format is what ComfyUI's ``comfy/ops.py`` (``_load_quantized_module``) reads for a layer with a
``comfy_quant`` config, laid out as the ``comfy-kitchen`` package (0.2.31, the version ComfyUI's
requirements.txt pins) writes it. The dequantizations repeat comfy-kitchen's eager backend operation for
operation (same dtypes, same order), so a weight dequantizes to the values ComfyUI computes on the CPU:

* ``mxfp8``: e4m3 data, one e8m0 (power-of-two) scale per 32 values of a row, rows/columns padded to 32;
  scales in cuBLAS's swizzled 128×4 tiles (``comfy_kitchen/tensor/mxfp8.py``,
  ``backends/eager/quantization.py: dequantize_mxfp8``, ``float_utils.py: from_blocked, e8m0_to_f32``).
* ``nvfp4``: e2m1 pairs packed in uint8 (high nibble = even column), one e4m3 scale per 16 values (swizzled
  as above) times the per-tensor ``weight_scale_2``; padded to 16 (``tensor/nvfp4.py``, ``dequantize_nvfp4``).
* ``int8_tensorwise``: int8 × ``weight_scale`` (scalar or per row); with ``convrot`` the rows were rotated
  by a block-diagonal regular Hadamard matrix before quantizing and are rotated back
  (``tensor/int8.py``, ``dequantize_int8_convrot_weight``, ``tensor/int8_utils.py``).
* ``convrot_w4a4``: signed int4 pairs in int8 (low nibble = even column), one fp32 scale per row, rotated
  (``tensor/convrot_w4a4.py``, ``backends/eager/convrot_w4a4.py``, ``backends/eager/svdquant.py``).
* ``asym_w4a8_int8``: unsigned int4 codes (low nibble = even column) → Lloyd-Max ``codebook`` level or
  code − 8, × per-group ``s_rel`` (e4m3), rounded to the int8 grid, × per-row ``s_channel`` (+ optional
  per-group ``correction``), rotated (``tensor/w4a8_int8.py``, ``backends/eager/w4a8_int8.py``).
"""

from __future__ import annotations

import functools
import json
import math

import torch

# key suffixes (after "<layer>.weight") each format stores, as ComfyUI's loader pops them; "" is the data
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "float8_e4m3fn": ("", "_scale"),
    "float8_e5m2": ("", "_scale"),
    "mxfp8": ("", "_scale"),
    "nvfp4": ("", "_scale", "_scale_2"),
    "int8_tensorwise": ("", "_scale"),
    "convrot_w4a4": ("", "_scale"),
    "asym_w4a8_int8": ("", "_s_rel", "_s_channel", "_codebook", "_correction"),
}
# data elements per stored column: 4-bit formats pack two values in a byte
PACKING = {"nvfp4": 2, "convrot_w4a4": 2, "asym_w4a8_int8": 2}
# other per-layer tensors ComfyUI reads for these formats (activation scales, AWQ smoothing)
EXTRA_KEYS = ("input_scale", "pre_quant_scale")

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def read_config(raw: torch.Tensor) -> dict:
    """A ``<layer>.comfy_quant`` tensor (uint8 JSON bytes) → its dict."""
    return json.loads(raw.numpy().tobytes())


def logical_shape(fmt: str, storage_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The (possibly padded) weight shape a format's data tensor holds."""
    rows, cols = storage_shape
    return rows, cols * PACKING.get(fmt, 1)


# ---- layout helpers (comfy_kitchen/float_utils.py) -------------------------------------------------


def unswizzle(scales: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """cuBLAS block-scale tiles → a rows×cols matrix: tile (i, j) holds rows i·128 + a·32 + b, columns j·4 + c
    at [b, a, c] (``from_blocked``)."""
    rb, cb = -(-rows // 128), -(-cols // 4)
    t = scales.reshape(rb, cb, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(rb * 128, cb * 4)
    return t[:rows, :cols]


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """Biased power-of-two exponents → float32 2^(e−127); code 0 reads as 0 (``e8m0_to_f32``)."""
    bits = e.view(torch.uint8).to(torch.int32)
    return torch.where(bits == 0, 0, bits << 23).view(torch.float32)


def unpack_nibbles(packed: torch.Tensor, signed: bool, high_first: bool) -> torch.Tensor:
    """uint8/int8 bytes → two 4-bit codes each (int32), as signed [-8, 7] or unsigned [0, 15] values."""
    b = packed.view(torch.uint8).to(torch.int32)
    lo, hi = b & 0xF, b >> 4
    if signed:
        lo, hi = lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)
    pair = (hi, lo) if high_first else (lo, hi)
    return torch.stack(pair, dim=-1).reshape(*packed.shape[:-1], -1)


@functools.cache  # never evicted (a few devices × dtypes): a CUDA graph may hold its address
def e2m1_table(device, dtype: torch.dtype) -> torch.Tensor:
    """The 16 fp4 (e2m1) values by code, on ``device`` (made once: no host copy per call)."""
    return torch.tensor(E2M1_VALUES, dtype=dtype, device=device)


@functools.cache  # never evicted (a few sizes × devices × dtypes): a CUDA graph may hold its address
def hadamard(size: int, device, dtype: torch.dtype) -> torch.Tensor:
    """ConvRot's normalised regular Hadamard matrix: Kronecker powers of a symmetric 4×4 (size a power of 4)."""
    if size < 4 or 4 ** round(math.log(size, 4)) != size:
        raise ValueError(f"ConvRot group size must be a power of 4, got {size}")
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=dtype, device=device)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return h / (size**0.5)


def unrotate(w: torch.Tensor, group: int) -> torch.Tensor:
    """Undo ConvRot's offline rotation: each row's groups of ``group`` columns times Hᵀ (H is its own inverse)."""
    n, k = w.shape
    h = hadamard(group, w.device, w.dtype)
    return torch.matmul(w.reshape(n, k // group, group), h.T).reshape(n, k)


# ---- checking a layer's tensors before reading them -------------------------------------------------


def _tiles(rows: int, cols: int) -> int:
    """Values in a swizzled rows×cols block-scale matrix: whole 128×4 tiles (``unswizzle``)."""
    return -(-rows // 128) * 128 * -(-cols // 4) * 4


def layout_problem(fmt: str, tensors: dict[str, tuple[tuple[int, ...], int]], conf: dict) -> str | None:
    """What is wrong with one layer's stored tensors (name as ``ComfyFormat`` gets them → (shape, bytes per
    element)) for ``fmt``, from the header alone; None when ``dequantize`` below can take them apart: every tensor
    the format needs, of the size (or, where it is indexed by row and group, the shape) it uses."""
    missing = [s for s in FORMAT_KEYS[fmt] if s not in ("_codebook", "_correction") and s not in tensors]
    if missing:
        return "has no " + ", ".join("weight" + s for s in missing)
    shape, item = tensors[""]
    if len(shape) != 2 or item != 1:
        return f"weight has shape {list(shape)} of {item}-byte values, not a matrix of bytes"
    rows, cols = logical_shape(fmt, shape)
    try:
        group = convrot_group(conf) if fmt != "mxfp8" and fmt != "nvfp4" else 1
        params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
        w4a8 = int(conf.get("group_size", params.get("group_size", 16))) if fmt == "asym_w4a8_int8" else 1
    except (TypeError, ValueError):
        return f"has an unreadable group size in its config {str(conf)[:80]}"
    rotated = fmt in ("convrot_w4a4", "asym_w4a8_int8") or conf.get("convrot", params.get("convrot", False))
    if rotated and (group < 4 or 4 ** round(math.log(group, 4)) != group):
        return f"has a ConvRot group size of {group}, not a power of 4"
    block = {"mxfp8": 32, "nvfp4": 16}.get(fmt, math.lcm(group if rotated else 1, max(w4a8, 1)))
    if w4a8 < 1 or cols % block:
        return f"has {cols} columns, not whole groups of {block}"
    want: dict[str, int | tuple[int, ...]] = {
        "mxfp8": {"_scale": _tiles(rows, cols // 32)},
        "nvfp4": {"_scale": _tiles(rows, cols // 16), "_scale_2": 1},
        "convrot_w4a4": {"_scale": rows},
        "asym_w4a8_int8": {"_s_rel": (rows, cols // w4a8), "_s_channel": rows, "_codebook": 16,
                           "_correction": (cols // w4a8, rows)},
    }.get(fmt, {})
    want["input_scale"] = 1
    label = lambda name: "weight" + name if name.startswith("_") else name  # noqa: E731
    for name, need in want.items():
        got = tensors.get(name, (None,))[0]
        if got is not None and (tuple(got) != need if isinstance(need, tuple) else math.prod(got) != need):
            expected = list(need) if isinstance(need, tuple) else f"{need} values"
            return f"{label(name)} has shape {list(got)}, expected {expected} for a {rows}×{cols} weight"
    multiplied = ["pre_quant_scale"] + (["_scale"] if fmt == "int8_tensorwise" else [])  # broadcast as ComfyUI does
    for name in multiplied:
        got = tensors.get(name, (None,))[0]
        if got is not None and _broadcast(got, (rows, cols)) != (rows, cols):
            return f"{label(name)} has shape {list(got)}, which does not scale a {rows}×{cols} weight"
    return None


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(torch.broadcast_shapes(tuple(a), b))
    except RuntimeError:
        return None


# ---- dequantization --------------------------------------------------------------------------------


def dequantize(fmt: str, t: dict[str, torch.Tensor], conf: dict, dtype: torch.dtype) -> torch.Tensor:
    """Storage tensors of one layer (keyed by ``FORMAT_KEYS`` suffix) → the padded weight in ``dtype``."""
    w = t[""]
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        w = w.view(getattr(torch, fmt)) if w.dtype == torch.uint8 else w
        s = t.get("_scale")
        return w.to(dtype) if s is None else w.to(dtype) * s.to(dtype)
    if fmt == "mxfp8":
        rows, cols = w.shape
        scale = e8m0_to_float(unswizzle(t["_scale"].view(torch.uint8), rows, cols // 32))
        x = w.view(torch.float8_e4m3fn).to(torch.float32).reshape(rows, cols // 32, 32) * scale[..., None]
        return x.reshape(rows, cols).to(dtype)
    if fmt == "nvfp4":
        x = e2m1_table(w.device, dtype)[unpack_nibbles(w, signed=False, high_first=True)]
        rows, cols = x.shape
        block = unswizzle(t["_scale"].view(torch.float8_e4m3fn), rows, cols // 16)
        scale = t["_scale_2"].to(dtype) * block.to(dtype)
        return (x.reshape(rows, cols // 16, 16) * scale[..., None]).reshape(rows, cols).to(dtype)
    if fmt == "int8_tensorwise":
        x = w.view(torch.int8).float() * t["_scale"].to(w.device)
        if conf.get("convrot", conf.get("params", {}).get("convrot", False)):
            x = unrotate(x, convrot_group(conf))
        return x.to(dtype)
    if fmt == "convrot_w4a4":
        x = unpack_nibbles(w, signed=True, high_first=False).float() * t["_scale"].float().reshape(-1, 1)
        return unrotate(x, convrot_group(conf)).to(dtype)
    if fmt == "asym_w4a8_int8":
        return _dequantize_w4a8(t, conf, dtype)
    raise ValueError(f"unknown quantisation format {fmt!r}")


def convrot_group(conf: dict) -> int:
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    return int(conf.get("convrot_groupsize", params.get("convrot_groupsize", 256)))


def _dequantize_w4a8(t: dict[str, torch.Tensor], conf: dict, dtype: torch.dtype) -> torch.Tensor:
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    group = int(conf.get("group_size", params.get("group_size", 16)))
    codes = unpack_nibbles(t[""], signed=False, high_first=False)
    n, k = codes.shape
    book = t.get("_codebook")
    values = book.float()[codes] if book is not None else codes.float() - 8.0
    s_rel = t["_s_rel"]
    s_rel = s_rel.view(torch.float8_e4m3fn) if s_rel.dtype == torch.uint8 else s_rel
    grid = (values.view(n, k // group, group) * s_rel.float()[..., None]).view(n, k).round().clamp_(-127, 127)
    x = grid.to(torch.int8).float().view(n, k // group, group) * t["_s_channel"].float().view(n, 1, 1)
    if t.get("_correction") is not None:
        x = x + t["_correction"].t()[..., None].float()
    return unrotate(x.view(n, k).to(dtype), convrot_group(conf)).to(dtype)
