"""GGUF weight files, read with the ``gguf`` package's header parser, checked, seen like safetensors files.

Z-Image DiT files (city96's ``tools/convert.py`` + llama.cpp's quantiser, architecture ``lumina2``) carry the
ComfyUI or diffusers key names, so the safetensors plans apply unchanged. Qwen3 text encoders from llama.cpp
(``convert_hf_to_gguf.py``) use its own names (``token_embd``, ``blk.N.attn_q`` …); they are renamed to the
Hugging Face names as city96/ComfyUI-GGUF ``loader.py`` ``LLAMA_SD_MAP`` does (Qwen3 q/k rows are not
permuted by the converter). F32/F16/BF16 tensors come back as tensors; quantised ones as ``Packed`` GGML
blocks (ggml.py), read into memory of their own (tensor_index.py) like safetensors tensors.

A damaged or crafted file gets a message naming it: the header parse is bounded (tensor and field counts, the
number of metadata values), gguf's own exceptions are reported as a damaged file, and every tensor's type,
shape and byte range is checked against the data area (truncation, overlaps: ``check_layout``) before
anything is read.
"""

from __future__ import annotations

import math
import os
import re
import struct
import warnings

import gguf
import numpy as np
import torch

from .errors import ZImageError
from .packed import Packed
from .tensor_index import TensorIndex, check_layout, identity

MAX_COUNT = 1 << 14  # tensors, and metadata fields, a header may claim (Z-Image: ~500 tensors; Qwen3 ~400)
MAX_VALUES = 1_000_000  # metadata values all told (a Qwen3 vocabulary with its merges: ~0.46 M)
MAX_NUMEL = 1 << 40
_GGUF_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, RecursionError, MemoryError, OSError,
                struct.error)

_LLAMA_NAMES = [
    (r"^token_embd\.", "model.embed_tokens."),
    (r"^output_norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
    (r"^blk\.(\d+)\.", r"model.layers.\1."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.attn_q_norm\.", ".self_attn.q_norm."),
    (r"\.attn_k_norm\.", ".self_attn.k_norm."),
    (r"\.attn_q\.", ".self_attn.q_proj."),
    (r"\.attn_k\.", ".self_attn.k_proj."),
    (r"\.attn_v\.", ".self_attn.v_proj."),
    (r"\.attn_output\.", ".self_attn.o_proj."),
    (r"\.ffn_gate\.", ".mlp.gate_proj."),
    (r"\.ffn_up\.", ".mlp.up_proj."),
    (r"\.ffn_down\.", ".mlp.down_proj."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
]


def llama_to_hf(name: str) -> str:
    for pat, rep in _LLAMA_NAMES:
        name = re.sub(pat, rep, name)
    return name


class _Reader(gguf.GGUFReader):
    """gguf's header parser with a bound on its metadata work, arrays read whole (gguf's element-by-element parse
    costs ~35 µs a value: 15 s for a Qwen3 vocabulary); the tensor table is kept for checking instead of being
    turned into views of the file. (An array field's ``contents()`` is right for the whole array only.)"""

    def __init__(self, path: str):
        self.values_left = MAX_VALUES
        super().__init__(path, "r")

    def _get_field_parts(self, orig_offs, raw_type):
        array, string = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
        raw_itype, alen = (self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)) if raw_type == array else (0, 0)
        self.values_left -= int(alen[0]) if raw_type == array else 1
        if self.values_left < 0:
            raise ValueError(f"its metadata holds more than {MAX_VALUES:,} values")
        if raw_type != array or raw_itype[0] == array:
            return super()._get_field_parts(orig_offs, raw_type)  # one value, or arrays of arrays one by one
        itype, count, pos = gguf.GGUFValueType(raw_itype[0]), int(alen[0]), orig_offs + 12
        if itype != string:
            values = self._get(pos, self.gguf_scalar_to_np[itype], count)
            if len(values) != count:
                raise ValueError(f"an array of {count:,} values runs past the end of the file")
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [array, itype]
        mv, order, parts = memoryview(self.data), "<Q" if self.byte_order == "I" else ">Q", [raw_itype, alen]
        for _ in range(count):  # each string: u64 length, bytes
            (n,) = struct.unpack_from(order, mv, pos)
            if pos + 8 + n > len(mv):
                raise ValueError("a string runs past the end of the file")
            parts.append(mv[pos + 8:pos + 8 + n])
            pos += 8 + n
        return pos - orig_offs, parts, list(range(2, 2 + count)), [array, string]

    def _build_tensors(self, start_offs, fields):  # noqa: ARG002 (the data start is data_offset)
        self.table = [(f.name, [int(d) for d in f.parts[3]], int(f.parts[2][0]), int(f.parts[4][0]), int(f.parts[5][0]))
                      for f in fields]  # name, dims (ggml order), dims claimed, type, offset in the data area


def read_gguf_header(path: str) -> tuple[dict, list, int, tuple]:
    """(metadata fields except the tokenizer's, tensor table, data start, file identity) of a regular file."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise ZImageError(f"{path} is a truncated GGUF file ({len(head)} bytes). Download it again.")
    order = ">" if struct.unpack("<I", head[4:8])[0] & 0xFFFF == 0 else "<"  # big-endian files, as gguf reads them
    n_tensors, n_fields = struct.unpack(order + "QQ", head[8:24])
    if not 0 < n_tensors <= MAX_COUNT or n_fields > MAX_COUNT:
        raise ZImageError(f"{path}: its GGUF header claims {n_tensors:,} tensors and {n_fields:,} metadata fields, "
                          "not a model file's numbers; the file is corrupt or crafted. Download it again.")
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            reader = _Reader(path)
            fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
            return fields, reader.table, int(reader.data_offset), identity(st)
    except _GGUF_ERRORS as e:  # numpy reshape/index errors, unknown enum values, bad UTF-8, duplicate names …
        raise ZImageError(f"{path} is not a readable GGUF file ({str(e)[:200]}); it is corrupt or truncated. "
                          "Download it again.") from None


class GGUFFile(TensorIndex):
    """One .gguf file with the interface of a safetensors file (keys, shape, dtype, get …); quantised tensors
    report dtype uint8 (their blocks)."""

    def __init__(self, path: str):
        from .ggml import EXPAND, GGMLFormat

        self.path = os.fspath(path)
        self.fields, table, self._data_start, self._identity = read_gguf_header(self.path)
        qt = gguf.GGMLQuantizationType
        plain = {qt.F32: torch.float32, qt.F16: torch.float16, qt.BF16: torch.bfloat16}
        arch = self.fields.get("general.architecture")
        self.arch = arch if isinstance(arch, str) else "unknown"
        llama = any(name.startswith("blk.") for name, *_ in table)
        self.metadata: dict[str, str] = {}
        self._entries, layout = {}, {}
        for name, dims, n_dims, raw_type, begin in table:
            try:
                qtype = qt(raw_type)
            except ValueError:
                raise ZImageError(f"{self.path}: tensor {name} has GGML type number {raw_type}, which is no GGUF type; "
                                  "the file is damaged. Download it again.") from None
            if qtype not in plain and qtype not in EXPAND:
                raise ZImageError(
                    f"{self.path}: tensor {name} is stored as {qtype.name}, a GGUF type this pack does not run "
                    f"(supported: F32, F16, BF16, {', '.join(q.name for q in EXPAND)}). Use a file with one of those types.")
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            numel = math.prod(dims)
            if len(dims) != n_dims or not 1 <= n_dims <= 4 or min(dims) < 1 or numel > MAX_NUMEL or dims[0] % block:
                raise ZImageError(f"{self.path}: tensor {name} has an invalid shape {dims[::-1][:8]} for {qtype.name} "
                                  "(rows of whole blocks, at most 4 dimensions); the file is damaged. Download it again.")
            shape = tuple(reversed(dims))
            orig = self.fields.get(f"comfy.gguf.orig_shape.{name}")  # city96's convert.py reshapes some tensors
            if orig is not None:
                if not (isinstance(orig, list) and 0 < len(orig) <= 8 and all(type(v) is int and v > 0 for v in orig)
                        and math.prod(orig) == numel):
                    raise ZImageError(f"{self.path}: comfy.gguf.orig_shape.{name} is {str(orig)[:60]}, which does not "
                                      f"hold the tensor's {numel:,} values; the file is damaged. Download it again.")
                shape = tuple(orig)
            key = llama_to_hf(name) if llama else name
            if key in self._entries:
                raise ZImageError(f"{self.path} holds {key} twice (as {name} too); the file is damaged.")
            end = begin + numel // block * block_bytes
            layout[name] = ((block, block_bytes), [numel], [begin, end])
            fmt = None
            if qtype not in plain:
                fmt = GGMLFormat(int(qtype), rowwise=len(shape) > 1 and math.prod(shape[1:]) % block == 0)
            self._entries[key] = (plain.get(qtype, torch.uint8), shape, begin, end, fmt)
        check_layout(self.path, layout, self._identity[2] - self._data_start, contiguous=False)

    def field(self, name: str):
        """A metadata value (string, number or list), or None."""
        return self.fields.get(name)

    def wrap(self, key: str, raw: torch.Tensor) -> torch.Tensor | Packed:
        dtype, shape, _, _, fmt = self._entries[key]
        if fmt is None:
            return raw.view(dtype).reshape(shape)
        return Packed(fmt, shape, {"blocks": raw.reshape(shape[0] if fmt.rowwise else 1, -1)})

    def config(self) -> dict:
        """What the header says that safetensors files keep in config.json (Qwen3: RoPE base, norm epsilon)."""
        conf = {"rope_theta": self.field(f"{self.arch}.rope.freq_base"),
                "rms_norm_eps": self.field(f"{self.arch}.attention.layer_norm_rms_epsilon")}
        return {k: v for k, v in conf.items() if v is not None}
