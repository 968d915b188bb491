"""GGUF files: our torch expansion equals gguf's own reference (``gguf.quants.dequantize``) bit for bit; tiny
Z-Image and Qwen3 models written with gguf's writer (real tensor names, several quant types in one file) equal
the same expanded weights loaded from safetensors; streaming moves quantised bytes; LoRA runs as patches.

Files are made as the real tools make them: DiT files as city96/ComfyUI-GGUF ``tools/convert.py`` writes them
(``GGUFWriter(arch="lumina2")``, ComfyUI key names, 1-D and tiny tensors in F32), text encoders with the
names llama.cpp's ``convert_hf_to_gguf.py`` gives (gguf-py ``tensor_mapping.py``, ``get_tensor_name_map``).
Quantised blocks are random bytes (gguf-py quantises only some types), with sensible f16 scales."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import save_file
from tiny import comfyui_state_dict, diffusers_transformer, rel_err, tiny_qwen

import zimage_core as zc
from zimage_core.ggml import EXPAND, GGMLFormat
from zimage_core.lora import LoraPatcher, read_lora
from zimage_core.offload import BlockStreamer, module_bytes, plan_offload
from zimage_core.packed import Packed, Stacked
from zimage_core.transformer_files import meta_transformer

# Byte offsets of the f16 scale fields (d, and dmin or m) in one block: gguf/quants.py dequantize_blocks' hsplits.
SCALE_AT = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.IQ4_NL: (0,),
            QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.IQ4_XS: (0,)}
# Typical |quantised value × sub-block scale| per type, so random blocks make weights of about 1/sqrt(fan-in).
GAIN = {QT.Q8_0: 64, QT.Q4_0: 4, QT.Q4_1: 8, QT.Q5_0: 8, QT.Q5_1: 16, QT.IQ4_NL: 64, QT.Q2_K: 12, QT.Q3_K: 32,
        QT.Q4_K: 256, QT.Q5_K: 512, QT.Q6_K: 1024, QT.IQ4_XS: 1024}
EDGE_F16 = np.array([0.0, -0.0, 65504.0, -65504.0, 2.0**-24, np.inf, -np.inf, np.nan, 1.0, -1.0], dtype=np.float16)


def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """rows × cols weights as random blocks (uint8 rows × bytes) whose scales give entries of about 1/sqrt(cols)."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // bs, ts), dtype=np.uint8)
    for off in SCALE_AT[qtype]:
        d = (rng.uniform(0.5, 1.5, raw.shape[0]) / (GAIN[qtype] * cols**0.5)).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def bits(a: np.ndarray) -> np.ndarray:
    """float32 bit patterns, every NaN as one pattern."""
    return np.where(np.isnan(a), np.float32(np.nan), a).astype(np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", list(EXPAND), ids=lambda q: q.name)
def test_expansion_equals_gguf_reference_bit_for_bit(qtype):
    rng = np.random.default_rng(int(qtype))
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (48, 3 * ts), dtype=np.uint8)  # 48 rows of 3 blocks, every byte random
    raw[0], raw[1] = 0, 255
    for i, v in enumerate(EDGE_F16):  # scale fields at zero, ±max, subnormal, ±inf, NaN
        for off in SCALE_AT[qtype]:
            raw[2 + i].reshape(3, ts)[:, off:off + 2] = np.frombuffer(v.tobytes(), np.uint8)
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(raw, qtype)
    packed = Packed(GGMLFormat(int(qtype)), (48, 3 * bs), {"blocks": torch.from_numpy(raw)})
    assert np.array_equal(bits(packed.dequantize(torch.float32).numpy()), bits(want))
    rows = torch.tensor([5, 0, 47, 5])  # rows stay whole blocks: gathered without expanding the rest
    assert np.array_equal(bits(packed.rows(rows).dequantize(torch.float32).numpy()), bits(want[rows.numpy()]))
    assert packed.nbytes == raw.nbytes


def _types_for(cols: int, cycle: list) -> list:
    return [q for q in cycle if cols % gguf.GGML_QUANT_SIZES[q][0] == 0]


def write_gguf(path, arch: str, tensors: dict, meta=None) -> str:
    """tensors: name → (float32 array, qtype); quantised types get random blocks. Returns the path."""
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


DIT = dict(dim=256, n_heads=8, n_kv_heads=8)  # head dim 32 = RoPE axes 8+12+12; rows of 256 take the K types
DIT_TYPES = [QT.Q4_K, QT.Q8_0, QT.Q6_K, QT.Q5_K, QT.Q3_K, QT.Q2_K, QT.IQ4_XS, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1, QT.IQ4_NL]


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory):
    """The same tiny DiT as GGUF (ComfyUI names; and diffusers names) and as expanded-float32 safetensors."""
    tmp = tmp_path_factory.mktemp("gguf_dit")
    ref = diffusers_transformer(seed=3, **DIT)
    comfy = comfyui_state_dict(ref.state_dict())
    tensors, truth = quantise_state_dict(comfy, 0, DIT_TYPES)
    bf16 = truth["noise_refiner.0.feed_forward.w2.weight"].bfloat16()  # one BF16 tensor, as BF16 conversions have
    tensors["noise_refiner.0.feed_forward.w2.weight"] = (gguf.quants.quantize(bf16.float().numpy(), QT.BF16), QT.BF16)
    truth["noise_refiner.0.feed_forward.w2.weight"] = bf16
    save_file({k: v.contiguous() for k, v in truth.items()}, str(tmp / "truth.safetensors"))
    comfy_path = write_gguf(tmp / "z_image_turbo-Q4_K_M.gguf", "lumina2", tensors)
    # diffusers names: the fused qkv split back into to_q/to_k/to_v (each its own type, as a converter may leave it)
    diff = {}
    for name, (arr, qt) in tensors.items():
        if name.endswith(".attention.qkv.weight"):
            base = name[: -len("qkv.weight")]
            t = truth[name]
            for j, p in enumerate(("to_q", "to_k", "to_v")):
                qt_p = [QT.Q8_0, QT.Q4_K, QT.F16][j]
                part = t[j * 256:(j + 1) * 256].numpy()
                raw = part if qt_p == QT.F16 else random_blocks(qt_p, 256, 256, np.random.default_rng(j))
                diff[f"{base}{p}.weight"] = (raw, qt_p)
                truth_part = part.astype(np.float16).astype(np.float32) if qt_p == QT.F16 else gguf.quants.dequantize(raw, qt_p)
                t[j * 256:(j + 1) * 256] = torch.from_numpy(truth_part.copy())
            continue
        name = name.replace("x_embedder.", "all_x_embedder.2-1.").replace("final_layer.", "all_final_layer.2-1.")
        name = name.replace(".attention.out.", ".attention.to_out.0.").replace(".q_norm.", ".norm_q.").replace(".k_norm.", ".norm_k.")
        diff[name] = (arr, qt)
    save_file({k: v.contiguous() for k, v in truth.items()}, str(tmp / "truth_diffusers_split.safetensors"))
    diff_path = write_gguf(tmp / "z_image_diffusers-Q8_0.gguf", "lumina2", diff)
    return {"comfyui": (comfy_path, str(tmp / "truth.safetensors")),
            "diffusers": (diff_path, str(tmp / "truth_diffusers_split.safetensors"))}


def dit_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.9]), [torch.randn(7, 32, generator=g), torch.randn(20, 32, generator=g)]


@pytest.mark.parametrize("naming", ["comfyui", "diffusers"])
def test_gguf_transformer_equals_its_expanded_weights(dit_files, naming):
    path, truth_path = dit_files[naming]
    model = zc.load_transformer(path, dtype=torch.float32)
    truth = zc.load_transformer(truth_path, dtype=torch.float32)
    blk = model.layers[0]
    assert isinstance(blk.attention.qkv.weight, Packed) and isinstance(blk.feed_forward.w1.weight, Packed)
    if naming == "diffusers":
        assert isinstance(blk.attention.qkv.weight.fmt, Stacked)  # q, k, v of different types stay packed
    with torch.inference_mode():
        out, want = model(*dit_inputs()), truth(*dit_inputs())
    assert rel_err(out, want) <= 1e-6
    meta = meta_transformer(path, dtype=torch.float32)  # the plan the loader node shows before loading counts the same packed bytes
    assert [module_bytes(b) for b in meta.blocks()] == [module_bytes(b) for b in model.blocks()]


def test_streamed_bytes_are_the_quantised_bytes(dit_files):
    path = dit_files["comfyui"][0]
    model = zc.load_transformer(path, dtype=torch.float32)
    files = gguf.GGUFReader(path)
    block_prefixes = ("layers.", "noise_refiner.", "context_refiner.")
    in_file = sum(int(t.n_bytes) for t in files.tensors if t.name.startswith(block_prefixes))
    plan = plan_offload(model, mode="min_vram", device="cpu")
    assert plan.streamed_bytes == in_file  # norms are F32 in the file and fp32 in compute: bytes as stored
    resident = BlockStreamer(model, plan_offload(model, mode="resident", device="cpu")).attach()
    with torch.inference_mode():
        want = model(*dit_inputs())
    resident.detach()
    st = BlockStreamer(model, plan, cyclic=False).attach()
    with torch.inference_mode():
        got = model(*dit_inputs())
    assert st.copied_bytes == in_file and torch.equal(got, want)
    st.detach()


def test_lora_on_gguf_is_a_runtime_patch_in_every_dialect(dit_files, tmp_path):
    from test_lora import DIALECTS, targets, write

    path, truth_path = dit_files["comfyui"]
    ref = diffusers_transformer(seed=3, **DIT)
    g = torch.Generator().manual_seed(7)
    deltas = {n: (torch.randn(4, i, generator=g) * 0.05, torch.randn(o, 4, generator=g) * 0.05) for n, (o, i) in targets(ref).items()}
    model = zc.load_transformer(path, dtype=torch.float32)
    truth = zc.load_transformer(truth_path, dtype=torch.float32)
    packed = model.layers[0].attention.qkv.weight
    for dialect, make in DIALECTS.items():
        lf = write(tmp_path, f"{dialect}.safetensors", make(deltas))
        LoraPatcher.of(model).apply([(read_lora(lf, model), 0.8)])
        LoraPatcher.of(truth).apply([(read_lora(lf, truth), 0.8)])
        assert model.layers[0].attention.qkv.weight is packed and model.layers[0].attention.qkv.patches, dialect
        patched = [(n, m) for n, m in model.named_modules() if getattr(m, "patches", None)]
        assert len(patched) == sum(1 for n, m in model.named_modules() if isinstance(m.__dict__.get("weight"), Packed)
                                   and "final_layer" not in n and ("attention." in n or "feed_forward." in n or "adaLN" in n)), dialect
        with torch.inference_mode():
            for name, m in patched:  # each patched layer equals the merged float32 layer
                x = torch.randn(3, m.in_features, generator=g)
                assert rel_err(m(x), truth.get_submodule(name)(x)) < 1e-5, (dialect, name)
            if dialect == "diffusers":
                assert rel_err(model(*dit_inputs()), truth(*dit_inputs())) < 1e-5
    LoraPatcher.of(model).apply([])
    assert not model.layers[0].attention.qkv.patches


QWEN_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q5_1, QT.IQ4_NL, QT.Q4_1, QT.Q5_0]


def test_gguf_text_encoder_with_llama_cpp_names(tmp_path, tokenizer_dir):
    hf = tiny_qwen(0, layers=3)
    sd = {"model." + k: v for k, v in hf.state_dict().items()}
    tensors, truth = quantise_state_dict(sd, 1, QWEN_TYPES)
    # q, k, v of different types (fused into one packed qkv of parts), gate and up of one type (one block array)
    rng = np.random.default_rng(5)
    for i in range(3):
        for part, qt in (("self_attn.q_proj", QT.Q4_0), ("self_attn.k_proj", QT.Q8_0), ("self_attn.v_proj", QT.Q5_1),
                         ("mlp.gate_proj", QT.Q4_1), ("mlp.up_proj", QT.Q4_1)):
            name = f"model.layers.{i}.{part}.weight"
            rows, cols = truth[name].shape
            raw = random_blocks(qt, rows, cols, rng)
            tensors[name], truth[name] = (raw, qt), torch.from_numpy(gguf.quants.dequantize(raw, qt).copy())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 3)
    cpp = {names.get_name(k, try_suffixes=(".weight",)): v for k, v in tensors.items()}
    assert "blk.0.attn_q.weight" in cpp and "token_embd.weight" in cpp and "blk.2.ffn_norm.weight" in cpp
    path = write_gguf(tmp_path / "Qwen3-4B-Q4_K_M.gguf", "qwen3", cpp,
                      {"add_rope_freq_base": (1e6,), "add_layer_norm_rms_eps": (1e-6,), "add_block_count": (3,)})
    save_file({k: v.contiguous() for k, v in truth.items()}, str(tmp_path / "truth.safetensors"))
    te = zc.load_text_encoder(path, dtype=torch.float32, tokenizer=tokenizer_dir)
    want = zc.load_text_encoder(str(tmp_path / "truth.safetensors"), dtype=torch.float32, tokenizer=tokenizer_dir)
    attn = te.layers[0].self_attn.qkv_proj.weight
    assert isinstance(attn.fmt, Stacked) and te.layers[0].mlp.gate_up_proj.weight.fmt == GGMLFormat(int(QT.Q4_1))
    assert isinstance(te.embed_tokens.weight, Packed)  # the 151k-row table stays quantised; rows expand on lookup
    prompts = ["a red fox asleep on a mossy stone", "一只猫"]
    for a, b in zip(te.encode(prompts), want.encode(prompts)):
        assert rel_err(a, b) <= 1e-6


def test_wrong_and_unsupported_files_are_named(tmp_path, dit_files):
    qwen = write_gguf(tmp_path / "qwen.gguf", "qwen3", {
        "token_embd.weight": (np.zeros((64, 32), np.float32), QT.F32),
        "blk.0.attn_q.weight": (np.zeros((32, 32), np.float32), QT.F32),
        "blk.0.attn_q_norm.weight": (np.zeros(8, np.float32), QT.F32),
        "blk.0.ffn_gate.weight": (np.zeros((48, 32), np.float32), QT.F32)})
    with pytest.raises(zc.ZImageError, match="Qwen3 language model"):
        zc.load_transformer(qwen)
    with pytest.raises(zc.ZImageError, match="looks like a Z-Image transformer"):
        zc.load_text_encoder(dit_files["comfyui"][0])
    flux = write_gguf(tmp_path / "flux1-dev-Q4_0.gguf", "flux", {
        "double_blocks.0.img_attn.qkv.weight": (np.zeros((96, 32), np.float32), QT.F32),
        "single_blocks.0.linear1.weight": (np.zeros((96, 32), np.float32), QT.F32)})
    with pytest.raises(zc.ZImageError, match="FLUX"):
        zc.load_transformer(flux)
    tq = gguf.quants.quantize(np.zeros((4, 256), np.float32), QT.TQ2_0)
    odd = write_gguf(tmp_path / "odd.gguf", "lumina2", {"cap_embedder.1.weight": (tq, QT.TQ2_0)})
    with pytest.raises(zc.ZImageError, match="TQ2_0"):
        zc.load_transformer(odd)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(open(dit_files["comfyui"][0], "rb").read()[:3000])
    with pytest.raises(zc.ZImageError, match="broken.gguf"):
        zc.load_transformer(str(broken))
