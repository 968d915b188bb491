"""Omni / Edit conditioning against diffusers: the transformer's Omni forward and ZImageOmniPipeline's latents."""

import pytest
import torch
from tiny import diffusers_transformer, rel_err, sample_picture, save_comfyui, tiny_qwen, tiny_vae, write_models_dir

import zimage_core as zc
from zimage_core.templates import TEMPLATE, TEMPLATE_PROMPT, assemble_segments, reference_segments

SIG = 24


@pytest.fixture(scope="module")
def omni_ref():
    return diffusers_transformer(seed=3, siglip_feat_dim=SIG)


@pytest.fixture(scope="module")
def omni_model(omni_ref, tmp_path_factory):
    return zc.load_transformer(save_comfyui(omni_ref, str(tmp_path_factory.mktemp("omni") / "z_image_omni.safetensors")),
                               dtype=torch.float32)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = [[r(16, 6, 8), r(16, 8, 8)], [r(16, 4, 6), r(16, 10, 4), r(16, 8, 8)]]  # 1 and 2 references, mixed sizes
    caps = [[r(5, 32), r(9, 32), r(3, 32)], [r(4, 32), r(2, 32), r(12, 32), r(3, 32)]]
    sig = [[r(3, 4, SIG), None], [r(2, 3, SIG), r(4, 2, SIG), None]]
    return x, torch.tensor([0.3, 0.7]), caps, sig, [[0, 1], [0, 0, 1]]


@pytest.mark.parametrize("with_siglip", [True, False])
def test_omni_forward_mixed_batch_equals_diffusers(omni_ref, omni_model, with_siglip):
    x, t, caps, sig, nm = batch(0)
    ref64 = diffusers_transformer(seed=3, siglip_feat_dim=SIG, dtype=torch.float64)

    def theirs(model, dt):
        xs = [[xi.to(dt).unsqueeze(1) for xi in s] for s in x]
        ss = [[v.to(dt) if v is not None else None for v in s] for s in sig] if with_siglip else [None, None]
        with torch.no_grad():
            return [o.squeeze(1) for o in model(xs, t.to(dt) if dt == torch.float64 else t, [[c.to(dt) for c in s] for s in caps],
                                                siglip_feats=ss, image_noise_mask=nm, return_dict=False)[0]]

    with torch.no_grad():
        ours = omni_model.forward_omni(x, t, caps, siglip=sig if with_siglip else None, image_noise_mask=nm)
    for o, truth, r32 in zip(ours, theirs(ref64, torch.float64), theirs(omni_ref, torch.float32)):
        assert o.shape == (16, 8, 8)
        assert rel_err(o, truth) < 2e-6 and rel_err(o, truth) < 2 * rel_err(r32, truth) + 1e-7


def test_omni_weights_detected_in_both_layouts(omni_ref, tmp_path):
    from tiny import save_diffusers_folder

    a = zc.load_transformer(save_comfyui(omni_ref, str(tmp_path / "a.safetensors")), dtype=torch.float32)
    b = zc.load_transformer(save_diffusers_folder(omni_ref, str(tmp_path / "hf")), dtype=torch.float32)
    for m in (a, b):
        assert m.cfg.siglip_feat_dim == SIG and m.cfg.n_siglip_refiner == 1 and hasattr(m, "siglip_pad_token")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_siglip_refused_without_omni_weights(tmp_path):
    plain = zc.load_transformer(save_comfyui(diffusers_transformer(seed=1), str(tmp_path / "t.safetensors")), dtype=torch.float32)
    x, t, caps, sig, nm = batch(1)
    with pytest.raises(zc.ZImageError, match="has no SigLIP embedder"):
        plain.forward_omni(x, t, caps, siglip=sig, image_noise_mask=nm)
    with torch.no_grad():  # reference latents alone also condition today's Turbo/Base models
        out = plain.forward_omni(x, t, caps, image_noise_mask=nm)
    assert out[0].shape == (16, 8, 8) and torch.isfinite(out[1]).all()


def prompt_segments(prompt: str, n_images: int) -> list[str]:
    """The strings we encode separately for a prompt with ``n_images`` reference images (as the pipeline builds them)."""
    if n_images == 0:
        return [TEMPLATE.format(prompt)]
    return assemble_segments(reference_segments(n_images), TEMPLATE_PROMPT.format(prompt))


def test_prompt_segments_match_the_reference():
    assert prompt_segments("fix it", 0) == ["<|im_start|>user\nfix it<|im_end|>\n<|im_start|>assistant\n"]
    one = prompt_segments("make it blue", 1)
    assert one == ["<|im_start|>user\n<|vision_start|>", "<|vision_end|>make it blue<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
                   "<|vision_end|><|im_end|>"]
    three = prompt_segments("merge", 3)
    assert len(three) == 5 and three[1] == three[2] == "<|vision_end|><|vision_start|>"


def tiny_siglip():
    from tiny import randomize_
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    cfg = Siglip2VisionConfig(hidden_size=SIG, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                              num_patches=16, patch_size=16)
    return randomize_(Siglip2VisionModel(cfg), 5).eval(), Siglip2ImageProcessor(max_num_patches=16, patch_size=16)


@pytest.fixture(scope="module")
def setup(omni_ref, tmp_path_factory, tokenizer_dir):
    te, vae = tiny_qwen(0), tiny_vae(0)
    paths = write_models_dir(str(tmp_path_factory.mktemp("models")), omni_ref, te, vae, dit_name="z_image_omni.safetensors")
    ours = zc.ZImagePipeline.from_paths(zc.find_weights(transformer=paths["transformer"], text_encoder=paths["text_encoder"],
                                                        vae=paths["vae"], tokenizer=tokenizer_dir), dtype=torch.float32)
    return ours, te, vae


def diffusers_omni(omni_ref, te, vae, hf_tokenizer, siglip):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageOmniPipeline

    sig_model, sig_proc = siglip
    return ZImageOmniPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=te,
                              tokenizer=hf_tokenizer, transformer=omni_ref, siglip=sig_model, siglip_processor=sig_proc)


@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("with_siglip", [True, False])
def test_pipeline_latents_equal_diffusers_omni(omni_ref, setup, hf_tokenizer, n_images, with_siglip):
    ours, te, vae = setup
    siglip = tiny_siglip()
    pipe = diffusers_omni(omni_ref, te, vae, hf_tokenizer, siglip)
    images = [sample_picture(80, 64, seed=1), sample_picture(64, 96, seed=2)][:n_images]  # the reference needs ≥ 64 px
    refs = ours.encode_references(images)  # the same reference latents on both sides (encoding is tested below)
    pipe.prepare_image_latents = lambda batch_size, **_: [[r.unsqueeze(1) for r in refs] for _ in range(batch_size)]
    feats = pipe.prepare_siglip_embeds(images=images, batch_size=1, device="cpu", dtype=torch.float32)[0] if with_siglip else None
    if not with_siglip:
        pipe.prepare_siglip_embeds = lambda batch_size, **_: [[] for _ in range(batch_size)]
    h, w = refs[-1].shape[-2] * 8, refs[-1].shape[-1] * 8  # the reference defaults to the last image's size
    noise = zc.comfy_noise((1, 16, h // 8, w // 8), 11)
    expected = pipe(image=images, prompt="make the sky purple", negative_prompt="blurry", num_inference_steps=4,
                    guidance_scale=3.0, cfg_normalization=1.0, latents=noise.clone(), output_type="latent").images
    s = zc.GenerationSettings(prompt="make the sky purple", negative_prompt="blurry", width=w, height=h, steps=4, cfg=4.0,
                              cfg_normalization=1.0, seed=11, preset="base")
    _, got = ours(s, reference_images=images, siglip_features=feats)
    assert rel_err(got, expected) < 2e-5


def test_reference_encoding_matches_diffusers_bf16_vae(setup, omni_ref, hf_tokenizer, tmp_path):
    """diffusers encodes references with a bf16 VAE (image.bfloat16()); ours in bf16 agrees within bf16 rounding."""
    from tiny import save_bfl_vae

    ours, te, vae = setup
    pipe = diffusers_omni(omni_ref, te, tiny_vae(0).to(torch.bfloat16), hf_tokenizer, tiny_siglip())
    img = sample_picture(80, 64, seed=1)
    processed = pipe.image_processor.preprocess(img, height=64, width=80, resize_mode="crop")
    theirs = pipe.prepare_image_latents([processed], 1, "cpu", torch.float32)[0][0][:, 0]
    bf16 = zc.ZImagePipeline(ours.transformer, ours.text_encoder, zc.load_autoencoder(save_bfl_vae(vae, str(tmp_path / "ae.safetensors")), dtype=torch.bfloat16))
    mine = bf16.encode_references([img])[0]
    assert mine.shape == theirs.shape and rel_err(mine, theirs) < 2e-2


def test_large_reference_is_resized_to_the_target_area():
    from PIL import Image

    from zimage_core.images import prepare_reference_image

    big = Image.new("RGB", (2000, 1000))
    out = prepare_reference_image(big)
    assert out.size[0] % 16 == 0 and out.size[1] % 16 == 0 and abs(out.size[0] * out.size[1] - 1024 * 1024) < 40_000
    with pytest.raises(zc.ZImageError, match="too small"):
        prepare_reference_image(Image.new("RGB", (10, 40)))
