"""GGUF files: our torch expansion equals gguf's own reference (``gguf.quants.dequantize``) bit for bit; tiny
Z-Image and Qwen3 models written with gguf's writer (real tensor names, several quant types in one file, see
tiny_gguf.py) equal the same expanded weights loaded from safetensors; streaming moves quantised bytes; LoRA
runs as patches."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import save_file
from tiny import comfyui_state_dict, diffusers_transformer, rel_err, tiny_qwen
from tiny_gguf import DIT_TYPES, SCALE_AT, quantise_state_dict, random_blocks, save_qwen_gguf, write_gguf

import zimage_core as zc
from zimage_core.ggml import EXPAND, GGMLFormat
from zimage_core.lora import LoraPatcher, read_lora
from zimage_core.offload import BlockStreamer, module_bytes, plan_offload
from zimage_core.packed import Packed, Stacked
from zimage_core.transformer_files import meta_transformer

EDGE_F16 = np.array([0.0, -0.0, 65504.0, -65504.0, 2.0**-24, np.inf, -np.inf, np.nan, 1.0, -1.0], dtype=np.float16)


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


DIT = dict(dim=256, n_heads=8, n_kv_heads=8)  # head dim 32 = RoPE axes 8+12+12; rows of 256 take the K types


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
    assert st.ledger.now == plan.fixed_bytes  # packed embedders and final layer placed as the plan counts them
    with torch.inference_mode():
        got = model(*dit_inputs())
    assert st.copied_bytes == in_file and torch.equal(got, want)
    assert st.ledger.peak <= plan.fixed_bytes + plan.buffer_bytes  # Executor.begin: never more than prefetch+1 in flight
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


def test_gguf_text_encoder_with_llama_cpp_names(tmp_path, tokenizer_dir):
    # q, k, v of different types (fused into one packed qkv of parts), gate and up of one type (one block array)
    parts = (("self_attn.q_proj", QT.Q4_0), ("self_attn.k_proj", QT.Q8_0), ("self_attn.v_proj", QT.Q5_1),
             ("mlp.gate_proj", QT.Q4_1), ("mlp.up_proj", QT.Q4_1))
    path, truth = str(tmp_path / "Qwen3-4B-Q4_K_M.gguf"), str(tmp_path / "truth.safetensors")
    save_qwen_gguf(tiny_qwen(0, layers=3), path, truth, parts=parts)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.attn_q.weight", "token_embd.weight", "blk.2.ffn_norm.weight", "output_norm.weight"} <= names
    te = zc.load_text_encoder(path, dtype=torch.float32, tokenizer=tokenizer_dir)
    want = zc.load_text_encoder(truth, dtype=torch.float32, tokenizer=tokenizer_dir)
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


def test_cli_info_names_the_quant_types(dit_files, capsys):
    from zimage_core.cli import main

    assert main(["info", dit_files["comfyui"][0]]) == 0
    out = capsys.readouterr().out
    assert "Z-Image transformer" in out and "Q4_K" in out and "IQ4_XS" in out and "layout: comfyui" in out


def test_header_fields_equal_gguf_readers_own(tmp_path):
    """Our header parse reads arrays whole (gguf's reader takes ~35 µs a value: a Qwen3 vocabulary of 455 k values
    took 30 s on the test machine, ours 2 s); every field must read as gguf's own reader reads it."""
    from zimage_core.gguf_files import _Reader

    w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), arch="qwen3")  # the fields llama.cpp's converter writes, shortened
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}é" if i % 3 else "" for i in range(2000)])
    w.add_array("tokenizer.ggml.token_type", [i % 7 for i in range(2000)])
    w.add_array("tokenizer.ggml.scores", [i / 8 for i in range(100)])
    w.add_array("empty", [])
    w.add_array("nested", [[1, 2], [3]])
    w.add_string("general.name", "Qwen3 4B")
    w.add_uint32("qwen3.block_count", 36)
    w.add_float32("qwen3.rope.freq_base", 1e6)
    w.add_tensor("t", np.ones((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs, ours = gguf.GGUFReader(str(tmp_path / "f.gguf")), _Reader(str(tmp_path / "f.gguf"))
    assert list(ours.fields) == list(theirs.fields) and ours.data_offset == theirs.data_offset
    for name, f in theirs.fields.items():
        assert ours.fields[name].contents() == f.contents(), name
    assert ours.table == [("t", [32, 4], 2, int(QT.F32), 0)]
