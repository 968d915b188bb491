"""What the nodes do, as plain functions on ComfyUI's graph data (no ComfyUI import, so tests call them directly).

ComfyUI's types: CONDITIONING is a list of [tensor B×L×D, dict]; LATENT is {"samples": B×C×h×w in raw VAE
space, optional "noise_mask", "batch_index"}; IMAGE is B×H×W×3 in [0, 1]; MASK is B×H×W (or H×W).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import zimage_core as zc
from zimage_core import variety
from zimage_core.images import crop_box
from zimage_core.sampler import CondEntry
from zimage_core.templates import assemble_segments

log = logging.getLogger("zimage")

# ~1 megapixel sizes in multiples of 16 (Z-Image trains from 512 to 2048 px per side); 2 MP for big cards.
RESOLUTIONS = {
    "1:1 (1024×1024)": (1024, 1024), "4:3 (1152×864)": (1152, 864), "3:4 (864×1152)": (864, 1152),
    "3:2 (1216×832)": (1216, 832), "2:3 (832×1216)": (832, 1216), "16:9 (1344×768)": (1344, 768),
    "9:16 (768×1344)": (768, 1344), "21:9 (1536×640)": (1536, 640), "9:21 (640×1536)": (640, 1536),
    "5:4 (1120×896)": (1120, 896), "4:5 (896×1120)": (896, 1120),
    "1:1 2MP (1440×1440)": (1440, 1440), "16:9 2MP (1920×1088)": (1920, 1088), "9:16 2MP (1088×1920)": (1088, 1920),
}
MIN_SIDE, MAX_SIDE = 512, 2048
PRESET_CHOICES = ["turbo", "base", "custom"]


# ---- conditioning -------------------------------------------------------------------------------


def conditioning_from_embeds(embeds: list[torch.Tensor]) -> list:
    """One CONDITIONING entry per prompt: [1×L×D tensor on the CPU, {"pooled_output": None}] (core-node compatible)."""
    return [[e[None].float().cpu() if e.dtype == torch.float64 else e[None].cpu(), {"pooled_output": None}] for e in embeds]


def vary_conditioning(cond: list, seed: int, strength: float, fraction: float, batch: int = 1) -> list:
    """Seed variety on CONDITIONING: each entry becomes a noisy copy for the first ``fraction`` of the schedule and
    the clean entry after, as ComfyUI timestep ranges (so KSampler and every other sampler honour it too). With
    ``batch`` > 1 a one-row prompt is repeated first, so every image of the batch gets its own variation."""
    if strength == 0 or fraction <= 0:
        return cond
    rows = [t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 < batch else t for t, _ in cond]
    parts = variety.vary([(t, float(d.get("start_percent", 0.0)), float(d.get("end_percent", 1.0))) for t, (_, d) in zip(rows, cond)],
                         seed, strength, fraction)
    return [[x, {**cond[i][1], "start_percent": a, "end_percent": b}] for i, x, a, b in parts]


def entries_from_conditioning(cond: list, what: str = "positive") -> list[CondEntry]:
    """CONDITIONING → sampler entries. Works with ours and with ComfyUI's native Z-Image text encode
    (its attention_mask drops padding). Combined entries are averaged by strength; timestep ranges are kept."""
    if not cond:
        raise zc.ZImageError(f"the {what} conditioning is empty.")
    out = []
    for t, d in cond:
        if not torch.is_tensor(t) or t.ndim != 3:
            raise zc.ZImageError(f"the {what} conditioning holds {type(t).__name__} {getattr(t, 'shape', '')}, not B×L×D text features.")
        mask = d.get("attention_mask")
        caps = []
        for i in range(t.shape[0]):
            row = t[i]
            if mask is not None and torch.is_tensor(mask) and mask.shape[-1] == row.shape[0]:
                row = row[mask[min(i, mask.shape[0] - 1)].bool()]
            caps.append(row)
        if any(k in d for k in ("area", "mask")):
            log.warning("Z-Image sampler: area/mask conditioning is not supported and was applied to the whole image.")
        refs = siglip = None
        if d.get("reference_latents"):
            extra = [e[0] if e.ndim == 3 else e for e in d.get("reference_latents_text_embeds", [])]
            if len(extra) != len(d["reference_latents"]) + 1:
                raise zc.ZImageError(f"the {what} conditioning has {len(d['reference_latents'])} reference images but "
                                     f"{len(extra)} extra caption segments (expected one more than images); encode it with "
                                     "Z-Image Edit Encode (or ComfyUI's TextEncodeZImageOmni).")
            caps = [assemble_segments(extra, c) for c in caps]
            lat = [zc.to_model_space(r[:, :, 0] if r.ndim == 5 else r).float() for r in d["reference_latents"]]
            refs = [[r[min(i, r.shape[0] - 1)] for r in lat] for i in range(len(caps))]
            feats = d.get("zimage_siglip")
            if feats is None and d.get("clip_vision_outputs"):
                feats = [siglip_from_clip_vision(o) for o in d["clip_vision_outputs"]]
            if feats is not None:
                siglip = [list(feats) + [None] for _ in caps]
        out.append(CondEntry(caps, float(d.get("strength", 1.0)), float(d.get("start_percent", 0.0)),
                             float(d.get("end_percent", 1.0)), refs, siglip))
    return out


def siglip_from_clip_vision(output) -> torch.Tensor:
    """A ComfyUI CLIP_VISION (SigLIP2) output → H×W×C patch features (as ComfyUI's Z-Image model reshapes them)."""
    hs = output["last_hidden_state"] if isinstance(output, dict) else output.last_hidden_state
    size = (output["image_sizes"] if isinstance(output, dict) else output.image_sizes)[0]
    return hs[0].reshape(size[1] // 16, size[2] // 16, hs.shape[-1])


def omni_conditioning(main: torch.Tensor, extra: list[torch.Tensor], ref_latents: list[torch.Tensor],
                      siglip: list[torch.Tensor] | None) -> list:
    """Edit conditioning in ComfyUI's native Z-Image Omni keys: the prompt segment as the tensor, the other caption
    segments (head, between…, tail) as reference_latents_text_embeds, raw reference latents, optional SigLIP."""
    d = {"pooled_output": None, "reference_latents": ref_latents, "reference_latents_text_embeds": [e[None] for e in extra]}
    if siglip is not None:
        d["zimage_siglip"] = siglip
    return [[main[None].cpu(), d]]


def check_features(entries: list[CondEntry], dim: int, what: str) -> None:
    first = entries[0].captions[0]
    d = (first[0] if isinstance(first, list) else first).shape[-1]
    if d != dim:
        raise zc.ZImageError(f"the {what} conditioning has {d}-d text features but this Z-Image model reads {dim}-d "
                             "(Qwen3-4B). Encode the prompt with the Z-Image text encoder.")


# ---- latents, masks, images -----------------------------------------------------------------------


def empty_latent(width: int, height: int, batch: int) -> dict:
    zc.pipeline.check_size(width, height)
    return {"samples": torch.zeros(batch, 16, height // 8, width // 8)}


def resolution_warning(width: int, height: int) -> str | None:
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
        return (f"{width}×{height} is outside the {MIN_SIDE}–{MAX_SIDE} px per side Z-Image was trained on; "
                "expect repeated or broken composition.")
    return None


def latent_samples(latent: dict) -> tuple[torch.Tensor, bool]:
    """Raw latents B×16×h×w and whether they are empty (all zeros; ComfyUI's 4-channel empty latent is widened)."""
    x = latent["samples"]
    if x.ndim == 5 and x.shape[2] == 1:
        x = x[:, :, 0]
    empty = bool(torch.count_nonzero(x) == 0)
    if x.shape[1] != 16:
        if not empty:
            raise zc.ZImageError(f"the latent has {x.shape[1]} channels; Z-Image works on 16-channel FLUX latents "
                                 "(encode images with the FLUX VAE, ae.safetensors).")
        x = torch.zeros(x.shape[0], 16, *x.shape[2:])
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise zc.ZImageError(f"the latent is {x.shape[-1] * 8}×{x.shape[-2] * 8} px; Z-Image needs sides that are multiples of 16.")
    return x.float(), empty


def latent_noise_mask(mask: torch.Tensor, h: int, w: int, batch: int) -> torch.Tensor:
    """LATENT['noise_mask'] (B×1×H×W or B×H×W, any resolution) → B×1×h×w at latent resolution (bilinear, as ComfyUI)."""
    m = mask.float()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    if m.shape[0] < batch:
        m = m.repeat(math.ceil(batch / m.shape[0]), 1, 1, 1)[:batch]
    return m


def grow_and_feather(mask: torch.Tensor, grow: int, feather: int) -> torch.Tensor:
    """Dilate a B×H×W mask by ``grow`` pixels (negative erodes), then soften its edge over ``feather`` pixels."""
    m = mask.float()
    m = m[None] if m.ndim == 2 else m
    m = m[:, None]
    if grow:
        k = 2 * abs(grow) + 1
        m = F.max_pool2d(m, k, 1, abs(grow)) if grow > 0 else 1 - F.max_pool2d(1 - m, k, 1, abs(grow))
    if feather > 0:
        k = 2 * feather + 1
        x = torch.arange(k, dtype=torch.float32) - feather
        g = torch.exp(-0.5 * (x / max(feather / 2, 1e-3)) ** 2)
        g = g / g.sum()
        m = F.conv2d(F.pad(m, (feather, feather, 0, 0), mode="replicate"), g.view(1, 1, 1, k))
        m = F.conv2d(F.pad(m, (0, 0, feather, feather), mode="replicate"), g.view(1, 1, k, 1))
    return m[:, 0].clamp(0, 1)


def fit_image(image: torch.Tensor, mode: str) -> torch.Tensor:
    """B×H×W×C image → sides multiples of 16: 'crop' (centre), 'resize', or 'resize to 1MP' (area-preserving)."""
    b, h, w, c = image.shape
    if mode == "resize to 1MP":
        s = math.sqrt(1024 * 1024 / (h * w))
        th, tw = max(16, round(h * s / 16) * 16), max(16, round(w * s / 16) * 16)
    elif mode == "resize":
        th, tw = max(16, round(h / 16) * 16), max(16, round(w / 16) * 16)
    else:
        x0, y0, x1, y1 = crop_box(w, h)
        return image[:, y0:y1, x0:x1]
    if (th, tw) == (h, w):
        return image
    return F.interpolate(image.movedim(-1, 1), size=(th, tw), mode="bicubic", align_corners=False).clamp(0, 1).movedim(1, -1)


def fit_mask(mask: torch.Tensor, image_hw: tuple[int, int], fitted_hw: tuple[int, int], mode: str) -> torch.Tensor:
    m = mask.float()
    m = m[None] if m.ndim == 2 else m
    if tuple(m.shape[-2:]) != image_hw:
        raise zc.ZImageError(f"the mask is {m.shape[-1]}×{m.shape[-2]} but the image is {image_hw[1]}×{image_hw[0]}; "
                             "they must be the same size.")
    if mode == "crop":
        x0, y0, x1, y1 = crop_box(image_hw[1], image_hw[0])
        return m[:, y0:y1, x0:x1]
    return F.interpolate(m[:, None], size=fitted_hw, mode="bilinear", align_corners=False)[:, 0]


def edit_latent(encode: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, mask: torch.Tensor | None,
                grow: int, feather: int, fit: str) -> dict:
    """IMAGE (+ MASK) → LATENT for the sampler: encoded raw latents and, for inpainting, a noise_mask."""
    fitted = fit_image(image[..., :3], fit)
    out = {"samples": encode(fitted)}
    if mask is not None:
        m = fit_mask(mask, tuple(image.shape[1:3]), tuple(fitted.shape[1:3]), fit)
        m = grow_and_feather(m, grow, feather)
        if m.shape[0] == 1 and fitted.shape[0] > 1:
            m = m.repeat(fitted.shape[0], 1, 1)
        out["noise_mask"] = m[:, None]
    return out


# ---- sampling ---------------------------------------------------------------------------------


@dataclass
class SamplerSettings:
    seed: int
    steps: int
    cfg: float
    shift: float
    denoise: float = 1.0
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    variety: float = 0.0
    variety_fraction: float = 0.3


def resolve_preset(preset: str, steps: int, cfg: float, shift: float) -> tuple[int, float, float]:
    """Turbo/Base fill the recommended values; custom uses the widgets as they are."""
    if preset in zc.PRESETS:
        p = zc.PRESETS[preset]
        return p.steps, p.cfg, p.shift
    return steps, cfg, shift


@dataclass
class SamplingJob:
    """One sampler run, with its inputs read from the graph once: noise B×16×h×w, conditioning entries,
    sigmas, init latents and mask (image-to-image / inpainting), and the LATENT's other keys to pass on."""

    noise: torch.Tensor
    positive: list[CondEntry]
    negative: list[CondEntry] | None
    sigmas: torch.Tensor
    init: torch.Tensor | None
    mask: torch.Tensor | None
    settings: SamplerSettings
    extra: dict

    def run(self, model, callback: Callable[[zc.Step], None] | None = None, cancel: Callable[[], bool] | None = None) -> dict:
        """LATENT out in raw VAE space, as core VAEDecode expects."""
        s = self.settings
        x = zc.sample(model, self.noise, self.positive, self.negative, sigmas=self.sigmas, cfg=s.cfg,
                      cfg_normalization=s.cfg_normalization, cfg_truncation=s.cfg_truncation, init_latents=self.init,
                      mask=self.mask, shift=s.shift, callback=callback, cancel=cancel)
        return {**self.extra, "samples": zc.from_model_space(x).cpu()}


def sample_latent(model, positive: list, negative: list | None, latent: dict, s: SamplerSettings,
                  callback: Callable[[zc.Step], None] | None = None, cancel: Callable[[], bool] | None = None) -> dict:
    """The sampler node in one call: ``prepare_sampling`` then ``SamplingJob.run``."""
    return prepare_sampling(model, positive, negative, latent, s).run(model, callback, cancel)


def prepare_sampling(model, positive: list, negative: list | None, latent: dict, s: SamplerSettings) -> SamplingJob:
    """LATENT in (empty → text-to-image; encoded → image-to-image at ``denoise``; with a noise_mask →
    inpainting) and CONDITIONING → the job, checked against ``model``."""
    raw, empty = latent_samples(latent)
    b, _, h, w = raw.shape
    pos = entries_from_conditioning(vary_conditioning(positive, s.seed, s.variety, s.variety_fraction, b), "positive")
    check_features(pos, model.cfg.cap_feat_dim, "positive")
    neg = None
    if s.cfg > 1.0:
        if negative is None:
            raise zc.ZImageError(f"cfg {s.cfg} needs a negative conditioning: connect one (an empty prompt, or a "
                                 "ConditioningZeroOut of the positive), or set cfg to 1 (Turbo needs no CFG).")
        neg = entries_from_conditioning(negative, "negative")
        check_features(neg, model.cfg.cap_feat_dim, "negative")
    full = zc.sigmas(s.steps, s.shift)
    sig = full if s.denoise >= 1.0 else full[zc.start_index(s.steps, s.denoise):]
    mask = latent.get("noise_mask")
    init = None
    if not empty or s.denoise < 1.0 or mask is not None:
        init = zc.to_model_space(raw)
    m = latent_noise_mask(mask, h, w, b) if mask is not None else None
    noise = zc.comfy_noise((b, 16, h, w), s.seed, latent.get("batch_index"))
    return SamplingJob(noise, pos, neg, sig, init, m, s, {k: v for k, v in latent.items() if k != "samples"})


class StepTimer:
    """Seconds per step and an ETA, for progress messages."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.last = self.t0

    def tick(self, done: int, total: int) -> dict:
        now = time.perf_counter()
        step_s, self.last = now - self.last, now
        per = (now - self.t0) / max(done, 1)
        return {"step": done, "total": total, "step_seconds": round(step_s, 3), "seconds_per_step": round(per, 3),
                "eta_seconds": round(per * (total - done), 1), "elapsed_seconds": round(now - self.t0, 1)}
