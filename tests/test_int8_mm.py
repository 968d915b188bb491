"""int8 compute for ComfyUI's int8_tensorwise weights (zimage_core/int8_mm.py): weights quantized and written by
ComfyUI itself, the product compared with comfy-kitchen's own ``int8_linear`` (the arithmetic ComfyUI runs these
files with) on the same weights and inputs, and a whole model switched to int8 compute."""

import json
import subprocess

import pytest
import torch
from comfy_harness import comfyui_path, comfyui_python
from safetensors.torch import load_file
from test_quant_formats import quantize_file
from tiny import diffusers_transformer, rel_err, save_comfyui

import zimage_core as zc
from zimage_core import int8_mm
from zimage_core import quant_formats as qf
from zimage_core.layers import Linear, set_quant_matmul
from zimage_core.packed import Packed
from zimage_core.quant import ComfyFormat

COMFY = comfyui_path()
needs_comfy = pytest.mark.skipif(COMFY is None, reason="no ComfyUI found (set COMFYUI_PATH)")

# name, quantize kwargs, (N, K), activation rows
CASES = [("plain", {}, (96, 128), 5), ("per_row", {"per_channel": True}, (64, 96), 40),
         ("convrot", {"per_channel": True, "convrot": True, "convrot_groupsize": 64}, (48, 128), 17),
         ("convrot16", {"per_channel": True, "convrot": True, "convrot_groupsize": 16}, (40, 64), 3)]

SCRIPT = r"""
import json, sys, torch
cases, out = json.loads(sys.argv[1]), sys.argv[2]
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, ".")
import comfy.options; comfy.options.enable_args_parsing()
from comfy.ops import mixed_precision_ops
from comfy.quant_ops import QuantizedTensor
from comfy_kitchen.backends.eager.quantization import int8_linear
from safetensors.torch import save_file
ops = mixed_precision_ops({}, compute_dtype=torch.bfloat16)
g = torch.Generator().manual_seed(0)
tensors = {}
for name, kw, (n, k), m in cases:
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.2
    lin = ops.Linear(k, n, bias=False)
    lin.weight = torch.nn.Parameter(QuantizedTensor.from_float(w.to(torch.bfloat16), "TensorWiseINT8Layout", **kw), requires_grad=False)
    lin.quant_format = "int8_tensorwise"
    sd = {f"{name}.{key}": v.contiguous() for key, v in lin.state_dict().items()}
    tensors.update(sd)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 3).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    tensors[f"{name}.x"], tensors[f"{name}.bias"] = x, bias
    tensors[f"{name}.y"] = int8_linear(x, sd[f"{name}.weight"], sd[f"{name}.weight_scale"], bias, torch.bfloat16,
                                       kw.get("convrot", False), kw.get("convrot_groupsize", 256)).contiguous()
save_file(tensors, out + "/int8.safetensors")
"""


def packed(t: dict, name: str) -> Packed:
    conf = qf.read_config(t[f"{name}.comfy_quant"])
    parts = {s: t[f"{name}.weight{s}"] for s in qf.FORMAT_KEYS["int8_tensorwise"] if f"{name}.weight{s}" in t}
    return Packed(ComfyFormat("int8_tensorwise", json.dumps(conf)), tuple(parts[""].shape), parts)


@pytest.mark.comfyui
@needs_comfy
def test_int8_linear_equals_comfy_kitchen(tmp_path):
    cases = [[n, kw, list(s), m] for n, kw, s, m in CASES]
    r = subprocess.run([comfyui_python(COMFY), "-c", SCRIPT, json.dumps(cases), str(tmp_path)], cwd=COMFY,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    t = load_file(str(tmp_path / "int8.safetensors"))
    for name, kw, _, _ in CASES:
        w = packed(t, name)
        assert int8_mm.can_use(w, t[f"{name}.x"]), name
        ours = int8_mm.int8_linear(t[f"{name}.x"], w, t[f"{name}.bias"])
        # the same integer product and the same float steps; a rotation is a matmul whose summation order is not ours
        torch.testing.assert_close(ours, t[f"{name}.y"], rtol=0 if not kw.get("convrot") else 8e-3, atol=0, msg=name)
        dense = torch.nn.functional.linear(t[f"{name}.x"].float(), w.dequantize(torch.float32), t[f"{name}.bias"].float())
        assert rel_err(ours.float(), dense) < 2e-2, name  # int8 rows: ≈ 1/254 of each row's largest value


def test_int8_product_is_the_rescaled_integer_product():
    """Property, no ComfyUI needed: what int8_linear returns is (q_x · s_x) @ (q_w · s_w)ᵀ of its own operands."""
    g = torch.Generator().manual_seed(1)
    data = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(24, generator=g) * 0.01
    w = Packed(ComfyFormat("int8_tensorwise", json.dumps({"format": "int8_tensorwise"})), (24, 64), {"": data, "_scale": scale})
    x = torch.randn(3, 7, 64, generator=g).to(torch.bfloat16)
    q, sx = int8_mm.quantize_rows(x.reshape(-1, 64))
    assert q.dtype == torch.int8 and q.abs().amax(1).ge(126).all()  # the scale is applied in bf16, as ComfyUI does
    exact = (q.double() @ data.double().T) * sx.double() * scale.double()
    y = int8_mm.int8_linear(x, w)
    assert y.shape == (3, 7, 24) and y.dtype == torch.bfloat16
    assert rel_err(y.reshape(-1, 24).float(), exact.float()) < 4e-3  # one bf16 rounding of the result
    assert not int8_mm.can_use(w, x.float()) and not int8_mm.device_supports_int8("cpu")


@pytest.mark.comfyui
@needs_comfy
def test_int8_file_runs_its_block_matmuls_in_int8(tmp_path):
    """A tiny Z-Image quantized to int8 (plain and ConvRot) by ComfyUI: the block matmuls switch to int8 compute and
    the forward stays near the dequantized one; switching back gives the dequantized forward again."""
    src = save_comfyui(diffusers_transformer(seed=6), str(tmp_path / "z.safetensors"))
    int8 = ("int8_tensorwise", "TensorWiseINT8Layout", {})
    rot = ("int8_tensorwise", "TensorWiseINT8Layout", {"per_channel": True, "convrot": True, "convrot_groupsize": 16})
    from safetensors import safe_open

    with safe_open(src, "pt") as f:
        layers = [k[: -len(".weight")] for k in f.keys() if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2]
    force = {name: list(rot if i % 2 else int8) for i, name in enumerate(layers) if "pad_token" not in name}
    qpath, _, _ = quantize_file(src, tmp_path, force=force)
    model = zc.load_transformer(qpath, dtype=torch.bfloat16)
    gemms = sum(len(m.token_gemms) for m in model.modules() if hasattr(m, "token_gemms"))
    g = torch.Generator().manual_seed(0)
    x, t, caps = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6]), [torch.randn(7, 32, generator=g)]
    with torch.inference_mode():
        plain = model(x, t, caps)
        assert set_quant_matmul(model, True) == gemms
        assert not any(m.quant_matmul for m in model.modules() if isinstance(m, Linear) and m is model.x_embedder)
        fast = model(x, t, caps)
        assert set_quant_matmul(model, False) == 0
        again = model(x, t, caps)
    assert torch.equal(again, plain) and not torch.equal(fast, plain)
    assert rel_err(fast.float(), plain.float()) < 5e-2


@pytest.mark.skipif(not int8_mm.device_supports_int8("cuda"), reason="needs a CUDA GPU with int8 tensor cores (compute capability ≥ 7.5)")
def test_int8_linear_on_gpu_equals_cpu():
    """cuBLASLt's int8 product (with its M/K/N padding) is the same integer product as the CPU's, rescaled alike."""
    g = torch.Generator().manual_seed(4)
    for n, k, m, conf in [(40, 64, 3, {}), (96, 256, 100, {"convrot": True, "convrot_groupsize": 64})]:
        data = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, 1, generator=g) * 0.01
        w = Packed(ComfyFormat("int8_tensorwise", json.dumps({"format": "int8_tensorwise", **conf})), (n, k),
                   {"": data, "_scale": scale})
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        cpu = int8_mm.int8_linear(x, w)
        gpu = int8_mm.int8_linear(x.cuda(), w.map(lambda t: t.cuda())).cpu()
        if conf:  # the rotation is a bf16 matmul: a row's rounding may differ by an ulp before quantization
            assert rel_err(gpu.float(), cpu.float()) < 1e-2
        else:
            assert torch.equal(gpu, cpu)
