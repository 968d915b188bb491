"""Flow-matching sigma schedules with a static shift, and the Turbo / Base presets.

σ runs from 1 (pure noise) to 0; the model is fed t = (1000 − 1000σ)/1000, as the reference computes it
in float32 (0 = pure noise). Arithmetic is float32 in the reference's order, so sigmas are bit-identical to
diffusers' FlowMatchEulerDiscreteScheduler(shift=…) fed ``linspace(1, 1/n, n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ZImageError


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int
    cfg: float  # ComfyUI convention: 1.0 = no guidance
    shift: float
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    description: str = ""


PRESETS = {
    "turbo": Preset("turbo", 8, 1.0, 3.0, description="Z-Image-Turbo: 8 model calls, no CFG, shift 3."),
    "base": Preset("base", 28, 4.0, 3.0, description="Z-Image (base): 28–50 steps, CFG 3–5 with a negative prompt, shift 3."),
}


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def percent_to_sigma(p: float, shift: float) -> float:
    """ComfyUI's percent of the schedule (0 = start, 1 = end, in unshifted time) → σ, as its ModelSamplingDiscreteFlow."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    return shift_sigmas(1 - p, shift)


def sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """steps+1 float32 sigmas from 1 to 0 (the last is the terminal 0)."""
    if steps < 1:
        raise ZImageError(f"steps must be at least 1 (got {steps}).")
    if shift <= 0:
        raise ZImageError(f"shift must be positive (got {shift}).")
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float32)
    return torch.cat([shift_sigmas(s, float(shift)), torch.zeros(1)])


def start_index(steps: int, strength: float) -> int:
    """Where image-to-image starts in a ``steps`` schedule (diffusers' get_timesteps)."""
    if not 0.0 <= strength <= 1.0:
        raise ZImageError(f"strength/denoise must be between 0 and 1 (got {strength}).")
    init = min(steps * strength, steps)
    start = int(max(steps - init, 0))
    if steps - start < 1:
        raise ZImageError(
            f"strength {strength} with {steps} steps leaves no step to run; raise the strength or the steps "
            f"(at least {1 / steps:.3f} for {steps} steps)."
        )
    return start


def model_time(sigma: torch.Tensor) -> torch.Tensor:
    """The model's time input for σ, rounded as the reference rounds it."""
    ts = sigma.float() * 1000.0
    return (1000.0 - ts) / 1000.0
