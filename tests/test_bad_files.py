"""Every malformed, crafted or wrong file a user can hand the pack gets a clear ZImageError naming it.

Table-driven: each case builds one file (or folder); all cases run in a few subprocesses under a memory limit
(RLIMIT_AS) and a per-case alarm plus a per-batch timeout, so a hang, a crash (SIGBUS/SIGSEGV, a Rust panic
aborting the process) or a runaway allocation shows up as that case's outcome instead of taking pytest down.
A bad case passes only with outcome "error" (our exception type) and a message naming the file; a control
case must load, and header-only controls must read back exactly the bytes that were written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import save as st_save
from tiny import bfl_vae_state_dict, comfyui_state_dict, diffusers_transformer, tiny_qwen, tiny_vae
from tiny_gguf import DIT_TYPES, quantise_state_dict, save_qwen_gguf, write_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_LIMIT = 3 << 30  # address space; importing torch takes ~0.8 GB of it
CASE_SECONDS, BATCH_SECONDS, BATCHES = 60, 900, 3

RUNNER = r"""
import hashlib, json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, (__LIMIT__, __LIMIT__))
import torch
import zimage_core as zc
from zimage_core.lora import read_lora
from zimage_core.safetensors_io import SafetensorsFile
from zimage_core.tokenizer import PromptTokenizer, find_tokenizer_dir
from zimage_core.transformer_files import meta_transformer

class Timeout(BaseException):
    pass

def alarm(*_):
    raise Timeout()

signal.signal(signal.SIGALRM, alarm)
cases = json.load(open(sys.argv[1]))
model = zc.load_transformer(cases[0]["model"], dtype=torch.float32)

def header(path):
    f = SafetensorsFile(path)
    h = hashlib.sha256()
    for k in sorted(f.keys()):
        h.update(k.encode() + f.get(k).reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

LOADERS = {
    "dit": lambda p: zc.load_transformer(p),
    "meta": lambda p: meta_transformer(p),
    "te": lambda p: zc.load_text_encoder(p),
    "vae": lambda p: zc.load_autoencoder(p),
    "lora": lambda p: read_lora(p, model),
    "header": header,
    "tokenizer": lambda p: PromptTokenizer(find_tokenizer_dir(p))(["a cat"]),
}
for case in cases:
    signal.alarm(__SECONDS__)
    try:
        got = LOADERS[case["kind"]](case["path"])
        out = {"outcome": "loaded", "digest": got if isinstance(got, str) else None}
    except zc.ZImageError as e:
        out = {"outcome": "error", "message": str(e)}
    except Timeout:
        out = {"outcome": "timeout"}
    except MemoryError:
        out = {"outcome": "memory"}
    except BaseException as e:
        out = {"outcome": "exception", "message": f"{type(e).__name__}: {e}"[:500]}
    signal.alarm(0)
    print(json.dumps({"id": case["id"], **out}), flush=True)
"""


# ---- building files ------------------------------------------------------------------------------

def split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header, data: bytes = b"", pad_to: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad_to is not None:
        h += b" " * (pad_to - len(h))
    return struct.pack("<Q", len(h)) + h + data


def mutate(sd: dict, fn) -> bytes:
    """The safetensors bytes of ``sd`` with ``fn`` applied to its parsed header."""
    h, data = split(st_save({k: v.contiguous() for k, v in sd.items()}))
    fn(h)
    return join(h, data)


def first(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def entry(**kw):
    def fn(h):
        h[first(h)].update(kw)
    return fn


def put(sd, **tensors):
    return {**sd, **tensors}


def drop(sd, *names):
    return {k: v for k, v in sd.items() if k not in names}


def lora_pair(name, rank, out_f, in_f, prefix="diffusion_model."):
    g = torch.Generator().manual_seed(len(name))
    return {f"{prefix}{name}.lora_A.weight": torch.randn(rank, in_f, generator=g),
            f"{prefix}{name}.lora_B.weight": torch.randn(out_f, rank, generator=g)}


class GGUFBytes:
    """A GGUF file's bytes, written by gguf-py's ``GGUFWriter`` as the real converters do (city96/ComfyUI-GGUF
    tools/convert.py, llama.cpp convert_hf_to_gguf.py; see tiny_gguf.py), with in-place edits of one tensor-info
    record, laid out as gguf-py ``gguf_reader.py`` ``_get_tensor_info_field`` reads it: name length (u64), name,
    dimension count (u32), dimensions (u64 each, fastest first), GGML type (u32), offset into the data area (u64)."""

    def __init__(self, path: str):
        self.blob = open(path, "rb").read()
        r = gguf.GGUFReader(path)
        self.info = {t.name: (t.field.offset, len(t.shape), t.data_offset - r.data_offset) for t in r.tensors}

    def patch(self, name: str, *, dims=None, qtype=None, offset=None, name_byte=None) -> bytes:
        pos, n, _ = self.info[name]
        b = bytearray(self.blob)
        at = pos + 8 + len(name.encode()) + 4  # the dimensions
        if name_byte is not None:
            b[pos + 8] = name_byte
        if dims is not None:
            b[at:at + 8 * n] = struct.pack(f"<{n}Q", *dims)
        if qtype is not None:
            b[at + 8 * n:at + 8 * n + 4] = struct.pack("<I", qtype)
        if offset is not None:
            b[at + 8 * n + 4:at + 8 * n + 12] = struct.pack("<Q", offset)
        return bytes(b)


def gguf_head(n_tensors: int, n_fields: int, version: int = 3) -> bytes:
    """A GGUF header's fixed part (ggml docs/gguf.md: magic, version u32, tensor count u64, field count u64)."""
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_fields)


def gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    dit = comfyui_state_dict(diffusers_transformer(seed=1).state_dict())
    qwen = tiny_qwen(0, layers=2)
    te = {"model." + k: v.contiguous() for k, v in qwen.state_dict().items()}
    vae = bfl_vae_state_dict(tiny_vae(0).state_dict())
    tmp = tmp_path_factory.mktemp("gguf")
    tensors, _ = quantise_state_dict(dit, 0, DIT_TYPES)
    g_dit = GGUFBytes(write_gguf(tmp / "dit.gguf", "lumina2", tensors))
    save_qwen_gguf(qwen, str(tmp / "te.gguf"), str(tmp / "te-truth.safetensors"))
    save_qwen_gguf(qwen, str(tmp / "te-rope.gguf"), str(tmp / "te-truth.safetensors"), meta={"add_rope_freq_base": (-5.0,)})
    flux = {"double_blocks.0.img_attn.qkv.weight": (np.ones((8, 32), np.float32), QT.F32),
            "single_blocks.0.linear1.weight": (np.ones((8, 32), np.float32), QT.F32)}
    return {"dit": dit, "te": te, "vae": vae, "gguf_dit": g_dit, "gguf_te": open(tmp / "te.gguf", "rb").read(),
            "gguf_te_rope": open(tmp / "te-rope.gguf", "rb").read(),
            "gguf_orig_shape": open(write_gguf(tmp / "odd.gguf", "lumina2", tensors, {"add_array": (
                "comfy.gguf.orig_shape.x_embedder.weight", [3, 5])}), "rb").read(),
            "gguf_flux": open(write_gguf(tmp / "flux.gguf", "flux", flux), "rb").read()}


def bad_cases(b) -> list[tuple[str, str, object, str]]:
    """(id, loader, file bytes or a folder builder, regex the message must match)."""
    dit, te, vae = b["dit"], b["te"], b["vae"]
    w = "layers.0.attention.out.weight"
    dim = dit[w].shape[0]
    small = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int8)}
    cases = [
        # -- the safetensors container ----------------------------------------------------------------
        ("empty", "dit", b"", "empty or truncated"),
        ("five-bytes", "dit", b"\x01\x02\x03\x04\x05", "empty or truncated"),
        ("header-length-zero", "dit", struct.pack("<Q", 0) + b"{}", "not a valid safetensors"),
        ("header-length-past-eof", "dit", struct.pack("<Q", 4096) + b"{}", "not a valid safetensors"),
        ("header-length-2^63", "dit", struct.pack("<Q", 1 << 63) + b"{" + b" " * 64, "not a valid safetensors"),
        ("header-length-over-100MB", "dit", struct.pack("<Q", 100_000_001) + b"{}", "not a valid safetensors"),
        ("header-not-utf8", "dit", join(b'{"\xff\xfe": 1}'), "corrupt safetensors header"),
        ("header-not-json", "dit", join(b"{this is not json}"), "corrupt safetensors header"),
        ("header-json-array", "dit", join(b"[1, 2, 3]"), "not a valid safetensors|corrupt safetensors header"),
        ("header-json-trailing-garbage", "dit", join(b'{"__metadata__": {}} xyz'), "corrupt safetensors header"),
        ("header-nested-100k", "dit", join(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested too deeply"),
        ("header-3M-numbers", "dit", join(b'{"__metadata__": {"a": "b"}, "x": [' + b"0," * 3_000_000 + b"0]}"),
         "holds .* values"),
        ("header-duplicate-name", "dit", join(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                              b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8),
         "appears twice"),
        ("entry-is-list", "dit", mutate(small, lambda h: h.update(a=[1, 2])), "corrupt header entry"),
        ("entry-no-dtype", "dit", mutate(small, lambda h: h["a"].pop("dtype")), "corrupt header entry"),
        ("dtype-is-number", "dit", mutate(small, entry(dtype=7)), "corrupt header entry"),
        ("dtype-unknown", "dit", mutate(small, entry(dtype="F128")), "not a safetensors type"),
        ("shape-is-string", "dit", mutate(small, entry(shape="2,3")), "invalid shape"),
        ("shape-negative", "dit", mutate(small, entry(shape=[-2, -3])), "invalid shape"),
        ("shape-float", "dit", mutate(small, entry(shape=[2.0, 3])), "invalid shape"),
        ("shape-bool", "dit", mutate(small, entry(shape=[True, 6])), "invalid shape"),
        ("shape-2^64-with-zero", "dit", mutate(small, lambda h: h.update(z={"dtype": "F32", "shape": [0, 2**64],
                                                                           "data_offsets": [0, 0]})), "invalid shape"),
        ("shape-overflowing-product", "dit", mutate(small, entry(shape=[2**40, 2**40])), "needs"),
        ("shape-100-dims", "dit", mutate(small, entry(shape=[1] * 100)), "invalid shape"),
        ("shape-missing", "dit", mutate(small, lambda h: h["a"].pop("shape")), "invalid shape"),
        ("offsets-missing", "dit", mutate(small, lambda h: h["a"].pop("data_offsets")), "invalid data offsets"),
        ("offsets-three", "dit", mutate(small, entry(data_offsets=[0, 24, 24])), "invalid data offsets"),
        ("offsets-strings", "dit", mutate(small, entry(data_offsets=["0", "24"])), "invalid data offsets"),
        ("offsets-float", "dit", mutate(small, entry(data_offsets=[0.0, 24.0])), "invalid data offsets"),
        ("offsets-nan", "dit", join(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [NaN, 4]}}', b"\0" * 4),
         "invalid data offsets"),
        ("offsets-negative", "dit", mutate(small, entry(data_offsets=[-24, 0])), "claims bytes"),
        ("offsets-reversed", "dit", mutate(small, entry(data_offsets=[24, 0])), "claims bytes"),
        ("offsets-2^70", "dit", mutate(small, entry(data_offsets=[2**70, 2**70 + 24])), "truncated|gap"),
        ("offsets-size-mismatch", "dit", mutate(small, entry(shape=[2, 2])), "needs 16"),
        ("offsets-overlap", "dit", mutate(small, lambda h: h["b"].update(data_offsets=[20, 24])), "overlaps"),
        ("offsets-repeat", "dit", mutate({"a": torch.ones(2), "b": torch.ones(2)},
                                         lambda h: h["b"].update(data_offsets=h["a"]["data_offsets"])), "overlaps|gap"),
        ("offsets-gap", "dit", mutate(small, lambda h: h["b"].update(data_offsets=[28, 32])), "gap|truncated"),
        ("subbyte-odd", "dit", join({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, b"\0"), "needs 1.5"),
        ("data-truncated", "dit", st_save(dit)[:-1000], "truncated: 1,000 bytes are missing"),
        ("data-trailing-bytes", "dit", st_save(dit) + b"\0" * 100, "100 bytes after its last tensor"),
        ("metadata-list", "dit", mutate(small, lambda h: h.update(__metadata__=["a"])), "metadata must map"),
        ("metadata-int-value", "dit", mutate(small, lambda h: h.update(__metadata__={"a": 1})), "metadata must map"),
        ("pickle-protocol-2", "dit", b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01u.", "never unpickled"),
        ("pickle-protocol-4", "dit", b"\x80\x04\x95" + b"\0" * 40, "never unpickled"),
        ("torch-zip", "dit", b"PK\x03\x04\x14\x00\x08\x08" + b"\0" * 100, "zip/pickle checkpoint"),
        ("gguf-magic", "dit", b"GGUF\x03\x00\x00\x00" + b"\0" * 100, "claims 0 tensors"),
        ("random-bytes", "dit", bytes(range(256)) * 4, "not a valid safetensors"),
        ("a-fifo", "dit", ("fifo",), "not a regular file"),
        ("link-to-dev-zero", "dit", ("link", "/dev/zero"), "not a regular file"),
        ("a-folder-named-safetensors", "meta", {"nothing.txt": b""}, "no .safetensors weights"),
        # -- a valid container with the wrong content ------------------------------------------------
        ("dit-absurd-layer-index", "dit", st_save(put(dit, **{"layers.999999999.ffn_norm1.weight": torch.ones(dim)})),
         "absurdly large"),
        ("dit-30-digit-index", "dit", st_save(put(dit, **{"layers." + "9" * 30 + ".ffn_norm1.weight": torch.ones(dim)})),
         "absurdly large"),
        ("dit-layer-gap", "dit", st_save(put(dit, **{"layers.5.ffn_norm1.weight": torch.ones(dim)})), "layer 2 is missing"),
        ("dit-refiner-index", "meta", st_save(put(dit, **{"noise_refiner.7.ffn_norm1.weight": torch.ones(dim)})),
         "noise refiner block 1 is missing"),
        ("dit-1d-embedder", "dit", st_save(put(dit, **{"cap_embedder.1.weight": torch.ones(dim)})), "sizes"),
        ("dit-head-dim-zero", "meta", st_save(put(dit, **{"layers.0.attention.q_norm.weight": torch.ones(0)})), "sizes"),
        ("dit-huge-claimed-dim", "meta", st_save(put(dit, **{"cap_embedder.1.weight": torch.ones(1 << 30, 0)})), "sizes"),
        ("dit-missing-tensor", "dit", st_save(drop(dit, "layers.1.feed_forward.w2.weight")), "missing"),
        ("dit-extra-tensor", "dit", st_save(put(dit, **{"vision_tower.x.weight": torch.ones(2)})), "do not belong"),
        ("dit-wrong-shape", "dit", st_save(put(dit, **{w: torch.ones(dim, dim + 1)})), "has shape"),
        ("dit-is-flux", "dit", st_save({"double_blocks.0.img_attn.qkv.weight": torch.ones(2, 2),
                                        "single_blocks.0.linear1.weight": torch.ones(2, 2)}), "looks like a FLUX.1"),
        ("dit-is-sdxl", "dit", st_save({"input_blocks.0.0.weight": torch.ones(2), "output_blocks.0.0.weight": torch.ones(2),
                                        "label_emb.0.0.weight": torch.ones(2)}), "looks like an SDXL"),
        ("dit-is-vae", "dit", st_save(vae), "looks like an autoencoder"),
        ("dit-is-text-encoder", "dit", st_save(te), "looks like a Qwen3"),
        ("dit-is-lora", "dit", st_save(lora_pair("layers.0.attention.to_q", 4, dim, dim)), "looks like a LoRA"),
        ("dit-is-nothing-known", "dit", st_save({"foo.bar": torch.ones(2)}), "no model family"),
        ("dit-fp8-scale-shape", "dit", st_save(put(dit, **{w: dit[w].to(torch.float8_e4m3fn),
                                                           "layers.0.attention.out.weight_scale": torch.ones(2)})),
         "fp8 scale .* has shape"),
        ("dit-fp8-scale-nan", "dit", st_save(put(dit, **{w: dit[w].to(torch.float8_e4m3fn),
                                                         "layers.0.attention.out.weight_scale": torch.tensor(float("nan"))})),
         "fp8 scale .* is nan"),
        ("dit-fp8-scale-negative", "dit", st_save(put(dit, **{w: dit[w].to(torch.float8_e4m3fn),
                                                              "layers.0.attention.out.scale_weight": torch.tensor(-1.0)})),
         "fp8 scale"),
        ("dit-unsupported-storage", "dit", st_save(put(dit, **{w: dit[w].to(torch.uint16)})), "storage type"),
        ("dit-unknown-quant-format", "dit", st_save(dit, metadata={"_quantization_metadata": json.dumps(
            {"layers": {"layers.0.attention.out": {"format": "nvfp9"}}})}), "nvfp9"),
        ("dit-comfy-quant-not-object", "dit", st_save(put(dit, **{"layers.0.attention.out.comfy_quant": torch.tensor(
            list(b"[1, 2]"), dtype=torch.uint8)})), "quantisation config"),
        ("dit-comfy-quant-float", "dit", st_save(put(dit, **{"layers.0.attention.out.comfy_quant": torch.ones(8)})),
         "unreadable quantisation config"),
        ("dit-broken-quant-metadata", "dit", st_save(dit, metadata={"_quantization_metadata": "{"}), "unreadable"),
        # -- ComfyUI's packed formats (quant_formats.py: layouts as comfy-kitchen writes them) -----------
        *[(f"comfy-{cid}", "dit", st_save(put(drop(dit, w), **layer)), why) for cid, layer, why in comfy_layers(w, dim)],
        ("comfy-metadata-layer-is-string", "dit", st_save(dit, metadata={"_quantization_metadata": json.dumps(
            {"layers": {"layers.0.attention.out": "nvfp4"}})}), "quantisation config"),
        # -- GGUF -------------------------------------------------------------------------------------
        *gguf_cases(b),
        # -- text encoder ----------------------------------------------------------------------------
        ("te-absurd-layer-index", "te", st_save(put(te, **{"model.layers.88888888.input_layernorm.weight": torch.ones(32)})),
         "absurdly large"),
        ("te-layer-gap", "te", st_save(put(te, **{"model.layers.9.input_layernorm.weight": torch.ones(32)})),
         "layer 2 is missing"),
        ("te-head-dim-zero", "te", st_save(put(te, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(0)})), "sizes"),
        ("te-missing-projection", "te", st_save(drop(te, "model.layers.0.self_attn.k_proj.weight")), "sizes|missing"),
        ("te-is-dit", "te", st_save(dit), "looks like a Z-Image transformer"),
        ("te-config-rope-string", "te", {"model.safetensors": st_save(te), "config.json": b'{"rope_theta": "big"}'},
         "rope_theta is 'big'"),
        ("te-config-eps-list", "te", {"model.safetensors": st_save(te), "config.json": b'{"rms_norm_eps": [1]}'},
         "rms_norm_eps"),
        ("te-config-rope-negative", "te", {"model.safetensors": st_save(te), "config.json": b'{"rope_theta": -5}'},
         "rope_theta is"),
        ("te-config-rope-parameters-string", "te", {"model.safetensors": st_save(te),
                                                    "config.json": b'{"rope_parameters": "x", "rms_norm_eps": true}'},
         "rms_norm_eps"),
        # -- autoencoder -----------------------------------------------------------------------------
        ("vae-absurd-level", "vae", st_save(put(vae, **{"encoder.down.4444444.block.0.conv1.weight": torch.ones(1)})),
         "absurdly large"),
        ("vae-level-gap", "vae", st_save(put(vae, **{"encoder.down.6.block.0.conv1.weight": torch.ones(1)})),
         "encoder level 4 is missing"),
        ("vae-sd-latents", "vae", st_save(put(vae, **{"decoder.conv_in.weight": torch.ones(64, 4, 3, 3)})),
         "4 latent channels"),
        ("vae-config-groups-zero", "vae", {"diffusion_pytorch_model.safetensors": st_save(vae),
                                           "config.json": b'{"latent_channels": 16, "norm_num_groups": 0}'},
         "norm_num_groups"),
        ("vae-config-groups-7", "vae", {"diffusion_pytorch_model.safetensors": st_save(vae),
                                        "config.json": b'{"latent_channels": 16, "norm_num_groups": 7}'},
         "normalisation groups"),
        ("vae-is-dit", "vae", st_save(dit), "looks like a Z-Image transformer"),
        # -- sharded folders -------------------------------------------------------------------------
        ("shards-index-list", "dit", {"a.safetensors": st_save(dit), "m.safetensors.index.json": b'{"weight_map": []}'},
         "unreadable shard index"),
        ("shards-index-escapes", "dit", {"a.safetensors": st_save(dit),
                                         "m.safetensors.index.json": b'{"weight_map": {"x": "../../etc/passwd"}}'},
         "unreadable shard index"),
        ("shards-index-not-json", "dit", {"a.safetensors": st_save(dit), "m.safetensors.index.json": b"{"},
         "unreadable shard index"),
        ("shards-missing", "dit", {"a.safetensors": st_save(dit),
                                   "m.safetensors.index.json": json.dumps({"weight_map": {"x": "b.safetensors"}}).encode()},
         "are missing"),
        ("shards-duplicate-tensor", "dit", {"a.safetensors": st_save(dit), "b.safetensors": st_save({w: dit[w]})},
         "both hold tensor"),
        ("shards-only-pickles", "dit", {"pytorch_model.bin": b"\x80\x02."}, "never unpickled"),
        # -- LoRA files ------------------------------------------------------------------------------
        ("lora-flux", "lora", st_save({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(4, 8),
                                       "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(8, 4)}),
         "is a LoRA for FLUX.1"),
        ("lora-flux-diffusers", "lora", st_save({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 8)}),
         "is a LoRA for FLUX.1"),
        ("lora-flux-double-blocks-only", "lora", st_save({"transformer.transformer_blocks.0.ff_context.net.0.proj.lora_A.weight":
                                                          torch.ones(4, 8)}), "is a LoRA for FLUX.1"),
        ("lora-lumina2", "lora", st_save(lora_pair("layers.0.attention.qkv", 4, 3 * 2304, 2304)), "Lumina-Image 2.0"),
        ("lora-sdxl", "lora", st_save({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.ones(4, 8)}), "SDXL"),
        ("lora-sd-text-encoder", "lora", st_save({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                                  torch.ones(4, 8)}), "text encoder"),
        ("lora-qwen-image", "lora", st_save({"transformer_blocks.0.img_mod.1.lora_A.weight": torch.ones(4, 8)}), "Qwen-Image"),
        ("lora-wan", "lora", st_save({"diffusion_model.blocks.0.cross_attn.k.lora_A.weight": torch.ones(4, 8)}), "Wan"),
        ("lora-is-full-model", "lora", st_save(dit), "a full Z-Image transformer, not a LoRA"),
        ("lora-matches-nothing", "lora", st_save({"foo.lora_A.weight": torch.ones(4, 8)}), "none of its 1 keys"),
        ("lora-only-alphas", "lora", st_save({"diffusion_model.layers.0.attention.out.alpha": torch.tensor(4.0)}),
         "hold no weight changes"),
        ("lora-rank-mismatch", "lora", st_save({"diffusion_model.layers.0.attention.out.lora_A.weight": torch.ones(4, dim),
                                                "diffusion_model.layers.0.attention.out.lora_B.weight": torch.ones(dim, 3)}),
         "rank mismatch"),
        ("lora-other-model-size", "lora", st_save(lora_pair("layers.0.attention.out", 4, 3840, 3840)), "different model size"),
        ("lora-down-only", "lora", st_save({"diffusion_model.layers.0.attention.out.lora_A.weight": torch.ones(4, dim)}),
         "has no up half"),
        ("lora-rank-5000", "lora", st_save(lora_pair("layers.0.attention.out", 5000, dim, dim)), "rank"),
        ("lora-3d-up", "lora", st_save({"diffusion_model.layers.0.attention.out.lora_A.weight": torch.ones(4, dim),
                                        "diffusion_model.layers.0.attention.out.lora_B.weight": torch.ones(dim, 4, 1)}),
         "low-rank pair"),
        ("lokr-half-missing", "lora", st_save({"lycoris_layers_0_attention_to_out_0.lokr_w1_a": torch.ones(4, 2),
                                               "lycoris_layers_0_attention_to_out_0.lokr_w2": torch.ones(16, 16)}),
         "but not lokr_w1_b"),
        ("lokr-absurd-factors", "lora", st_save({"lycoris_layers_0_attention_to_out_0.lokr_w1": torch.ones(300, 300),
                                                 "lycoris_layers_0_attention_to_out_0.lokr_w2": torch.ones(300, 300)}),
         "LoKr factors"),
        ("lokr-factor-3d", "lora", st_save({"lycoris_layers_0_attention_to_out_0.lokr_w1": torch.ones(4, 4, 1),
                                            "lycoris_layers_0_attention_to_out_0.lokr_w2": torch.ones(16, 16)}),
         "LoKr factors"),
        ("loha-half-missing", "lora", st_save({f"lycoris_layers_0_attention_to_out_0.hada_{k}": torch.ones(dim, 4)
                                               for k in ("w1_a", "w2_a")} |
                                              {"lycoris_layers_0_attention_to_out_0.hada_w1_b": torch.ones(4, dim)}),
         "but not hada_w2_b"),
        ("loha-inner-mismatch", "lora", st_save({"lycoris_layers_0_attention_to_out_0.hada_w1_a": torch.ones(dim, 4),
                                                 "lycoris_layers_0_attention_to_out_0.hada_w1_b": torch.ones(5, dim),
                                                 "lycoris_layers_0_attention_to_out_0.hada_w2_a": torch.ones(dim, 4),
                                                 "lycoris_layers_0_attention_to_out_0.hada_w2_b": torch.ones(4, dim)}),
         "do not multiply"),
        ("lora-alpha-empty", "lora", st_save(put(lora_pair("layers.0.attention.out", 4, dim, dim),
                                                 **{"diffusion_model.layers.0.attention.out.alpha": torch.ones(0)})),
         "alpha is one number"),
        ("lora-alpha-vector", "lora", st_save(put(lora_pair("layers.0.attention.out", 4, dim, dim),
                                                  **{"diffusion_model.layers.0.attention.out.alpha": torch.ones(1000)})),
         "alpha is one number"),
        ("lora-alpha-nan", "lora", st_save(put(lora_pair("layers.0.attention.out", 4, dim, dim),
                                               **{"diffusion_model.layers.0.attention.out.alpha": torch.tensor(float("inf"))})),
         "damaged"),
        ("lora-metadata-not-json", "lora", st_save(lora_pair("layers.0.attention.out", 4, dim, dim, "transformer."),
                                                   metadata={"lora_adapter_metadata": "{oops"}), "not readable JSON"),
        ("lora-metadata-alpha-string", "lora", st_save(lora_pair("layers.0.attention.out", 4, dim, dim, "transformer."),
                                                       metadata={"lora_adapter_metadata": '{"transformer.lora_alpha": "x"}'}),
         "lora_alpha"),
        ("lora-metadata-pattern-list", "lora", st_save(lora_pair("layers.0.attention.out", 4, dim, dim, "transformer."),
                                                       metadata={"lora_adapter_metadata": '{"transformer.alpha_pattern": [1]}'}),
         "alpha_pattern"),
        ("lora-dora", "lora", st_save(put(lora_pair("layers.0.attention.out", 4, dim, dim),
                                          **{"diffusion_model.layers.0.attention.out.dora_scale": torch.ones(dim, 1)})),
         "DoRA"),
        ("lora-diff-wrong-shape", "lora", st_save({"diffusion_model.layers.0.attention_norm1.diff": torch.ones(dim + 1)}),
         "expected"),
        ("lora-diff-b-without-bias", "lora", st_save({"diffusion_model.layers.0.attention.qkv.diff_b": torch.ones(3 * dim)}),
         "has no bias"),
        ("lora-diff-b-wrong-shape", "lora", st_save({"diffusion_model.x_embedder.diff_b": torch.ones(7)}), "has a bias of"),
        ("lora-all-zero", "lora", st_save({k: torch.zeros_like(v) for k, v in
                                           lora_pair("layers.0.attention.out", 4, dim, dim).items()}), "every weight change"),
        ("lora-nan-weights", "lora", st_save(put(lora_pair("layers.0.attention.out", 4, dim, dim), **{
            "diffusion_model.layers.0.attention.out.lora_B.weight": torch.full((dim, 4), float("nan"))})), "NaN/inf"),
        ("lora-truncated", "lora", st_save(lora_pair("layers.0.attention.out", 4, dim, dim))[:-10], "truncated"),
        # -- tokenizer folders -----------------------------------------------------------------------
        ("tokenizer-json-broken", "tokenizer", {"tokenizer.json": b'{"model": 3}'}, "not a readable tokenizer"),
        ("tokenizer-vocab-list", "tokenizer", {"vocab.json": b"[1, 2]", "merges.txt": b"a b\n"}, "damaged"),
        ("tokenizer-merges-three", "tokenizer", {"vocab.json": b'{"a": 0, "b": 1}', "merges.txt": b"a b c\n"}, "damaged"),
        ("tokenizer-config-not-json", "tokenizer", {"vocab.json": b'{"a": 0}', "merges.txt": b"",
                                                    "tokenizer_config.json": b"{"}, "damaged"),
    ]
    return cases


def comfy_quant(fmt: str, **extra) -> torch.Tensor:
    """A layer's ``comfy_quant`` config tensor: JSON bytes in uint8, as ComfyUI's ``MixedPrecisionOps`` writes it."""
    return torch.tensor(list(json.dumps({"format": fmt, **extra}).encode()), dtype=torch.uint8)


def comfy_layers(w: str, dim: int) -> list[tuple[str, dict, str]]:
    """One packed layer ``w`` (dim × dim) per case, each wrong in one way (id, tensors, message pattern)."""
    layer, g = w[: -len(".weight")], torch.Generator().manual_seed(5)
    u8 = lambda *shape: torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)  # noqa: E731
    tiles = lambda rows, cols: u8(-(-rows // 128) * 128, -(-cols // 4) * 4).view(torch.float8_e4m3fn)  # noqa: E731
    nvfp4 = {w: u8(dim, dim // 2), f"{w}_scale": tiles(dim, dim // 16), f"{w}_scale_2": torch.tensor(0.01),
             f"{layer}.comfy_quant": comfy_quant("nvfp4")}
    int8 = {w: u8(dim, dim).view(torch.int8), f"{w}_scale": torch.full((dim, 1), 0.01),
            f"{layer}.comfy_quant": comfy_quant("int8_tensorwise")}
    w4a8 = {w: u8(dim, dim // 2), f"{w}_s_rel": u8(dim, dim // 16).view(torch.float8_e4m3fn),
            f"{w}_s_channel": torch.full((dim,), 0.01), f"{layer}.comfy_quant": comfy_quant("asym_w4a8_int8", group_size=16,
                                                                                         convrot_groupsize=16)}
    return [
        ("nvfp4-unswizzled-scales", {**nvfp4, f"{w}_scale": u8(dim, dim // 16).view(torch.float8_e4m3fn)},
         "weight_scale has shape .*expected"),
        ("nvfp4-no-second-scale", drop(nvfp4, f"{w}_scale_2"), "has no weight_scale_2"),
        ("nvfp4-vector-second-scale", {**nvfp4, f"{w}_scale_2": torch.ones(3)}, "weight_scale_2 has shape"),
        ("nvfp4-bf16-data", {**nvfp4, w: torch.ones(dim, dim // 2, dtype=torch.bfloat16)}, "not a matrix of bytes"),
        ("int8-scale-of-7", {**int8, f"{w}_scale": torch.ones(7)}, "does not scale"),
        ("int8-convrot-group-6", {**int8, f"{layer}.comfy_quant": comfy_quant("int8_tensorwise", convrot=True,
                                                                             convrot_groupsize=6)}, "not a power of 4"),
        ("int8-group-size-text", {**int8, f"{layer}.comfy_quant": comfy_quant("int8_tensorwise", convrot=True,
                                                                             convrot_groupsize="big")}, "group size"),
        ("int8-input-scale-vector", {**int8, f"{layer}.input_scale": torch.ones(dim)}, "input_scale has shape"),
        ("mxfp8-no-scale", {w: u8(dim, dim).view(torch.float8_e4m3fn), f"{layer}.comfy_quant": comfy_quant("mxfp8")},
         "has no weight_scale"),
        ("w4a8-s-rel-transposed", {**w4a8, f"{w}_s_rel": u8(dim // 16, dim).view(torch.float8_e4m3fn)},
         r"weight_s_rel has shape \[4, 64\], expected \[64, 4\]"),
        ("w4a8-codebook-of-8", {**w4a8, f"{w}_codebook": torch.ones(8)}, "weight_codebook"),
    ]


def gguf_cases(b) -> list[tuple[str, str, bytes, str]]:
    """GGUF files damaged or crafted in the ways a broken download, a hand edit or a hostile file would."""
    g = b["gguf_dit"]
    q = "layers.0.attention.out.weight"  # a quantised 64×64 matrix
    other = next(n for n in g.info if n != q)
    return [
        ("gguf-truncated-data", "dit", g.blob[:-1000], "truncated: 1,000 bytes are missing"),
        ("gguf-truncated-header", "dit", g.blob[:200], "not a readable GGUF|truncated"),
        ("gguf-20-bytes", "dit", g.blob[:20], "truncated GGUF"),
        ("gguf-2^40-tensors", "dit", gguf_head(1 << 40, 0) + b"\0" * 64, "claims"),
        ("gguf-2^40-fields", "dit", gguf_head(1, 1 << 40) + b"\0" * 64, "claims"),
        ("gguf-version-99", "dit", gguf_head(1, 0, version=99) + b"\0" * 64, "not a readable GGUF"),
        ("gguf-metadata-bomb", "dit", gguf_head(1, 1) + gguf_string("bomb") + struct.pack("<IIQ", 9, 0, 1_100_000)
         + b"\0" * 1_100_000, "more than 1,000,000 values"),
        ("gguf-nested-arrays", "dit", gguf_head(1, 1) + gguf_string("deep") + struct.pack("<I", 9)
         + struct.pack("<IQ", 9, 1) * 5000, "not a readable GGUF"),
        ("gguf-field-type-77", "dit", gguf_head(1, 1) + gguf_string("x") + struct.pack("<I", 77) + b"\0" * 32,
         "not a readable GGUF"),
        ("gguf-type-9999", "dit", g.patch(q, qtype=9999), "GGML type number 9999"),
        ("gguf-type-unsupported", "dit", g.patch(q, qtype=int(QT.TQ1_0)), "TQ1_0, a GGUF type this pack does not run"),
        ("gguf-shape-2^62", "dit", g.patch(q, dims=[64, 1 << 62]), "invalid shape"),
        ("gguf-shape-zero", "dit", g.patch(q, dims=[64, 0]), "invalid shape"),
        ("gguf-row-not-whole-blocks", "dit", g.patch(q, dims=[48, 64]), "invalid shape|claims bytes|overlaps"),
        ("gguf-offsets-overlap", "dit", g.patch(q, offset=g.info[other][2]), "overlaps"),
        ("gguf-offset-past-end", "dit", g.patch(q, offset=1 << 50), "truncated"),
        ("gguf-name-not-utf8", "dit", g.patch(q, name_byte=0xFF), "not a readable GGUF"),
        ("gguf-orig-shape-wrong", "dit", b["gguf_orig_shape"], "orig_shape"),
        ("gguf-flux", "dit", b["gguf_flux"], "looks like a FLUX.1"),
        ("gguf-te-as-dit", "dit", b["gguf_te"], "looks like a Qwen3"),
        ("gguf-dit-as-te", "te", g.blob, "looks like a Z-Image transformer"),
        ("gguf-te-rope-negative", "te", b["gguf_te_rope"], "rope_theta = .-5.0"),
        ("gguf-as-lora", "lora", g.blob, "a full Z-Image transformer, not a LoRA"),
    ]


def control_cases(b) -> list[tuple[str, str, object, str | None]]:
    """Valid files that must load (id, loader, bytes/folder, digest for header-only reads)."""
    small = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "i": torch.arange(5, dtype=torch.int64),
             "z": torch.ones(0, 7), "s": torch.tensor(3.5, dtype=torch.bfloat16), "名前": torch.ones(2, dtype=torch.float16)}
    h, data = split(st_save(small))
    base = len(json.dumps(h))
    digest = hashlib.sha256()
    for k in sorted(small):
        digest.update(k.encode() + small[k].reshape(-1).view(torch.uint8).numpy().tobytes())
    want = digest.hexdigest()
    # header lengths of every value modulo 256 (the low byte is the file's first byte), plus those whose first two
    # bytes are a pickle's PROTO opcode (0x80 0x02..0x05), which an over-eager pickle sniffer refuses
    lengths = sorted(set(range(max(base, 512), max(base, 512) + 256)) | {0x280, 0x380, 0x480, 0x580, 0x4b50})
    cases = [(f"header-length-{n}", "header", join(h, data, pad_to=n), want) for n in lengths if n >= base]
    cases += [
        ("metadata-null", "header", join({**h, "__metadata__": None}, data), want),
        ("metadata-20MB", "header", join({"__metadata__": {"ss_tag_frequency": "x" * 20_000_000}, **h}, data), want),
        ("dit-pickle-looking-header", "dit", join(split(st_save(b["dit"]))[0], split(st_save(b["dit"]))[1], pad_to=0x280 + 0x10000),
         None),
        ("dit", "dit", st_save(b["dit"]), None),
        ("dit-meta", "meta", st_save(b["dit"]), None),
        ("te", "te", st_save(b["te"]), None),
        ("vae", "vae", st_save(b["vae"]), None),
        ("tokenizer-bundled", "tokenizer", None, None),
        ("gguf-dit", "dit", b["gguf_dit"].blob, None),
        ("gguf-dit-meta", "meta", b["gguf_dit"].blob, None),
        ("gguf-te", "te", b["gguf_te"], None),
    ]
    return cases


def materialise(root, cid, content) -> str:
    path = os.path.join(root, cid)
    if content is None:  # no explicit folder: the package's own tokenizer
        return ""
    if isinstance(content, tuple):  # a special file: ("fifo",) or ("link", target)
        path += ".safetensors"
        os.mkfifo(path) if content[0] == "fifo" else os.symlink(content[1], path)
        return path
    if isinstance(content, dict):
        os.makedirs(path, exist_ok=True)
        for name, blob in content.items():
            with open(os.path.join(path, name), "wb") as f:
                f.write(blob)
        return path
    path += ".gguf" if content[:4] == b"GGUF" else ".safetensors"
    with open(path, "wb") as f:
        f.write(content)
    return path


def run_batches(cases: list[dict]) -> dict[str, dict]:
    """Run the cases in BATCHES subprocesses (two at a time); a batch that dies reports its unfinished cases."""
    script = RUNNER.replace("__LIMIT__", str(MEMORY_LIMIT)).replace("__SECONDS__", str(CASE_SECONDS))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results: dict[str, dict] = {}
    chunks = [cases[i::BATCHES] for i in range(BATCHES)]
    for pair in (chunks[:2], chunks[2:]):
        procs = []
        for chunk in pair:
            listing = os.path.join(os.path.dirname(chunk[0]["model"]), f"batch-{chunk[0]['id']}.json")
            with open(listing, "w") as f:
                json.dump(chunk, f)
            procs.append((subprocess.Popen([sys.executable, "-c", script, listing], stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, env=env, text=True), chunk))
        for proc, chunk in procs:
            try:
                out, err = proc.communicate(timeout=BATCH_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            for line in out.splitlines():
                r = json.loads(line)
                results[r["id"]] = r
            for c in chunk:
                if c["id"] not in results:  # the first unreported case killed the process (or it hung)
                    results[c["id"]] = {"outcome": f"died (exit {proc.returncode})", "message": err[-800:]}
                    break
            for c in chunk:
                results.setdefault(c["id"], {"outcome": "not run: an earlier case in its batch died"})
    return results


@pytest.fixture(scope="module")
def outcomes(bases, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad"))
    model = materialise(root, "base-model", st_save(bases["dit"]))
    table = {}
    for cid, kind, content, expect in bad_cases(bases) + control_cases(bases):
        table[cid] = (kind, materialise(root, cid, content), expect)
    cases = [{"id": cid, "kind": k, "path": p, "model": model} for cid, (k, p, _) in table.items()]
    return table, run_batches(cases)


def test_enough_cases(bases):
    assert len(bad_cases(bases)) >= 80


def test_every_bad_file_gets_a_clear_error_naming_it(outcomes, bases):
    table, results = outcomes
    failures = []
    for cid, _, _, pattern in bad_cases(bases):
        kind, path, _ = table[cid]
        r = results[cid]
        name = os.path.basename(path)
        if r["outcome"] != "error" or name not in r["message"] or not re.search(pattern, r["message"]):
            failures.append(f"{cid}: {r['outcome']}: {r.get('message', '')[:300]}")
    assert not failures, "\n".join(failures)


def test_every_valid_file_loads_and_reads_back_exactly(outcomes, bases):
    table, results = outcomes
    failures = []
    for cid, _, _, digest in control_cases(bases):
        r = results[cid]
        if r["outcome"] != "loaded" or (digest is not None and r["digest"] != digest):
            failures.append(f"{cid}: {r['outcome']}: {r.get('message', '')[:300]}")
    assert not failures, "\n".join(failures)


CHANGED_ON_DISK = r"""
import os, sys, torch, zimage_core as zc
from zimage_core.safetensors_io import open_file
p = sys.argv[1]
m = zc.load_transformer(p, dtype=torch.float32)
f = open_file(p)
g = torch.Generator().manual_seed(0)
x, t, cap = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), [torch.randn(5, 32, generator=g)]
with torch.no_grad():
    before = m(x, t, cap)
    os.truncate(p, 4096)  # a download restarted in place: pages past the new end would SIGBUS a mapping
    with open(p, "r+b") as fh:
        fh.write(b"\xff" * 4096)
    after = m(x, t, cap)
print("SAME" if torch.equal(before, after) else "CHANGED")
try:
    f.get(f.keys()[0])
except zc.ZImageError as e:
    print("REFUSED", e)
"""


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_a_file_changed_on_disk_after_loading_changes_nothing(bases, tmp_path, fmt):
    """Weights live in memory the model owns (GGUF blocks too): truncating and rewriting the file later can neither
    crash the process (SIGBUS) nor change the loaded model, and reading on from the changed file is refused by name."""
    path = tmp_path / f"z.{fmt}"
    path.write_bytes(st_save(bases["dit"]) if fmt == "safetensors" else bases["gguf_dit"].blob)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CHANGED_ON_DISK, str(path)], capture_output=True, text=True,
                       timeout=BATCH_SECONDS, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SAME" in r.stdout and "REFUSED" in r.stdout and f"z.{fmt} was replaced, changed or removed" in r.stdout
