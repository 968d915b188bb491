"""A cheap latent → RGB preview: one linear map per pixel (the FLUX latent RGB approximation), no VAE."""

from __future__ import annotations

import torch

# Least-squares fit of the FLUX autoencoder's colours from its 16 model-space channels (as ComfyUI uses).
RGB_FACTORS = torch.tensor([
    [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778],
])
RGB_BIAS = torch.tensor([-0.0329, -0.0718, -0.0851])


def latent_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Model-space latents B×16×h×w → B×h×w×3 in [0, 1] (8× smaller than the decoded image)."""
    rgb = x.float().movedim(1, -1) @ RGB_FACTORS.to(x.device) + RGB_BIAS.to(x.device)
    return ((rgb + 1.0) / 2.0).clamp(0, 1)
