"""Tiny GGUF files with the real tensor names, written with gguf's own writer, and their expanded float truth.

DiT files as city96/ComfyUI-GGUF ``tools/convert.py`` writes them (``GGUFWriter(arch="lumina2")``, ComfyUI key
names, 1-D and tiny tensors in F32); Qwen3 text encoders with the names llama.cpp's ``convert_hf_to_gguf.py``
gives (gguf-py ``tensor_mapping.py``, ``get_tensor_name_map``). Quantised blocks are random bytes (gguf-py
quantises only some types) with f16 scales chosen so the weights have a sensible size. Needs only numpy and
gguf at import (benchmarks/bench_gguf.py uses it on bare GPU machines).
"""

import os

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

# Byte offsets of the f16 scale fields (d, and dmin or m) in one block: gguf/quants.py dequantize_blocks' hsplits.
SCALE_AT = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.IQ4_NL: (0,),
            QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.IQ4_XS: (0,)}
# Typical |quantised value × sub-block scale| per type, so random blocks make weights of about 1/sqrt(fan-in).
GAIN = {QT.Q8_0: 64, QT.Q4_0: 4, QT.Q4_1: 8, QT.Q5_0: 8, QT.Q5_1: 16, QT.IQ4_NL: 64, QT.Q2_K: 12, QT.Q3_K: 32,
        QT.Q4_K: 256, QT.Q5_K: 512, QT.Q6_K: 1024, QT.IQ4_XS: 1024}
def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """rows × cols weights as random blocks (uint8 rows × bytes) whose scales give entries of about 1/sqrt(cols)."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // bs, ts), dtype=np.uint8)
    for off in SCALE_AT[qtype]:
        d = (rng.uniform(0.5, 1.5, raw.shape[0]) / (GAIN[qtype] * cols**0.5)).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def _types_for(cols: int, cycle: list) -> list:
    return [q for q in cycle if cols % gguf.GGML_QUANT_SIZES[q][0] == 0]


def write_gguf(path, arch: str, tensors: dict, meta=None) -> str:
    """tensors: name → (float32 array, qtype); quantised types get random blocks. Returns the path."""
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for fn, args in (meta or {}).items():
        getattr(w, fn)(*args)
    for name, (arr, qt) in tensors.items():
        if qt == QT.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qt == QT.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, arr, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def quantise_state_dict(sd: dict, seed: int, cycle: list, threshold: int = 1024):
    """name → (array to write, qtype) and the expanded truth (float32; F16 tensors as float16, as loading keeps them),
    choosing types as the converters do: 1-D and tiny tensors F32, rows no block size divides F16, the rest
    cycling through ``cycle``."""
    rng = np.random.default_rng(seed)
    out, truth, i = {}, {}, 0
    for name, v in sd.items():
        v = v.float().numpy()
        options = _types_for(v.shape[-1], cycle) if v.ndim == 2 else []
        if v.ndim < 2 or v.size <= threshold:
            out[name], truth[name] = (v, QT.F32), torch.from_numpy(v.copy())
        elif not options:
            out[name], truth[name] = (v, QT.F16), torch.from_numpy(v.astype(np.float16))
        else:
            qt = options[i % len(options)]
            i += 1
            raw = random_blocks(qt, v.shape[0], v.shape[1], rng)
            out[name], truth[name] = (raw, qt), torch.from_numpy(gguf.quants.dequantize(raw, qt).copy())
    return out, truth


DIT_TYPES = [QT.Q4_K, QT.Q8_0, QT.Q6_K, QT.Q5_K, QT.Q3_K, QT.Q2_K, QT.IQ4_XS, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1, QT.IQ4_NL]
QWEN_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q5_1, QT.IQ4_NL, QT.Q4_1, QT.Q5_0]


def save_dit_gguf(model, path: str, truth_path: str, seed: int = 0) -> dict:
    """A diffusers Z-Image model as a mixed-type GGUF in ComfyUI names, and its expanded weights as safetensors."""
    from safetensors.torch import save_file
    from tiny import comfyui_state_dict

    tensors, truth = quantise_state_dict(comfyui_state_dict(model.state_dict()), seed, DIT_TYPES)
    write_gguf(path, "lumina2", tensors)
    save_file({k: v.contiguous() for k, v in truth.items()}, truth_path)
    return truth


def save_qwen_gguf(hf, path: str, truth_path: str, seed: int = 1, parts=(), meta=None) -> dict:
    """A transformers Qwen3Model or Qwen3ForCausalLM as a GGUF with llama.cpp names (``parts``: (HF module suffix,
    type) forced per layer; ``meta``: writer calls replacing the defaults), and its expanded weights as safetensors
    in ComfyUI's text-encoder layout. A tied head is not written (tied HF checkpoints store none, so
    convert_hf_to_gguf.py writes no ``output.weight``)."""
    from safetensors.torch import save_file

    sd = {k if k.startswith(("model.", "lm_head.")) else "model." + k: v for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    tensors, truth = quantise_state_dict(sd, seed, QWEN_TYPES)
    rng = np.random.default_rng(seed + 1)
    n = hf.config.num_hidden_layers
    for i in range(n):
        for part, qt in parts:
            name = f"model.layers.{i}.{part}.weight"
            rows, cols = truth[name].shape
            raw = random_blocks(qt, rows, cols, rng)
            tensors[name], truth[name] = (raw, qt), torch.from_numpy(gguf.quants.dequantize(raw, qt).copy())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, n)
    cpp = {names.get_name(k, try_suffixes=(".weight",)): v for k, v in tensors.items()}
    write_gguf(path, "qwen3", cpp, {"add_rope_freq_base": (1e6,),  # tiny_qwen's RoPE base and epsilon
                                    "add_layer_norm_rms_eps": (1e-6,), "add_block_count": (n,), **(meta or {})})
    save_file({k: v.contiguous() for k, v in truth.items()}, truth_path)
    return truth
