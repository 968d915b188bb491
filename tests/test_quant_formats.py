"""ComfyUI's quantized weight formats: random weights quantized and written by ComfyUI itself (its layouts from
comfy-kitchen, its ``MixedPrecisionOps.Linear.state_dict`` writer), read back by ComfyUI's loader and dequantized
there; our reader and dequantization must give the same values from the same file."""

import json
import subprocess

import pytest
import torch
from comfy_harness import comfyui_path, comfyui_python
from safetensors.torch import load_file

from zimage_core import quant_formats as qf

COMFY = comfyui_path()

# (layer name, format, comfy layout, quantize kwargs, shape): shapes that need padding, several swizzle tiles,
# ConvRot groups (powers of 4) that divide K
CASES = [
    ("fp8", "float8_e4m3fn", "TensorCoreFP8E4M3Layout", {"scale": "recalculate"}, (96, 80)),
    ("fp8_e5m2", "float8_e5m2", "TensorCoreFP8E5M2Layout", {"scale": "recalculate"}, (48, 64)),
    ("mxfp8", "mxfp8", "TensorCoreMXFP8Layout", {}, (136, 80)),
    ("mxfp8_big", "mxfp8", "TensorCoreMXFP8Layout", {}, (256, 288)),
    ("nvfp4", "nvfp4", "TensorCoreNVFP4Layout", {}, (136, 72)),
    ("nvfp4_big", "nvfp4", "TensorCoreNVFP4Layout", {}, (272, 160)),
    ("int8", "int8_tensorwise", "TensorWiseINT8Layout", {}, (64, 96)),
    ("int8_convrot", "int8_tensorwise", "TensorWiseINT8Layout",
     {"per_channel": True, "convrot": True, "convrot_groupsize": 64}, (48, 128)),
    ("w4a4", "convrot_w4a4", "TensorCoreConvRotW4A4Layout", {"convrot_groupsize": 64}, (80, 128)),
    ("w4a4_16", "convrot_w4a4", "TensorCoreConvRotW4A4Layout", {"convrot_groupsize": 16}, (32, 64)),
    ("w4a8", "asym_w4a8_int8", "AsymW4A8Int8Layout", {"group_size": 16, "convrot_groupsize": 64}, (64, 128)),
    ("w4a8_nobook", "asym_w4a8_int8", "AsymW4A8Int8Layout",
     {"group_size": 32, "convrot_groupsize": 16, "codebook": False}, (48, 64)),
]

SCRIPT = r"""
import json, sys, torch
cases, out = json.loads(sys.argv[1]), sys.argv[2]
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, ".")
import comfy.options; comfy.options.enable_args_parsing()
from comfy.ops import mixed_precision_ops
from comfy.quant_ops import QuantizedTensor
from safetensors.torch import save_file
for dtype in (torch.float32, torch.bfloat16):
    ops = mixed_precision_ops({}, compute_dtype=dtype)
    g = torch.Generator().manual_seed(0)
    written, deq = {}, {}
    for name, fmt, layout, kw, shape in cases:
        w = (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.2).to(dtype)
        lin = ops.Linear(shape[1], shape[0], bias=False)
        lin.weight = torch.nn.Parameter(QuantizedTensor.from_float(w, layout, **kw), requires_grad=False)
        lin.quant_format = fmt
        sd = lin.state_dict(prefix=name + ".")
        written.update({k: v.contiguous() for k, v in sd.items()})
        back = ops.Linear(shape[1], shape[0], bias=False)             # ComfyUI's loader on what it wrote
        back.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items()}, strict=False)
        deq[name] = back.weight.dequantize().to(dtype).contiguous()
    tag = str(dtype).split(".")[-1]
    save_file(written, f"{out}/written_{tag}.safetensors")
    save_file(deq, f"{out}/dequantized_{tag}.safetensors")
"""


@pytest.mark.comfyui
@pytest.mark.skipif(COMFY is None, reason="no ComfyUI found (set COMFYUI_PATH)")
def test_dequantize_equals_comfyui(tmp_path):
    cases = [list(c[:4]) + [list(c[4])] for c in CASES]
    r = subprocess.run([comfyui_python(COMFY), "-c", SCRIPT, json.dumps(cases), str(tmp_path)], cwd=COMFY,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for dtype in ("float32", "bfloat16"):
        written = load_file(str(tmp_path / f"written_{dtype}.safetensors"))
        ref = load_file(str(tmp_path / f"dequantized_{dtype}.safetensors"))
        for name, fmt, _, _, shape in CASES:
            conf = qf.read_config(written[f"{name}.comfy_quant"])
            assert conf["format"] == fmt
            t = {s: written[f"{name}.weight{s}"] for s in qf.FORMAT_KEYS[fmt] if f"{name}.weight{s}" in written}
            ours = qf.dequantize(fmt, t, conf, getattr(torch, dtype))[: shape[0], : shape[1]]
            assert ours.shape == ref[name].shape and ours.dtype == ref[name].dtype, name
            if fmt in ("convrot_w4a4", "asym_w4a8_int8") or conf.get("convrot"):
                # a rotation is a matmul: same kernel, same shapes, but the summation order is not ours to guarantee
                torch.testing.assert_close(ours, ref[name], rtol=1e-6 if dtype == "float32" else 8e-3, atol=0, msg=name)
            else:  # elementwise products of the same values in the same dtype
                assert torch.equal(ours, ref[name]), (name, dtype)


def test_unswizzle_inverts_cublas_tiles():
    # cuBLAS's 1D block-scaling layout (docs.nvidia.com/cuda/cublas, "1D Block Scaling Factors Layout"):
    # in a 128×4 tile, element (r, c) sits at offset (r % 32) * 16 + (r // 32) * 4 + c
    rows, cols = 200, 7
    m = torch.arange(rows * cols, dtype=torch.int32).reshape(rows, cols)
    rb, cb = -(-rows // 128), -(-cols // 4)
    tiles = torch.zeros(rb, cb, 512, dtype=torch.int32)
    for r in range(rows):
        for c in range(cols):
            tiles[r // 128, c // 4, (r % 128 % 32) * 16 + (r % 128 // 32) * 4 + c % 4] = m[r, c]
    assert torch.equal(qf.unswizzle(tiles.reshape(rb * 128, cb * 4), rows, cols), m)


def test_hadamard_is_orthogonal_and_symmetric():
    for n in (4, 16, 64, 256):
        h = qf.hadamard(n, "cpu", torch.float64)
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
        assert torch.equal(h, h.T)
    with pytest.raises(ValueError):
        qf.hadamard(32, "cpu", torch.float32)


def test_nibbles_and_e8m0():
    b = torch.tensor([[0x0F, 0x80, 0x7A]], dtype=torch.uint8)
    assert qf.unpack_nibbles(b, signed=False, high_first=True).tolist() == [[0, 15, 8, 0, 7, 10]]
    assert qf.unpack_nibbles(b.view(torch.int8), signed=True, high_first=False).tolist() == [[-1, 0, 0, -8, -6, 7]]
    e = torch.tensor([0, 1, 127, 128, 254], dtype=torch.uint8)
    assert qf.e8m0_to_float(e).tolist() == [0.0, 2.0**-126, 1.0, 2.0, 2.0**127]


# ---- whole models: tiny Z-Image and Qwen3 files quantized per layer ("mixed") by ComfyUI --------------------

# (format, comfy layout, quantize kwargs, (N, K) must be multiples of) cycled over the eligible layers; None keeps
# a layer plain
MIXED = [
    ("nvfp4", "TensorCoreNVFP4Layout", {}, (16, 16)),
    ("float8_e4m3fn", "TensorCoreFP8E4M3Layout", {"scale": "recalculate"}, (1, 1)),
    ("mxfp8", "TensorCoreMXFP8Layout", {}, (32, 32)),
    (None, None, None, (1, 1)),
    ("int8_tensorwise", "TensorWiseINT8Layout", {}, (1, 1)),
    ("convrot_w4a4", "TensorCoreConvRotW4A4Layout", {"convrot_groupsize": 16}, (1, 64)),
    ("int8_tensorwise", "TensorWiseINT8Layout", {"per_channel": True, "convrot": True, "convrot_groupsize": 16}, (1, 16)),
    ("asym_w4a8_int8", "AsymW4A8Int8Layout", {"group_size": 16, "convrot_groupsize": 16}, (1, 16)),
]

QUANTIZE_FILE = r"""
import json, sys, torch
src, out, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, ".")
import comfy.options; comfy.options.enable_args_parsing()
from comfy.ops import mixed_precision_ops
from comfy.quant_ops import QuantizedTensor
from safetensors.torch import load_file, save_file
ops = mixed_precision_ops({}, compute_dtype=torch.float32)
sd = load_file(src)
written, ref = {}, {}
for k, v in sd.items():
    layer = k[: -len(".weight")]
    if layer not in plan:
        written[k] = ref[k] = v
        continue
    fmt, layout, kw = plan[layer]
    lin = ops.Linear(v.shape[1], v.shape[0], bias=False)
    lin.weight = torch.nn.Parameter(QuantizedTensor.from_float(v.float(), layout, **kw), requires_grad=False)
    lin.quant_format = fmt
    q = lin.state_dict(prefix=layer + ".")
    written.update({n: t.contiguous() for n, t in q.items()})
    back = ops.Linear(v.shape[1], v.shape[0], bias=False)
    back.load_state_dict({n[len(layer) + 1:]: t for n, t in q.items()}, strict=False)
    ref[k] = back.weight.dequantize().float().contiguous()
save_file(written, out + "/quantized.safetensors")
save_file(ref, out + "/dequantized.safetensors")
"""


def quantize_file(src: str, tmp_path, skip: str | None = None, force: dict | None = None) -> tuple[str, str, dict]:
    """ComfyUI quantizes every eligible 2-D weight of ``src`` (but those whose name holds ``skip``), cycling through
    MIXED (``force``: layer → fixed entry); returns (quantized file, file of ComfyUI's dequantized weights, layer → format)."""
    from safetensors import safe_open

    plan, i = dict(force or {}), 0
    with safe_open(src, "pt") as f:
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            if not k.endswith(".weight") or len(shape) != 2 or (skip and skip in k) or k[: -len(".weight")] in plan:
                continue
            for _ in range(len(MIXED)):
                fmt, layout, kw, (a, b) = MIXED[i % len(MIXED)]
                i += 1
                if shape[0] % a == 0 and shape[1] % b == 0:
                    break
            if fmt:
                plan[k[: -len(".weight")]] = [fmt, layout, kw]
    out = tmp_path / "q"
    out.mkdir()
    r = subprocess.run([comfyui_python(COMFY), "-c", QUANTIZE_FILE, src, str(out), json.dumps(plan)], cwd=COMFY,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out / "quantized.safetensors"), str(out / "dequantized.safetensors"), plan


@pytest.mark.comfyui
@pytest.mark.skipif(COMFY is None, reason="no ComfyUI found (set COMFYUI_PATH)")
def test_mixed_quantized_transformer_equals_dequantized_reference(tmp_path):
    from comfy_harness import write_loras
    from tiny import diffusers_transformer, rel_err, save_comfyui

    import zimage_core as zc
    from zimage_core.lora import apply_lora_specs
    from zimage_core.offload import module_bytes
    from zimage_core.packed import Packed
    from zimage_core.transformer_files import meta_transformer

    dit = diffusers_transformer(seed=3)
    src = save_comfyui(dit, str(tmp_path / "z.safetensors"))
    qpath, refpath, plan = quantize_file(src, tmp_path, skip="pad_token")
    assert {p[0] for p in plan.values()} >= {"nvfp4", "mxfp8", "float8_e4m3fn", "int8_tensorwise", "convrot_w4a4", "asym_w4a8_int8"}
    q, ref = zc.load_transformer(qpath, dtype=torch.float32), zc.load_transformer(refpath, dtype=torch.float32)
    packed = [n for n, m in q.named_modules() if isinstance(getattr(m, "weight", None), Packed)]
    assert len(packed) >= len([f for f, *_ in plan.values() if f != "float8_e4m3fn"])  # kept packed in memory
    g = torch.Generator().manual_seed(0)
    x, caps = torch.randn(2, 16, 8, 8, generator=g), [torch.randn(7, 32, generator=g), torch.randn(12, 32, generator=g)]
    t = torch.tensor([0.3, 0.8])
    with torch.inference_mode():
        assert rel_err(q(x, t, caps), ref(x, t, caps)) <= 1e-6
    write_loras(str(tmp_path / "loras"), dit)  # LoRA on packed weights: run-time patches, same result
    lora = str(tmp_path / "loras" / "zimage_style_lora.safetensors")
    apply_lora_specs(q, [f"{lora}:0.7"])
    apply_lora_specs(ref, [f"{lora}:0.7"])
    assert any(lin.patches for lin in q.modules() if isinstance(getattr(lin, "weight", None), Packed))
    with torch.inference_mode():
        assert rel_err(q(x, t, caps), ref(x, t, caps)) <= 1e-6
    meta = meta_transformer(qpath, dtype=torch.float32)  # offload planning from the header: the same packed bytes
    def packed_bytes(m):
        return {n: s.weight.nbytes for n, s in m.named_modules() if isinstance(getattr(s, "weight", None), Packed)}

    assert packed_bytes(meta) == packed_bytes(q) and module_bytes(q) < module_bytes(ref)


@pytest.mark.comfyui
@pytest.mark.skipif(COMFY is None, reason="no ComfyUI found (set COMFYUI_PATH)")
def test_mixed_quantized_text_encoder_equals_dequantized_reference(tmp_path, tokenizer_dir):
    from tiny import rel_err, save_qwen_comfyui, tiny_qwen

    import zimage_core as zc

    src = save_qwen_comfyui(tiny_qwen(seed=4, hidden=64), str(tmp_path / "qwen.safetensors"))
    # ComfyUI quantizes embeddings only as fp8 or int8 (comfy/ops.py MixedPrecisionOps.Embedding)
    qpath, refpath, plan = quantize_file(src, tmp_path, force={"model.embed_tokens": ["int8_tensorwise", "TensorWiseINT8Layout", {}]})
    assert len({p[0] for p in plan.values()}) >= 5  # mixed: several formats and plain layers side by side
    q = zc.load_text_encoder(qpath, dtype=torch.float32, tokenizer=tokenizer_dir)
    ref = zc.load_text_encoder(refpath, dtype=torch.float32, tokenizer=tokenizer_dir)
    prompts = ["a red fox asleep on a mossy stone", "ink drawing of a lighthouse in a storm, high contrast"]
    for a, b in zip(q.encode(prompts), ref.encode(prompts)):
        assert rel_err(a, b) <= 1e-6
    # the prompt enhancer reads the last layer and the final norm through the same view; the tied head is the int8 table
    from zimage_core.enhancer import generate, load_chat
    from zimage_core.packed import Packed

    chat_q, chat_ref = load_chat(q), load_chat(ref)
    assert chat_q.lm_head is None and isinstance(chat_q.encoder.embed_tokens.weight, Packed)
    assert any(isinstance(m.weight, Packed) for m in chat_q.last.modules() if hasattr(m, "weight_scale"))
    ids = q.tokenizer.ids(prompts[0])
    assert generate(chat_q, ids, max_tokens=8) == generate(chat_ref, ids, max_tokens=8)
