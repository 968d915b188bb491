"""GGUF weight files, read with the ``gguf`` package (memory-mapped, lazy), seen like safetensors files.

Z-Image DiT files (city96's ``tools/convert.py`` + llama.cpp's quantiser, architecture ``lumina2``) carry the
ComfyUI or diffusers key names, so the safetensors plans apply unchanged. Qwen3 text encoders from llama.cpp
(``convert_hf_to_gguf.py``) use its own names (``token_embd``, ``blk.N.attn_q`` …); they are renamed to the
Hugging Face names as city96/ComfyUI-GGUF ``loader.py`` ``LLAMA_SD_MAP`` does (Qwen3 q/k rows are not
permuted by the converter). F32/F16/BF16 tensors come back as tensors; quantised ones as ``Packed`` GGML
blocks (ggml.py), views of the file until used.
"""

from __future__ import annotations

import math
import os
import re

import torch

from .errors import ZImageError
from .packed import Packed
from .tensor_index import TensorIndex

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


class GGUFFile(TensorIndex):
    """One .gguf file with the interface of a safetensors file (keys, shape, dtype, get …); quantised tensors
    report dtype uint8 (their blocks)."""

    def __init__(self, path: str):
        import gguf

        from .ggml import EXPAND, GGMLFormat

        self.path = os.fspath(path)
        try:
            self.reader = gguf.GGUFReader(self.path, "c")  # copy-on-write map: tensors are views of the page cache
        except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
            raise ZImageError(f"{self.path} is not a readable GGUF file ({e}); it is corrupt or truncated. "
                              "Download it again.") from None
        qt = gguf.GGMLQuantizationType
        plain = {qt.F32: torch.float32, qt.F16: torch.float16, qt.BF16: torch.bfloat16}
        self.arch = self.field("general.architecture") or "unknown"
        llama = any(t.name.startswith("blk.") for t in self.reader.tensors)
        self.metadata: dict[str, str] = {}
        self._entries = {}
        for t in self.reader.tensors:
            qtype = qt(t.tensor_type)
            if qtype not in plain and qtype not in EXPAND:
                raise ZImageError(
                    f"{self.path}: tensor {t.name} is stored as {qtype.name}, a GGUF type this pack does not run "
                    f"(supported: F32, F16, BF16, {', '.join(q.name for q in EXPAND)}). Use a file with one of those types.")
            orig = self.field(f"comfy.gguf.orig_shape.{t.name}")  # city96's convert.py reshapes some tensors
            shape = tuple(int(v) for v in orig) if orig is not None else tuple(int(v) for v in reversed(t.shape))
            fmt = None
            if qtype not in plain:
                block = gguf.GGML_QUANT_SIZES[qtype][0]
                fmt = GGMLFormat(int(qtype), rowwise=len(shape) > 1 and math.prod(shape[1:]) % block == 0)
            self._entries[llama_to_hf(t.name) if llama else t.name] = (plain.get(qtype, torch.uint8), shape, t, fmt)

    def field(self, name: str):
        """A metadata value (string, number or list), or None."""
        f = self.reader.get_field(name)
        return None if f is None else f.contents()

    def nbytes(self, key: str) -> int:
        return int(self._entries[key][2].n_bytes)

    def get(self, key: str) -> torch.Tensor | Packed:
        dtype, shape, t, fmt = self._entries[key]
        raw = torch.from_numpy(t.data.reshape(-1).view("uint8"))  # writable: the map is copy-on-write
        if fmt is None:
            return raw.view(dtype).reshape(shape)
        rows = shape[0] if fmt.rowwise else 1
        return Packed(fmt, shape, {"blocks": raw.reshape(rows, -1)})

    def release(self, key: str) -> None:
        pass

    def config(self) -> dict:
        """What the header says that safetensors files keep in config.json (Qwen3: RoPE base, norm epsilon)."""
        conf = {"rope_theta": self.field(f"{self.arch}.rope.freq_base"),
                "rms_norm_eps": self.field(f"{self.arch}.attention.layer_norm_rms_epsilon")}
        return {k: v for k, v in conf.items() if v is not None}
