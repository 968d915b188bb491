"""Pixel images at the pack's edge: PIL ↔ tensors and fitting sides to multiples of 16 (the VAE's 8× times
the transformer's 2×2 patches)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .errors import ZImageError


def crop_box(w: int, h: int, m: int = 16) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred crop of a w×h image to multiples of ``m``."""
    wm, hm = w // m * m, h // m * m
    if wm < m or hm < m:
        raise ZImageError(f"an image of {w}×{h} is too small; it needs at least {m} pixels per side.")
    left, top = (w - wm) // 2, (h - hm) // 2
    return left, top, left + wm, top + hm


def prepare_reference_image(img: Image.Image, target_area: int | None = None) -> Image.Image:
    """Shrink to ``target_area`` (default 1024²) when larger (Lanczos), then centre-crop to multiples of 16,
    as diffusers' ZImageOmniPipeline prepares its condition images."""
    img = img.convert("RGB")
    w, h = img.size
    if w * h > 1024 * 1024:
        s = math.sqrt((target_area or 1024 * 1024) / (w * h))
        img = img.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS)
    return img.crop(crop_box(*img.size))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL → 1×3×H×W float in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
