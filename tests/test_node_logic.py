"""What the nodes do, tested without ComfyUI (nodes/graph.py holds it as plain functions)."""

import pytest
import torch
from tiny import diffusers_transformer, rel_err, save_comfyui

import zimage_core as zc
from nodes import graph


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return zc.load_transformer(save_comfyui(diffusers_transformer(seed=1), str(tmp_path_factory.mktemp("m") / "z.safetensors")),
                               dtype=torch.float32)


def caps(seed, *lens, dim=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in lens]


def test_conditioning_round_trip_and_native_format():
    e = caps(0, 7)
    cond = graph.conditioning_from_embeds(e)
    assert cond[0][0].shape == (1, 7, 32) and cond[0][1] == {"pooled_output": None}
    entries = graph.entries_from_conditioning(cond)
    assert len(entries) == 1 and torch.equal(entries[0].captions[0], e[0])
    # ComfyUI's native Z-Image text encode pads and sends an attention mask: padding is dropped
    padded = torch.cat([e[0], torch.zeros(3, 32)])[None]
    native = [[padded, {"pooled_output": None, "attention_mask": torch.tensor([[1] * 7 + [0] * 3])}]]
    assert torch.equal(graph.entries_from_conditioning(native)[0].captions[0], e[0])


def test_wrong_feature_size_is_named(model):
    entries = graph.entries_from_conditioning(graph.conditioning_from_embeds(caps(0, 5, dim=2560)))
    with pytest.raises(zc.ZImageError, match="2560-d text features but this Z-Image model reads 32-d"):
        graph.check_features(entries, model.cfg.cap_feat_dim, "positive")


def settings(**kw):
    base = dict(seed=3, steps=3, cfg=1.0, shift=3.0)
    base.update(kw)
    return graph.SamplerSettings(**base)


def test_text_to_image_equals_core_sampler(model):
    pos = caps(1, 9)
    out = graph.sample_latent(model, graph.conditioning_from_embeds(pos), None, graph.empty_latent(64, 48, 2), settings())
    ref = zc.sample(model, zc.comfy_noise((2, 16, 6, 8), 3), pos, sigmas=zc.sigmas(3))
    assert out["samples"].shape == (2, 16, 6, 8)
    assert torch.equal(out["samples"], zc.from_model_space(ref))  # raw VAE space out


def test_four_channel_empty_latent_is_widened(model):
    lat = {"samples": torch.zeros(1, 4, 6, 8)}  # core EmptyLatentImage
    out = graph.sample_latent(model, graph.conditioning_from_embeds(caps(1, 4)), None, lat, settings())
    assert out["samples"].shape == (1, 16, 6, 8)
    with pytest.raises(zc.ZImageError, match="4 channels; Z-Image works on 16-channel FLUX latents"):
        graph.latent_samples({"samples": torch.ones(1, 4, 6, 8)})


def test_denoise_and_noise_mask(model):
    raw = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(5))
    pos = caps(2, 6)
    cond = graph.conditioning_from_embeds(pos)
    out = graph.sample_latent(model, cond, None, {"samples": raw}, settings(steps=8, denoise=0.5))
    sig = zc.sigmas(8)[zc.start_index(8, 0.5):]
    ref = zc.sample(model, zc.comfy_noise((1, 16, 6, 8), 3), pos, sigmas=sig, init_latents=zc.to_model_space(raw))
    assert torch.equal(out["samples"], zc.from_model_space(ref))
    mask = torch.zeros(1, 1, 48, 64)
    mask[..., :, 32:] = 1.0  # repaint the right half
    out = graph.sample_latent(model, cond, None, {"samples": raw, "noise_mask": mask}, settings(steps=4))
    assert torch.allclose(out["samples"][..., :3], raw[..., :3], atol=1e-5)  # kept region is the input
    assert rel_err(out["samples"][..., 5:], raw[..., 5:]) > 0.1
    assert "noise_mask" in out  # passed through like KSampler


def test_cfg_needs_a_negative(model):
    with pytest.raises(zc.ZImageError, match="needs a negative conditioning"):
        graph.sample_latent(model, graph.conditioning_from_embeds(caps(1, 4)), None, graph.empty_latent(32, 32, 1),
                            settings(cfg=4.0))


def test_combined_and_timestep_ranged_conditioning(model):
    a, b = caps(3, 5), caps(4, 8)
    ca, cb = graph.conditioning_from_embeds(a), graph.conditioning_from_embeds(b)
    lat = graph.empty_latent(32, 32, 1)
    noise = zc.comfy_noise((1, 16, 4, 4), 3)
    # ConditioningCombine = two entries: each step averages the two predictions (equal strength)
    both = graph.sample_latent(model, ca + cb, None, lat, settings(steps=2))
    sig = zc.sigmas(2)
    x = noise.clone()
    with torch.inference_mode():
        for i in range(2):
            t = zc.schedule.model_time(sig[i]).expand(1)
            pred = 0.5 * model(x, t, a).float() + 0.5 * model(x, t, b).float()
            x = x + (sig[i + 1] - sig[i]) * (-pred)
    assert torch.allclose(both["samples"], zc.from_model_space(x), atol=1e-5)
    # ConditioningSetTimestepRange: a for the first half, b for the second
    ra = [[ca[0][0], dict(ca[0][1], start_percent=0.0, end_percent=0.5)]]
    rb = [[cb[0][0], dict(cb[0][1], start_percent=0.5, end_percent=1.0)]]
    ranged = graph.sample_latent(model, ra + rb, None, lat, settings(steps=4, shift=1.0))
    x = noise.clone()
    sig = zc.sigmas(4, 1.0)
    with torch.inference_mode():
        for i in range(4):
            t = zc.schedule.model_time(sig[i]).expand(1)
            caps_i = a if float(sig[i]) > 0.5 else b  # σ 1, .75 → a; .5 is the boundary (both active), .25 → b
            if abs(float(sig[i]) - 0.5) < 1e-6:
                pred = 0.5 * model(x, t, a).float() + 0.5 * model(x, t, b).float()
            else:
                pred = model(x, t, caps_i).float()
            x = x + (sig[i + 1] - sig[i]) * (-pred)
    assert torch.allclose(ranged["samples"], zc.from_model_space(x), atol=1e-5)


def test_zeroed_negative_from_core_node_works(model):
    pos = graph.conditioning_from_embeds(caps(5, 6))
    zero = [[torch.zeros_like(pos[0][0]), {"pooled_output": None}]]  # what ConditioningZeroOut returns
    out = graph.sample_latent(model, pos, zero, graph.empty_latent(32, 32, 1), settings(cfg=3.0))
    assert torch.isfinite(out["samples"]).all()


def test_masks_grow_feather_and_fit():
    m = torch.zeros(1, 32, 32)
    m[:, 12:20, 12:20] = 1
    grown = graph.grow_and_feather(m, 2, 0)
    assert grown.sum() == 12 * 12 and graph.grow_and_feather(m, -2, 0).sum() == 4 * 4
    soft = graph.grow_and_feather(m, 0, 4)
    assert 0 < soft[0, 10, 16] < 1 and soft[0, 16, 16] > 0.9 and soft[0, 0, 0] == 0
    img = torch.rand(1, 100, 70, 3)
    assert graph.fit_image(img, "crop").shape == (1, 96, 64, 3)
    assert graph.fit_image(img, "resize").shape == (1, 96, 64, 3)
    big = graph.fit_image(img, "resize to 1MP")
    assert big.shape[1] % 16 == 0 and big.shape[2] % 16 == 0 and abs(big.shape[1] * big.shape[2] / 2**20 - 1) < 0.05
    out = graph.edit_latent(lambda x: torch.zeros(x.shape[0], 16, x.shape[1] // 8, x.shape[2] // 8), img,
                            torch.ones(100, 70), 0, 0, "crop")
    assert out["samples"].shape == (1, 16, 12, 8) and out["noise_mask"].shape == (1, 1, 96, 64)
    with pytest.raises(zc.ZImageError, match="mask is 10×10 but the image is 70×100"):
        graph.edit_latent(lambda x: x, img, torch.ones(10, 10), 0, 0, "crop")


def test_resolutions_and_presets():
    for label, (w, h) in graph.RESOLUTIONS.items():
        assert w % 16 == 0 and h % 16 == 0 and f"{w}×{h}" in label
        assert graph.resolution_warning(w, h) is None
    assert "outside the 512–2048" in graph.resolution_warning(256, 256)
    assert graph.resolve_preset("turbo", 30, 7.0, 9.0) == (8, 1.0, 3.0)
    assert graph.resolve_preset("base", 30, 7.0, 9.0) == (28, 4.0, 3.0)
    assert graph.resolve_preset("custom", 30, 7.0, 9.0) == (30, 7.0, 9.0)
    with pytest.raises(zc.ZImageError, match="width 100 is not a positive multiple of 16"):
        graph.empty_latent(100, 64, 1)


def test_edit_conditioning_round_trip(model):
    """Our edit conditioning (ComfyUI's native Omni keys) reaches the sampler as the reference's segments and latents."""
    seg = caps(7, 4, 3, 9)  # head, tail, prompt segment
    raw = [torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(8))]
    cond = graph.omni_conditioning(seg[2], [seg[0], seg[1]], raw, None)
    entry = graph.entries_from_conditioning(cond)[0]
    assert [c.shape[0] for c in entry.captions[0]] == [4, 9, 3]  # head, prompt, tail
    out = graph.sample_latent(model, cond, None, graph.empty_latent(64, 48, 1), settings(steps=2))
    ref = zc.sample(model, zc.comfy_noise((1, 16, 6, 8), 3),
                    [zc.sampler.CondEntry([[seg[0], seg[2], seg[1]]], refs=[[zc.to_model_space(raw[0])[0]]])], sigmas=zc.sigmas(2))
    assert torch.equal(out["samples"], zc.from_model_space(ref))
    with pytest.raises(zc.ZImageError, match="1 reference images but 1 extra caption segments"):
        graph.entries_from_conditioning([[seg[2][None], {"reference_latents": raw, "reference_latents_text_embeds": [seg[0][None]]}]])
