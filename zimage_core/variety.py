"""Seed variety: seeded noise on the prompt features during the first, high-noise part of the schedule.

Z-Image-Turbo draws nearly the same composition for every seed (Tongyi-MAI/Z-Image issue #27), because
the distilled model follows the prompt so closely that the initial noise barely matters. The published
fix perturbs the text embedding: ChangeTheConstants' SeedVarianceEnhancer (ComfyUI; noisy embedding for
the first ``steps_switchover_percent`` of the steps, the clean one after) and InvokeAI's
``invokeai/app/invocations/z_image_seed_variance_enhancer.py`` (noise scaled by the embedding's std).
We do the same with two choices of our own:

* the noise is scaled by each token's RMS: Z-Image's caption embedder starts with an RMSNorm, so
  ``strength`` is exactly the noise-to-signal ratio the model sees (0.5 → cosine ≈ 0.89 to the clean
  token), whatever the encoder's scale and its huge first-token activations;
* one noise row per token, drawn in order from the seed, so a longer prompt keeps the noise of the
  tokens it shares with a shorter one (variations of a variation stay aligned, as SVE 2.2 does).

The composition is decided in the first steps; the clean prompt takes over for the rest, so text and
detail follow it. ``strength`` 0 leaves everything untouched.
"""

from __future__ import annotations

import torch

SEED_OFFSET = 0x5EED  # the variety noise must not repeat the latent noise drawn from the same seed


def perturb(features: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Features …×L×D plus Gaussian noise of ``strength`` × each token's RMS (fp32 noise, input dtype out)."""
    x = features.float()
    rows = x.reshape(-1, x.shape[-1])
    noise = torch.stack([torch.randn(rows.shape[-1], generator=generator) for _ in range(rows.shape[0])]).to(x.device)
    rms = rows.pow(2).mean(-1, keepdim=True).sqrt()
    return (rows + strength * rms * noise).reshape(x.shape).to(features.dtype)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) + SEED_OFFSET) % 2**64)


def vary(entries: list[tuple[torch.Tensor, float, float]], seed: int, strength: float, fraction: float) -> list[tuple]:
    """(features, start, end) per conditioning entry, ranges in ComfyUI percents → (entry index, features, start, end):
    a noisy copy for the part of each range before ``fraction``, the clean features after it."""
    g, out = generator(seed), []
    for i, (x, start, end) in enumerate(entries):
        if start < min(end, fraction):
            out.append((i, perturb(x, strength, g), start, min(end, fraction)))
        if max(start, fraction) < end:
            out.append((i, x, max(start, fraction), end))
    return out
