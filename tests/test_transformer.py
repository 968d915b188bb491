"""Parity of our S3-DiT with diffusers' ZImageTransformer2DModel on fully random tiny weights.

Truth is the diffusers model run in float64. Tolerances: fp32 must be as close to the truth as
diffusers' own fp32 run (measured ≈4e-7 at this size; we allow 2e-6 and at most 2× diffusers'
error). bf16: measured ≈4e-3 for both implementations; we allow 1.5e-2 and at most 1.5× diffusers'.
"""

import pytest
import torch
import torch.nn.functional as F
from tiny import diffusers_transformer, rel_err, save_comfyui, save_diffusers_folder

import zimage_core as zc

FP32_TOL = 2e-6


@pytest.fixture(scope="module")
def refs():
    return diffusers_transformer(seed=1), diffusers_transformer(seed=1, dtype=torch.float64)


@pytest.fixture(scope="module")
def comfy_file(refs, tmp_path_factory):
    return save_comfyui(refs[0], str(tmp_path_factory.mktemp("dit") / "z_image_tiny.safetensors"))


def reference(model, x, t, caps, dtype):
    xs = [xi.to(dtype).unsqueeze(1) for xi in x]
    with torch.no_grad():
        out = model(xs, t.to(dtype) if dtype == torch.float64 else t, [c.to(dtype) for c in caps], return_dict=False)[0]
    return [o.squeeze(1) for o in out]


def inputs(seed, shapes, cap_lens, cap_dim=32):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, h, w, generator=g) for h, w in shapes]
    t = torch.rand(len(shapes), generator=g)
    caps = [torch.randn(n, cap_dim, generator=g) for n in cap_lens]
    return x, t, caps


def check_fp32(ours, refs, x, t, caps):
    truth = reference(refs[1], x, t, caps, torch.float64)
    theirs = reference(refs[0], x, t, caps, torch.float32)
    for o, r64, r32 in zip(ours, truth, theirs):
        e_ours, e_diff = rel_err(o, r64), rel_err(r32, r64)
        assert e_ours < FP32_TOL and e_ours < 2 * e_diff + 1e-7, (e_ours, e_diff)


@pytest.mark.parametrize(
    "shapes,cap_lens",
    [
        ([(8, 8)], [5]),  # single sample, 16 image tokens + pads, 5 caption tokens + pads
        ([(12, 10), (12, 10)], [7, 40]),  # different caption lengths: batch padding masked
        ([(8, 8), (14, 6), (16, 16)], [32, 3, 33]),  # different resolutions in one batch (list input)
    ],
)
def test_fp32_parity(refs, comfy_file, shapes, cap_lens):
    model = zc.load_transformer(comfy_file, dtype=torch.float32)
    x, t, caps = inputs(0, shapes, cap_lens)
    with torch.no_grad():
        ours = model(x, t, caps)
        if len({s for s in shapes}) == 1:  # batched tensor input gives the same as the list input
            stacked = model(torch.stack(x), t, caps)
            for a, b in zip(ours, stacked):
                assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    check_fp32(ours, refs, x, t, caps)


def test_diffusers_folder_and_prefixes_load_identically(refs, comfy_file, tmp_path):
    root = tmp_path / "Z-Image-Turbo"
    save_diffusers_folder(refs[0], str(root), n_shards=3)
    variants = [
        zc.load_transformer(str(root), dtype=torch.float32),  # model folder (parent of transformer/)
        zc.load_transformer(str(root / "transformer"), dtype=torch.float32),
        zc.load_transformer(save_comfyui(refs[0], str(tmp_path / "a.safetensors"), prefix="model.diffusion_model."), dtype=torch.float32),
        zc.load_transformer(
            save_comfyui(refs[0], str(tmp_path / "b.safetensors"), prefix="diffusion_model.", extra={"diffusion_model.norm_final.weight": torch.ones(64)}),
            dtype=torch.float32,
        ),
    ]
    base = zc.load_transformer(comfy_file, dtype=torch.float32).state_dict()
    for m in variants:
        sd = m.state_dict()
        assert sd.keys() == base.keys()
        for k in base:
            assert torch.equal(sd[k], base[k]), k
    assert variants[0].source_layout == "diffusers" and variants[2].source_layout == "comfyui"


def test_pad_tokens_are_attended_not_masked(comfy_file):
    """Changing the learned pad tokens must change the output (they are real tokens to the model)."""
    model = zc.load_transformer(comfy_file, dtype=torch.float32)
    x, t, caps = inputs(3, [(6, 6)], [5])  # 9 image tokens + 23 pads, 5 caption tokens + 27 pads
    with torch.no_grad():
        a = model(x, t, caps)[0]
        model.cap_pad_token.add_(1.0)
        b = model(x, t, caps)[0]
        model.x_pad_token.add_(1.0)
        c = model(x, t, caps)[0]
    assert rel_err(a, b) > 1e-3 and rel_err(b, c) > 1e-3


def test_bf16_within_measured_bound(refs, tmp_path):
    path = save_comfyui(refs[0], str(tmp_path / "bf16.safetensors"), dtype=torch.bfloat16)
    model = zc.load_transformer(path)
    assert model.compute_dtype == torch.bfloat16 and model.layers[0].feed_forward.w1.weight.dtype == torch.bfloat16
    ref_bf16 = diffusers_transformer(seed=1).to(torch.bfloat16)
    ref64 = diffusers_transformer(seed=1)  # same weights rounded to bf16, run in float64
    ref64.load_state_dict({k: v.to(torch.bfloat16).double() for k, v in ref64.state_dict().items()}, assign=True)
    x, t, caps = inputs(5, [(10, 8), (10, 8)], [9, 20])
    with torch.no_grad():
        ours = model(x, t, caps)
    truth = reference(ref64, x, t, caps, torch.float64)
    theirs = reference(ref_bf16, x, t, caps, torch.bfloat16)
    for o, r, d in zip(ours, truth, theirs):
        e_ours, e_diff = rel_err(o, r), rel_err(d, r)
        assert o.dtype == torch.bfloat16
        assert e_ours < 2e-2 and e_ours < 1.5 * e_diff + 1e-3, (e_ours, e_diff)


def test_bf16_file_runs_in_fp32_without_a_second_copy(refs, tmp_path):
    path = save_comfyui(refs[0], str(tmp_path / "bf16.safetensors"), dtype=torch.bfloat16)
    model = zc.load_transformer(path, dtype=torch.float32)
    assert model.layers[0].attention.qkv.weight.dtype == torch.bfloat16  # kept at storage precision
    ref = diffusers_transformer(seed=1)
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})
    x, t, caps = inputs(6, [(8, 8)], [12])
    with torch.no_grad():
        assert rel_err(model(x, t, caps)[0], reference(ref, x, t, caps, torch.float32)[0]) < FP32_TOL


def _fp8_reference(dtype, scales: dict[str, float]):
    """The fp32 diffusers model with every linear weight replaced by its fp8-rounded (and scaled) value."""
    ref = diffusers_transformer(seed=1)
    sd = ref.state_dict()
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            s = scales.get(k, 1.0)
            sd[k] = (v / s).to(dtype).float() * s
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("fmt", ["plain_e4m3", "plain_e5m2", "legacy_scaled", "comfy_quant", "header_metadata", "uint8_container"])
def test_fp8_files_match_rounded_weights(refs, tmp_path, fmt):
    import json

    from safetensors.torch import save_file
    from tiny import comfyui_state_dict

    fp8 = torch.float8_e5m2 if fmt == "plain_e5m2" else torch.float8_e4m3fn
    sd = comfyui_state_dict(refs[0].state_dict())
    scaled = fmt not in ("plain_e4m3", "plain_e5m2")
    out, meta, diff_scales = {}, {}, {}
    layers = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            s = float(v.abs().max()) / 448.0 if scaled else 1.0
            q = (v / s).to(fp8)
            out[k] = q.view(torch.uint8) if fmt == "uint8_container" else q
            layer = k[: -len(".weight")]
            if fmt == "legacy_scaled":
                out[layer + ".scale_weight"] = torch.tensor(s)
                out[layer + ".scale_input"] = torch.tensor(1.0)
            elif scaled:
                out[layer + ".weight_scale"] = torch.tensor(s)
                layers[layer] = {"format": "float8_e4m3fn"}
                if fmt in ("comfy_quant", "uint8_container"):
                    out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(layers[layer]).encode()), dtype=torch.uint8)
            # the same scale for the diffusers names (qkv rows share the fused scale)
            for dk in refs[0].state_dict():
                from tiny import _to_comfy_key

                if _to_comfy_key(dk) == k or (k.endswith("attention.qkv.weight") and dk.startswith(layer[: -len("qkv")]) and dk.endswith(("to_q.weight", "to_k.weight", "to_v.weight"))):
                    diff_scales[dk] = s
        else:
            out[k] = v
    if fmt == "legacy_scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=fp8)
    if fmt == "header_metadata":
        meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    path = str(tmp_path / f"{fmt}.safetensors")
    save_file(out, path, metadata=meta)

    model = zc.load_transformer(path, dtype=torch.float32)
    w = model.layers[0].attention.qkv.weight
    assert w.dtype == fp8, "fp8 weights stay fp8 in memory"
    ref = _fp8_reference(fp8, diff_scales)
    x, t, caps = inputs(7, [(8, 6)], [10])
    with torch.no_grad():
        assert rel_err(model(x, t, caps)[0], reference(ref, x, t, caps, torch.float32)[0]) < FP32_TOL
    assert zc.load_transformer(path).compute_dtype == torch.bfloat16  # fp8 files compute in bf16 by default


def test_fp8_storage_on_load_quantises_per_tensor(comfy_file):
    full = zc.load_transformer(comfy_file, dtype=torch.float32)
    q = zc.load_transformer(comfy_file, dtype=torch.float32, storage_dtype=torch.float8_e4m3fn)
    lin_q, lin_f = q.layers[1].feed_forward.w2, full.layers[1].feed_forward.w2
    assert lin_q.weight.dtype == torch.float8_e4m3fn and lin_q.weight_scale is not None
    deq = lin_q.compute_weight(torch.float32)
    assert rel_err(deq, lin_f.weight) < 0.05  # e4m3 has a 3-bit mantissa: ≈2-3 % relative error
    x, t, caps = inputs(8, [(8, 8)], [10])
    with torch.no_grad():
        assert rel_err(q(x, t, caps)[0], full(x, t, caps)[0]) < 0.1


def test_fp16_file(refs, tmp_path):
    """fp16 storage: computes in fp16 by default (NaN-checked by the sampler), or in fp32 from the same fp16 weights."""
    path = save_comfyui(refs[0], str(tmp_path / "fp16.safetensors"), dtype=torch.float16)
    half = zc.load_transformer(path)
    assert half.compute_dtype == torch.float16 and half.layers[0].attention.qkv.weight.dtype == torch.float16
    full = zc.load_transformer(path, dtype=torch.float32)
    assert full.layers[0].attention.qkv.weight.dtype == torch.float16  # kept at storage precision
    ref = diffusers_transformer(seed=1)
    ref.load_state_dict({k: v.to(torch.float16).float() for k, v in ref.state_dict().items()})
    x, t, caps = inputs(9, [(8, 8)], [6])
    with torch.no_grad():
        assert rel_err(full(x, t, caps)[0], reference(ref, x, t, caps, torch.float32)[0]) < FP32_TOL
        assert rel_err(half(x, t, caps)[0].float(), reference(ref, x, t, caps, torch.float32)[0]) < 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: host syncs exist only there")
def test_gpu_forward_never_waits_for_the_gpu():
    """A resident forward at a shape seen before (RoPE tables cached) queues its kernels without one host sync
    (no .item(), no device-to-host copy, no shape read from a device tensor): CUDA's sync check raises on any. bf16,
    batch 1 and a CFG pair of unequal captions (its padding mask)."""
    from tiny import gpu_test_transformer

    model = gpu_test_transformer(dim=256, n_layers=2, n_noise_refiner=1, n_context_refiner=1, ffn_hidden=512,
                                 cap_feat_dim=64).cuda()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 32, 32, generator=g).cuda().bfloat16()
    caps = [torch.randn(20, 64, generator=g).cuda().bfloat16(), torch.randn(45, 64, generator=g).cuda().bfloat16()]
    t = torch.tensor([0.5, 0.5], device="cuda")
    with torch.inference_mode():
        for args in ((x[:1], t[:1], caps[:1]), (x, t, caps)):
            model(*args)  # warm-up: tables built and cached
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = model(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.isfinite(out).all()


def test_feed_forward_hidden_major_is_the_same_product(monkeypatch):
    """On the CPU with an unaligned hidden width (here 170, as in every tiny parity test above; 2730 at dim 1024)
    w1/w3 run as W·xᵀ (layers.SwiGLU.hidden_major). The result must be the token-major product within fp32
    rounding, with LoRA run-time patches, packed or fp8-scaled storage, a bias, and bf16 multiplied in fp32."""
    from zimage_core import cpu_half
    from zimage_core.layers import Linear, SwiGLU
    from zimage_core.packed import Dense, Packed

    g = torch.Generator().manual_seed(5)
    ff = SwiGLU(64, 170)
    for lin in (ff.w1, ff.w2, ff.w3):
        lin.weight.data = torch.randn(lin.out_features, lin.in_features, generator=g) / 8
    ff.w1.patches = [(torch.randn(4, 64, generator=g), torch.randn(170, 4, generator=g), 0.5)]
    ff.w3.patches = [(None, torch.randn(170, 64, generator=g) / 8, 0.25)]
    ff.w2.weight = Packed(Dense(), (64, 170), {"w": ff.w2.weight.data.reshape(-1).clone()})
    x = torch.randn(2, 48, 64, generator=g)

    def token_major(x):
        def lin(m, x):
            y = x @ m.compute_weight(x.dtype).T
            for down, up, f in m.patches:
                y = y + ((x if down is None else x @ down.T) @ up.T) * f
            return y
        return lin(ff.w2, F.silu(lin(ff.w1, x)) * lin(ff.w3, x) * 0.5)

    assert ff.hidden_major(x) and ff.hidden_major(x.bfloat16())
    assert not ff.hidden_major(x[:, :41]) and not ff.hidden_major(x.to("meta"))  # 82 tokens: not a multiple of 16
    assert not SwiGLU(64, 176).hidden_major(x)  # aligned hidden width: BLAS's order already suits
    ff.w3.quant_matmul = True  # quantized compute (set_quant_matmul) keeps its own path
    assert not ff.hidden_major(x)
    ff.w3.quant_matmul = False
    out = ff(x, scale=0.5)
    assert out.shape == x.shape and rel_err(out, token_major(x)) < 1e-6

    monkeypatch.setattr(cpu_half, "EMULATED", frozenset({torch.bfloat16}))
    xb = x.bfloat16()
    with monkeypatch.context() as m:
        m.setattr(SwiGLU, "hidden_major", lambda *_: False)
        expected = ff(xb, scale=0.5)
    # the same fp32 products rounded at the same points (an element may round the other way: one bf16 step)
    assert rel_err(ff(xb, scale=0.5).float(), expected.float()) < 1e-4

    lin = Linear(64, 40)
    lin.weight.data = torch.randn(40, 64, generator=g).to(torch.float8_e4m3fn)
    lin.weight_scale, lin.bias.data = torch.tensor(0.3), torch.randn(40, generator=g)
    xs = x.reshape(-1, 64)
    assert rel_err(lin.forward_t(xs).t(), lin(xs)) < 1e-6
