"""Initial noise that matches ComfyUI's samplers seed for seed.

ComfyUI (``comfy.sample.prepare_noise``) seeds the CPU generator with the seed and draws one fp32
standard-normal tensor of the latent's shape (B×16×H/8×W/8); with a ``batch_index`` it draws one
sample-sized tensor per index up to the largest and picks them. We do the same, so a seed moved
between a native graph and ours means the same starting point.
"""

from __future__ import annotations

import torch


def comfy_noise(shape: tuple[int, ...], seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    if batch_index is None:
        return torch.randn(shape, dtype=torch.float32, generator=g, device="cpu")
    per = [torch.randn((1, *shape[1:]), dtype=torch.float32, generator=g, device="cpu") for _ in range(max(batch_index) + 1)]
    return torch.cat([per[i] for i in batch_index], dim=0)
