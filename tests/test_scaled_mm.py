"""fp8 compute's scale bookkeeping (zimage_core/scaled_mm.py), on the CPU: what the tensor cores are given must
reconstruct the bf16 product. The GPU speed and error are measured by benchmarks/bench_quant_matmul.py."""

import copy

import pytest
import torch

from zimage_core import scaled_mm as sm
from zimage_core.layers import Linear, SwiGLU, set_quant_matmul
from zimage_core.quant import quantize_fp8
from zimage_core.transformer import ZImageConfig, ZImageTransformer


def emulated(q, sa, w, sb):
    """What _scaled_mm computes: (q · scale_a) @ (w · scale_b)ᵀ, here in float64."""
    return (q.double() * sa.double()) @ (w.double() * sb.double().reshape(-1, 1)).T


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_row_scales_map_each_row_max_to_448_and_zero_rows_to_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 2000.0, 0.0])[:, None]
    q, s = sm.quantize_rows(x.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1) and s.dtype == torch.float32
    assert torch.equal(q[:4].float().abs().amax(1), torch.full((4,), 448.0))
    assert s[4].item() == 1.0 and not q[4].float().any()
    back = q.float() * s
    for i in range(4):  # e4m3 keeps 3 mantissa bits: relative error per row ≲ 2^-4
        assert rel(back[i], x[i].to(torch.bfloat16).float()) < 0.04


def test_static_input_scale_is_comfyui_per_tensor_convention():
    x = torch.tensor([[1.0, -2.0, 900.0, -900.0]], dtype=torch.bfloat16)
    q, s = sm.quantize_static(x, torch.tensor([0.5]))
    assert s.shape == () and s.item() == 0.5
    assert q.float().tolist() == [[2.0, -4.0, 448.0, -448.0]]  # x / 0.5, clipped at ±448 as ComfyUI does


def test_weight_scales_scalar_and_rows():
    assert sm.weight_scales(torch.tensor(0.25), 6, "cpu", rowwise=False).shape == ()
    r = sm.weight_scales(torch.tensor(0.25), 6, "cpu", rowwise=True)
    assert r.shape == (1, 6) and torch.equal(r, torch.full((1, 6), 0.25))
    per_row = torch.arange(1.0, 7.0)[:, None]  # fused q/k/v with their own scales
    assert torch.equal(sm.weight_scales(per_row, 6, "cpu", rowwise=True), per_row.T)
    assert torch.equal(sm.weight_scales(None, 3, "cpu", rowwise=True), torch.ones(1, 3))


def _cpu_scaled_mm() -> bool:
    try:
        a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _cpu_scaled_mm(), reason="this torch build has no CPU fp8 _scaled_mm")
@pytest.mark.parametrize("mode", ["rows", "static", "per_row_weight"])
def test_fp8_linear_equals_scaled_operands_and_tracks_bf16(mode):
    g = torch.Generator().manual_seed(1)
    w32 = torch.randn(48, 64, generator=g) / 8
    x = (torch.randn(3, 7, 64, generator=g) * torch.linspace(0.1, 50, 7)[:, None]).to(torch.bfloat16)
    bias = torch.randn(48, generator=g).to(torch.bfloat16)
    w, ws = quantize_fp8(w32, torch.float8_e4m3fn)
    if mode == "per_row_weight":
        ws = ws * torch.linspace(0.5, 2.0, 48)[:, None]
    inp = torch.tensor(0.2) if mode == "static" else None
    y = sm.fp8_linear(x, w, ws, bias, inp)
    assert y.shape == (3, 7, 48) and y.dtype == torch.bfloat16
    x2 = x.reshape(-1, 64)
    q, sa = sm.quantize_rows(x2) if inp is None else sm.quantize_static(x2, inp)
    want = emulated(q, sa, w, ws.reshape(-1) if ws.numel() > 1 else ws) + bias.double()
    assert rel(y.reshape(-1, 48), want) < 8e-3  # the bf16 output's rounding
    dequant = torch.nn.functional.linear(x.float(), (w.float() * ws.float()), bias.float())
    assert rel(y, dequant) < (0.3 if mode == "static" else 0.05)  # static scale 0.2 clips the big rows


def fp8_weight(m: Linear, g: torch.Generator) -> None:
    w, s = quantize_fp8(torch.randn(m.out_features, m.in_features, generator=g) / m.in_features**0.5, torch.float8_e4m3fn)
    m.weight, m.weight_scale = torch.nn.Parameter(w, requires_grad=False), s


def test_linear_uses_fp8_only_where_switched():
    ff = SwiGLU(64, 32)
    g = torch.Generator().manual_seed(2)
    fp8_weight(ff.w1, g)
    fp8_weight(ff.w2, g)
    ff.w3.weight = torch.nn.Parameter(torch.randn(32, 64, generator=g).to(torch.bfloat16), requires_grad=False)
    lone = Linear(64, 32, bias=False)  # not a block matmul: never switched
    fp8_weight(lone, g)
    model = torch.nn.ModuleList([ff, lone])
    lin = ff.w1
    x = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    dequant = torch.nn.functional.linear(x, lin.compute_weight(torch.bfloat16))
    assert torch.equal(lin(x), dequant)
    assert set_quant_matmul(model, True) == 2 and lin.quant_matmul and ff.w2.quant_matmul
    assert not ff.w3.quant_matmul and not lone.quant_matmul
    if _cpu_scaled_mm():
        assert torch.equal(lin(x), sm.fp8_linear(x, lin.weight, lin.weight_scale)) and not torch.equal(lin(x), dequant)
    assert torch.equal(lin(x.float()), torch.nn.functional.linear(x.float(), lin.compute_weight(torch.float32)))  # fp32: no fp8
    assert set_quant_matmul(model, False) == 0 and not lin.quant_matmul
    assert not sm.device_supports_fp8("cpu")


@pytest.mark.skipif(not _cpu_scaled_mm(), reason="this torch build has no CPU fp8 _scaled_mm")
def test_fp8_compute_runs_the_block_matmuls_only_and_is_closer_for_it():
    """Only attention qkv/out and the feed-forward switch (5 per block); the embedders, time MLP, adaLN and final
    layer stay dequantized, which keeps the output nearer fp32 than fp8 activations everywhere."""
    cfg = ZImageConfig(dim=256, n_layers=2, n_noise_refiner=1, n_context_refiner=1, ffn_hidden=672, cap_feat_dim=64)
    model = ZImageTransformer(cfg, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else 0.1 * torch.randn(p.shape, generator=g))
    lins = [m for m in model.modules() if isinstance(m, Linear)]
    for m in lins:
        fp8_weight(m, g)
    x, t, cap = torch.randn(1, 16, 16, 16, generator=g), torch.tensor([0.6]), [torch.randn(20, 64, generator=g)]
    with torch.inference_mode():
        ref = copy.deepcopy(model)  # the same weights, dequantized, in fp32
        for m in ref.modules():
            if isinstance(m, Linear):
                m.weight, m.weight_scale = torch.nn.Parameter(m.compute_weight(torch.float32), requires_grad=False), None
        ref.to(torch.float32).compute_dtype = torch.float32
        truth = ref(x, t, cap)
        blocks = 2 + 1 + 1
        assert set_quant_matmul(model, True) == 5 * blocks
        assert not any(m.quant_matmul for m in (model.x_embedder, model.final_layer.linear))
        ours = rel(model(x, t, cap).float(), truth)
        for m in lins:
            m.quant_matmul = True
        everywhere = rel(model(x, t, cap).float(), truth)
    assert ours < 0.8 * everywhere, (ours, everywhere)


@pytest.mark.skipif(not sm.device_supports_fp8("cuda"), reason="needs a CUDA GPU with fp8 tensor cores (compute capability ≥ 8.9)")
def test_fp8_linear_on_gpu_equals_its_scaled_operands():
    g = torch.Generator(device="cuda").manual_seed(3)
    w, ws = quantize_fp8(torch.randn(256, 512, generator=g, device="cuda") / 20, torch.float8_e4m3fn)
    x = (torch.randn(2, 64, 512, generator=g, device="cuda") * 5).to(torch.bfloat16)
    y = sm.fp8_linear(x, w, ws)
    q, sa = sm.quantize_rows(x.reshape(-1, 512))
    assert rel(y.reshape(-1, 256), emulated(q, sa, w, ws.reshape(1))) < 8e-3
    assert rel(y, torch.nn.functional.linear(x.float(), w.float() * ws)) < 0.05


def test_fp8_file_input_scale_reaches_the_linear(tmp_path):
    """A ComfyUI fp8 layer with a calibrated ``input_scale`` (comfy/ops.py loads it for TensorCoreFP8 inputs)."""
    import json

    from safetensors.torch import load_file, save_file
    from tiny import diffusers_transformer, save_comfyui

    import zimage_core as zc

    sd = load_file(save_comfyui(diffusers_transformer(seed=0), str(tmp_path / "z.safetensors")))
    key = "layers.0.attention.out"
    sd[key + ".weight"], sd[key + ".weight_scale"] = quantize_fp8(sd[key + ".weight"], torch.float8_e4m3fn)
    sd[key + ".input_scale"] = torch.tensor(0.05)
    sd[key + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    save_file(sd, str(tmp_path / "fp8.safetensors"))
    m = zc.load_transformer(str(tmp_path / "fp8.safetensors"), dtype=torch.bfloat16)
    lin = m.layers[0].attention.out
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.input_scale.item() == torch.tensor(0.05).item()
    assert m.layers[0].attention.qkv.input_scale is None
