"""Final latents and images of our pipeline against diffusers' Z-Image pipelines on tiny random models.

Same initial noise, same prompts (our text encoder vs transformers' with the real tokenizer), float32.
Tolerance 2e-5 relative (a few steps compound the ≈4e-7 per-call rounding of both implementations).
"""

import pytest
import torch
from tiny import (
    diffusers_transformer,
    rel_err,
    sample_picture,
    tiny_qwen,
    tiny_vae,
    write_models_dir,
)

import zimage_core as zc
from zimage_core.pipeline import mask_to_latent

TOL = 2e-5


@pytest.fixture(scope="module")
def refs():
    return {"dit": diffusers_transformer(seed=1), "te": tiny_qwen(0), "vae": tiny_vae(0)}


@pytest.fixture(scope="module")
def ours(refs, tmp_path_factory, tokenizer_dir):
    paths = write_models_dir(str(tmp_path_factory.mktemp("models")), refs["dit"], refs["te"], refs["vae"])
    return zc.ZImagePipeline.from_paths(zc.find_weights(transformer=paths["transformer"], text_encoder=paths["text_encoder"],
                                                        vae=paths["vae"], tokenizer=tokenizer_dir), dtype=torch.float32)


def diffusers_pipe(cls, refs, hf_tokenizer):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return cls(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=refs["vae"], text_encoder=refs["te"],
               tokenizer=hf_tokenizer, transformer=refs["dit"])


@pytest.mark.parametrize(
    "settings",
    [
        dict(preset="turbo", prompt="a red fox in snow", seed=3),
        dict(preset="base", prompt="a red fox in snow", negative_prompt="blurry, low quality", steps=6, cfg=5.0,
             cfg_normalization=1.0, cfg_truncation=0.7, seed=4),
        dict(preset="base", prompt="两只猫", negative_prompt="", steps=5, cfg=3.0, cfg_normalization=0.9, seed=5, batch_size=2),
    ],
    ids=["turbo", "base-cfg-norm-trunc", "base-batch2"],
)
def test_text_to_image_equals_diffusers(refs, ours, hf_tokenizer, settings):
    from diffusers import ZImagePipeline

    s = zc.GenerationSettings(width=64, height=48, **settings).resolved()
    images, latents = ours(s)
    pipe = diffusers_pipe(ZImagePipeline, refs, hf_tokenizer)
    noise = zc.comfy_noise((s.batch_size, 16, 6, 8), s.seed)
    kw = dict(prompt=s.prompt, negative_prompt=s.negative_prompt or None, height=48, width=64, num_inference_steps=s.steps,
              guidance_scale=s.cfg - 1.0, cfg_normalization=s.cfg_normalization or False, cfg_truncation=s.cfg_truncation,
              num_images_per_prompt=s.batch_size)
    ref_lat = pipe(latents=noise.clone(), output_type="latent", **kw).images
    assert rel_err(latents, ref_lat) < TOL
    ref_img = pipe(latents=noise.clone(), output_type="pt", **kw).images
    ours_img = ours.autoencoder.decode(zc.from_model_space(latents))
    assert rel_err(ours_img, ref_img) < TOL
    assert images[0].size == (64, 48) and len(images) == s.batch_size


def test_turbo_preset_is_the_published_schedule():
    expected = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]
    assert torch.allclose(zc.sigmas(zc.PRESETS["turbo"].steps, 3.0), torch.tensor(expected), atol=5e-5)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for n, shift in [(8, 3.0), (28, 3.0), (13, 6.0), (1, 3.0)]:
        sch = FlowMatchEulerDiscreteScheduler(shift=shift)
        sch.set_timesteps(sigmas=torch.linspace(1.0, 1 / n, n).tolist())
        assert torch.equal(zc.sigmas(n, shift), sch.sigmas)  # bit-identical


def _sample_like_diffusers(ours, prompt, seed, img, strength, steps, mask=None):
    """Our sampler with the reference's randomness: posterior sample, then noise, from one generator."""
    g = torch.Generator().manual_seed(seed)
    x = zc.pipeline.image_to_tensor(img)
    init = zc.to_model_space(ours.autoencoder.encode(x, generator=g))
    noise = torch.randn(init.shape, generator=g)
    sig = zc.sigmas(steps, 3.0)[zc.start_index(steps, strength):]
    m = None if mask is None else mask_to_latent(mask, init.shape[2], init.shape[3])
    return zc.sample(ours.transformer, noise, ours.encode_prompts([prompt]), sigmas=sig, init_latents=init, mask=m)


@pytest.mark.parametrize("strength,steps", [(0.6, 8), (1.0, 4), (0.3, 10)])
def test_image_to_image_equals_diffusers(refs, ours, hf_tokenizer, strength, steps):
    from diffusers import ZImageImg2ImgPipeline

    img = sample_picture(64, 48, seed=1)
    pipe = diffusers_pipe(ZImageImg2ImgPipeline, refs, hf_tokenizer)
    ref = pipe(prompt="a watercolor", image=img, strength=strength, num_inference_steps=steps, guidance_scale=0.0,
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    got = _sample_like_diffusers(ours, "a watercolor", 7, img, strength, steps)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_equals_diffusers(refs, ours, hf_tokenizer, strength):
    from diffusers import ZImageInpaintPipeline
    from PIL import Image

    img = sample_picture(64, 48, seed=2)
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 8, 48, 40))
    pipe = diffusers_pipe(ZImageInpaintPipeline, refs, hf_tokenizer)
    ref = pipe(prompt="a hole", image=img, mask_image=mask, strength=strength, num_inference_steps=6, guidance_scale=0.0,
               generator=torch.Generator().manual_seed(9), output_type="latent").images
    got = _sample_like_diffusers(ours, "a hole", 9, img, strength, 6, mask=mask)
    assert rel_err(got, ref) < TOL
    # the kept region is exactly the image's latents
    m = mask_to_latent(mask, 6, 8)
    init = zc.to_model_space(ours.autoencoder.encode(zc.pipeline.image_to_tensor(img), generator=torch.Generator().manual_seed(9)))
    assert torch.allclose(got * (1 - m), init * (1 - m))


def test_noise_is_comfyui_noise():
    """ComfyUI's prepare_noise: torch.manual_seed(seed), one fp32 randn of the latent shape on the CPU."""
    torch.manual_seed(1234)
    expected = torch.randn((2, 16, 8, 8), dtype=torch.float32, generator=None, device="cpu")
    assert torch.equal(zc.comfy_noise((2, 16, 8, 8), 1234), expected)
    torch.manual_seed(99)
    per = [torch.randn((1, 16, 4, 4)) for _ in range(3)]
    assert torch.equal(zc.comfy_noise((2, 16, 4, 4), 99, batch_index=[2, 0]), torch.cat([per[2], per[0]]))


def test_callback_and_cancel(ours):
    steps = []
    noise = zc.comfy_noise((1, 16, 6, 8), 0)
    caps = ours.encode_prompts(["x"])
    zc.sample(ours.transformer, noise, caps, sigmas=zc.sigmas(4), callback=steps.append)
    assert [s.index for s in steps] == [0, 1, 2, 3] and steps[-1].total == 4
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 5  # stops inside the second step, between blocks

    executor = ours.transformer.executor
    with pytest.raises(zc.ZImageInterrupted):
        zc.sample(ours.transformer, noise, caps, sigmas=zc.sigmas(4), cancel=cancel)
    assert ours.transformer.executor is executor  # nothing rewired: the model is usable again
    again = zc.sample(ours.transformer, noise, caps, sigmas=zc.sigmas(4))
    assert torch.equal(again, zc.sample(ours.transformer, noise, caps, sigmas=zc.sigmas(4)))


def test_batched_and_sequential_cfg_agree(ours):
    noise = zc.comfy_noise((1, 16, 6, 8), 1)
    pos, neg = ours.encode_prompts(["a"]), ours.encode_prompts(["b c d"])
    a = zc.sample(ours.transformer, noise, pos, neg, sigmas=zc.sigmas(3), cfg=4.0, batch_cfg=True)
    b = zc.sample(ours.transformer, noise, pos, neg, sigmas=zc.sigmas(3), cfg=4.0, batch_cfg=False)
    assert rel_err(a, b) < 1e-5


def test_out_of_memory_with_batched_cfg_falls_back_to_sequential_passes(ours, monkeypatch, caplog):
    noise = zc.comfy_noise((1, 16, 6, 8), 1)
    pos, neg = ours.encode_prompts(["a"]), ours.encode_prompts(["b c d"])
    sequential = zc.sample(ours.transformer, noise, pos, neg, sigmas=zc.sigmas(3), cfg=4.0, batch_cfg=False)
    forward, batched = ours.transformer.forward, []

    def tight_memory(x, *args, **kw):  # a device that fits one sample, not two
        if len(x) > 1:
            batched.append(len(x))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x, *args, **kw)

    monkeypatch.setattr(ours.transformer, "forward", tight_memory)
    with caplog.at_level("WARNING", logger="zimage"):
        fell_back = zc.sample(ours.transformer, noise, pos, neg, sigmas=zc.sigmas(3), cfg=4.0, batch_cfg=True)
    assert torch.equal(fell_back, sequential)
    assert batched == [2] and "one after another" in caplog.text  # tried once, then sequential for the rest


def test_bad_input_messages(ours, caplog):
    s = zc.GenerationSettings
    with pytest.raises(zc.ZImageError, match="width 70 is not a positive multiple of 16.*nearest: 64"):
        ours(s(prompt="x", width=70, height=64))
    with pytest.raises(zc.ZImageError, match="steps must be at least 1"):
        ours(s(prompt="x", width=64, height=64, steps=0))
    img = sample_picture(64, 48)
    with pytest.raises(zc.ZImageError, match="strength/denoise must be between 0 and 1"):
        ours(s(prompt="x", width=64, height=48, strength=1.5), init_image=img)
    with pytest.raises(zc.ZImageError, match="init image is 64×48 but the requested size is 64×64"):
        ours(s(prompt="x", width=64, height=64, strength=0.5), init_image=img)
    from PIL import Image

    with pytest.raises(zc.ZImageError, match="mask is 32×32 but the image is 64×48"):
        ours(s(prompt="x", width=64, height=48, strength=0.5), init_image=img, mask=Image.new("L", (32, 32)))
    with pytest.raises(zc.ZImageError, match="leaves no step to run"):
        ours(s(prompt="x", width=64, height=48, strength=0.0, steps=8), init_image=img)
    # empty prompt with CFG: prompt == negative, so guidance would do nothing: warned and skipped (same result)
    import logging

    with caplog.at_level(logging.WARNING, logger="zimage"):
        _, lat = ours(s(prompt="", negative_prompt="", preset="base", steps=2, width=64, height=48))
    assert "identical" in caplog.text
    _, lat1 = ours(s(prompt="", preset="turbo", steps=2, width=64, height=48))
    # the CFG run encodes [prompt, negative] as a batch of two, the turbo run a batch of one: a different matmul
    # shape may pick different CPU kernels (3e-6 apart on an AMD EPYC), so equal within fp32 rounding, not bitwise
    assert rel_err(lat, lat1) < 1e-5


def test_nan_names_the_step_and_the_cause(ours):
    dit = ours.transformer
    bias = dit.final_layer.linear.bias
    caps = ours.encode_prompts(["x"])
    try:  # broken weights: the file is named, no dtype advice
        dit.final_layer.linear.bias = torch.nn.Parameter(torch.full_like(bias, float("inf")), requires_grad=False)
        with pytest.raises(zc.ZImageError, match=r"in the latents at step 1 of 2: weight final_layer.linear.bias of "
                                                 r".*\.safetensors holds NaN/inf.*no dtype setting fixes it"):
            zc.sample(dit, zc.comfy_noise((1, 16, 6, 8), 0), caps, sigmas=zc.sigmas(2))
    finally:
        dit.final_layer.linear.bias = bias
    noise = zc.comfy_noise((1, 16, 6, 8), 0)
    noise[0, 0, 0, 0] = float("inf")  # finite weights, a broken input: no advice to change a dtype it already has
    with pytest.raises(zc.ZImageError, match=r"at step 1 of 2 while computing in float32\. The weights are finite"):
        zc.sample(dit, noise, caps, sigmas=zc.sigmas(2))
