"""fp16 that works: a transformer whose attention and feed-forward outputs pass 65504 stays finite in fp16 and
close to fp32, where the plain fp16 path gives inf/NaN and ComfyUI's clamp loses accuracy; dtype choice per device."""

import torch
import torch.nn.functional as F

from zimage_core import precision, transformer
from zimage_core.transformer import ZImageConfig, ZImageTransformer

CFG = ZImageConfig(dim=64, n_layers=2, n_noise_refiner=1, n_context_refiner=1, head_dim=32, ffn_hidden=128,
                   cap_feat_dim=32, adaln_dim=32, t_hidden=64, axes_dims=(8, 12, 12))


def overflowing_model() -> ZImageTransformer:
    """Random weights; block layers.0 (and the context refiner) scaled so their sublayer outputs reach ~1e5–1e6."""
    torch.manual_seed(0)
    m = ZImageTransformer(CFG, dtype=torch.float32)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape)
            p.copy_(1.0 + 0.1 * r if "norm" in name else r / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.1 * r)
        for blk in (m.layers[0], m.context_refiner[0]):
            blk.feed_forward.w1.weight.mul_(300)
            blk.feed_forward.w3.weight.mul_(300)
            blk.attention.qkv.weight[2 * CFG.dim:].mul_(3000)  # v
            blk.attention.out.weight.mul_(60)
    return m.eval()


def run(m, dtype):
    m = m.to(dtype)
    m.compute_dtype = dtype
    g = torch.Generator().manual_seed(1)
    x, caps = torch.randn(1, 16, 16, 16, generator=g), [torch.randn(20, CFG.cap_feat_dim, generator=g)]
    with torch.inference_mode():
        return m(x, torch.tensor([0.4]), caps).float()


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def sublayer_peak(m) -> float:
    """Largest |attention| / |feed-forward| output of the scaled block in fp32 (the overflow is real)."""
    peaks = []
    hooks = [mod.register_forward_hook(lambda _m, _i, o: peaks.append(o.abs().max().item()))
             for mod in (m.layers[0].attention, m.layers[0].feed_forward)]
    run(m, torch.float32)
    for h in hooks:
        h.remove()
    return max(peaks)


def test_fp16_overflowing_blocks_stay_finite_and_close_to_fp32(monkeypatch):
    m = overflowing_model()
    assert sublayer_peak(m) > 3 * precision.FP16_MAX
    truth = run(m, torch.float32)
    ours = run(overflowing_model(), torch.float16)
    assert torch.isfinite(ours).all()
    err = rel(ours, truth)
    assert err < 5e-3, err  # fp16 rounding of O(1) activations through 4 blocks

    # ComfyUI's remedy (clamp to ±65504, no rescaling): finite but the clamped values are wrong
    monkeypatch.setattr(precision, "FP16_SHIFT", 0)
    clamped = run(overflowing_model(), torch.float16)
    assert torch.isfinite(clamped).all() and rel(clamped, truth) > 5 * err

    # no guard at all: inf/NaN
    monkeypatch.setattr(transformer, "post_norm", lambda norm, y, _s: norm(y))
    monkeypatch.setattr(transformer.SwiGLU, "forward", lambda self, x, _scale=1.0: self.w2(F.silu(self.w1(x)) * self.w3(x)))
    plain = run(overflowing_model(), torch.float16)
    assert not torch.isfinite(plain).all()


def test_fp32_and_bf16_paths_are_untouched():
    assert precision.sublayer_scale(torch.float32) == 1.0 and precision.sublayer_scale(torch.bfloat16) == 1.0
    assert precision.sublayer_scale(torch.float16) == 2.0**-precision.FP16_SHIFT


def test_auto_dtype_per_device(monkeypatch):
    assert precision.auto_dtype("cpu") == torch.float32 and precision.vae_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **_kw: False)  # GTX 10xx/16xx, RTX 20xx
    assert precision.auto_dtype("cuda") == torch.float16 and precision.vae_dtype("cuda") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **_kw: True)  # RTX 30xx and later
    assert precision.auto_dtype("cuda") == torch.bfloat16 and precision.vae_dtype("cuda") == torch.bfloat16


def test_vae_fp16_overflow_never_gives_a_black_image(tmp_path):
    from tiny import save_bfl_vae, tiny_vae

    import zimage_core as zc

    ref = tiny_vae(0)
    with torch.no_grad():  # activations past 65504 right after the decoder's first conv (and the encoder's)
        ref.decoder.conv_in.weight.mul_(3e4)
        ref.encoder.conv_in.weight.mul_(3e4)
    path = save_bfl_vae(ref, str(tmp_path / "ae.safetensors"))
    vae32, vae16 = zc.load_autoencoder(path, dtype=torch.float32), zc.load_autoencoder(path, dtype=torch.float16)
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(vae16.decoder(z.half())).all()  # the plain fp16 decoder overflows
    img16, img32 = vae16.decode(z), vae32.decode(z)
    assert torch.isfinite(img16).all() and rel(img16, img32) < 1e-2  # fp16-rounded weights, computed in fp32
    assert vae16.compute_dtype == torch.float16 and vae16.decoder.conv_in.weight.dtype == torch.float16
    pic = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    lat16, lat32 = vae16.encode(pic), vae32.encode(pic)
    assert torch.isfinite(lat16).all() and rel(lat16, lat32) < 1e-2


def gemm_dtypes(fn) -> set:
    """The operand dtypes of every matrix product ``fn`` runs (aten level)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                seen.update(a.dtype for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_half_precision_on_a_cpu_that_emulates_it_multiplies_in_fp32(monkeypatch):
    """On CPUs without bf16/fp16 GEMM units (cpu_half.EMULATED) Linear and attention take the same bf16 operands
    into fp32 kernels and round once: exactly F.linear in fp32 then rounded, within bf16 rounding of PyTorch's own bf16
    kernels, and as close to float64 as they are (whole transformer, bf16 and fp16; measured 1.047e-2 vs 1.039e-2 in
    bf16, 6.48e-3 vs 6.54e-3 in fp16)."""
    from zimage_core import cpu_half
    from zimage_core.attention import attention
    from zimage_core.layers import Linear

    g = torch.Generator().manual_seed(3)
    lin = Linear(96, 40)
    lin.weight.data, lin.bias.data = torch.randn(40, 96, generator=g).bfloat16(), torch.randn(40, generator=g).bfloat16()
    x = torch.randn(5, 96, generator=g).bfloat16()
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g).bfloat16() for _ in range(3))
    m = torch.ones(1, 9, dtype=torch.bool)
    m[:, 7:] = False
    monkeypatch.setattr(cpu_half, "EMULATED", frozenset({torch.bfloat16, torch.float16}))
    assert cpu_half.upcast(x) and not cpu_half.upcast(x.float()) and not cpu_half.upcast(x.to("meta"))
    assert torch.equal(lin(x), F.linear(x.float(), lin.weight.float(), lin.bias.float()).bfloat16())
    down, up = torch.randn(4, 96, generator=g).bfloat16(), torch.randn(40, 4, generator=g).bfloat16()
    lin.patches = [(down, up, 0.5)]  # LoRA run-time patches (fp8/packed storage) multiply in fp32 too
    h = F.linear(x.float(), down.float()).bfloat16()
    patched = F.linear(x.float(), lin.weight.float(), lin.bias.float()).bfloat16() + F.linear(h.float(), up.float()).bfloat16() * 0.5
    assert torch.equal(lin(x), patched)
    assert gemm_dtypes(lambda: lin(x)) == {torch.float32}  # no emulated bf16 GEMM, the patches' included
    lin.patches = []
    up_attn = attention(q, k, v, m)
    assert torch.equal(up_attn, attention(q.float(), k.float(), v.float(), m).bfloat16())
    model = overflowing_model()
    truth = run(model.double(), torch.float64)
    up = {dt: run(model, dt) for dt in (torch.bfloat16, torch.float16)}
    monkeypatch.setattr(cpu_half, "EMULATED", frozenset())
    assert rel(lin(x), F.linear(x.float(), lin.weight.float(), lin.bias.float())) < 4e-3
    assert rel(attention(q, k, v, m), up_attn) < 1e-2
    for dt, out in up.items():
        native = run(model, dt)
        assert rel(out, native) < 3e-2, dt
        assert rel(out, truth) <= rel(native, truth) * 1.05, (dt, rel(out, truth), rel(native, truth))
