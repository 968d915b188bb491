"""The Euler flow-matching loop with classifier-free guidance, image-to-image and inpainting.

Follows diffusers' ZImagePipeline / ZImageImg2ImgPipeline / ZImageInpaintPipeline step for step:
the network predicts (x0 − noise), we negate it into a velocity and take x ← x + (σₙₑₓₜ − σ)·v in fp32.
Guidance uses ComfyUI's convention, ``cfg`` = 1 means off; the reference's guidance_scale g is cfg − 1
(pred = pos + g·(pos − neg)), with optional renormalisation (‖pred‖ ≤ k·‖pos‖) and truncation (no
guidance once the model time exceeds ``cfg_truncation``). Latents are in model space.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from .blocks import BlockRun
from .controlnet import Control, control_hooks
from .errors import ZImageError, ZImageInterrupted
from .loader import nonfinite_error
from .schedule import model_time, percent_to_sigma

log = logging.getLogger("zimage")


@dataclass
class Step:
    """What a step callback receives: 0-based index, total steps, σ, current latents and the x0 estimate."""

    index: int
    total: int
    sigma: float
    x: torch.Tensor
    x0: torch.Tensor


@dataclass
class CondEntry:
    """One conditioning entry: captions (one per batch item, or one for all), a weight, and the part of the
    schedule where it is active, in ComfyUI's percent convention (0 = start, 1 = end, unshifted time)."""

    captions: list  # per latent: a caption tensor, or (Omni) a list of caption segments
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    refs: list | None = None  # Omni: per latent, a list of reference latents (model space, C×h×w)
    siglip: list | None = None  # Omni: per latent, a list of SigLIP H×W×C features (None per slot allowed), or None

    def active(self, sigma: float, shift: float) -> bool:
        return percent_to_sigma(self.end, shift) - 1e-6 <= sigma <= percent_to_sigma(self.start, shift) + 1e-6


def _entries(cond, n: int, dev, what: str) -> list[CondEntry]:
    entries = [c if isinstance(c, CondEntry) else None for c in cond]
    if not all(entries):  # a plain list of caption tensors: one entry
        entries = [CondEntry(list(cond))]
    def per_latent(items, name):
        if items is None:
            return None
        if len(items) == 1:
            return list(items) * n
        if len(items) != n:
            raise ZImageError(f"{len(items)} {name} for a batch of {n} latents; give one, or one per latent.")
        return list(items)

    def to_dev(v):
        if v is None:
            return None
        return [to_dev(a) for a in v] if isinstance(v, (list, tuple)) else v.to(dev)

    return [CondEntry(to_dev(per_latent(e.captions, what)), e.weight, e.start, e.end,
                      to_dev(per_latent(e.refs, "reference sets")), to_dev(per_latent(e.siglip, "SigLIP sets")))
            for e in entries]


def _active(entries: list[CondEntry] | None, sigma: float, shift: float) -> list[CondEntry]:
    if entries is None:
        return []
    now = [e for e in entries if e.active(sigma, shift)]
    return now or entries  # a gap between timestep ranges: use every entry rather than predict nothing


def _forward(model, x, t, e: CondEntry, run: BlockRun) -> torch.Tensor:
    """One model call; with reference latents the target joins them as the last (noisy) image (Omni mode)."""
    if e.refs is None:
        return model(x, t, e.captions, run=run)
    xs = [list(r) + [xi] for r, xi in zip(e.refs, x.unbind(0))]
    mask = [[0] * len(r) + [1] for r in e.refs]
    return torch.stack(model.forward_omni(xs, t, e.captions, siglip=e.siglip, image_noise_mask=mask, run=run))


def _joint(a: CondEntry, b: CondEntry) -> CondEntry | None:
    """Two entries as one batch (the conditional and unconditional CFG passes together), when compatible."""
    if (a.refs is None) != (b.refs is None) or (a.siglip is None) != (b.siglip is None):
        return None
    cat = lambda u, v: None if u is None else u + v  # noqa: E731
    return CondEntry(a.captions + b.captions, refs=cat(a.refs, b.refs), siglip=cat(a.siglip, b.siglip))


def _predict(model, x, t, entries: list[CondEntry], run: BlockRun) -> torch.Tensor:
    """The model's prediction, averaged over several active entries by weight (as ComfyUI combines conds)."""
    if len(entries) == 1:
        return _forward(model, x, t, entries[0], run).float()
    total = sum(e.weight for e in entries)
    return sum(_forward(model, x, t, e, run).float() * (e.weight / total) for e in entries)


def guide(pos: torch.Tensor, neg: torch.Tensor, g: float, normalization: float) -> torch.Tensor:
    """Per-sample CFG in fp32, with the reference's renormalisation."""
    out = []
    for p, n in zip(pos.float(), neg.float()):
        pred = p + g * (p - n)
        if normalization and normalization > 0:
            p_norm, new_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(pred)
            max_norm = p_norm * float(normalization)
            if new_norm > max_norm:
                pred = pred * (max_norm / new_norm)
        out.append(pred)
    return torch.stack(out)


@dataclass
class Guidance:
    """The (guided) prediction at one σ: the positive entries alone, or CFG against the negative ones — both
    passes in one batch while memory allows (an out-of-memory error switches to one after another for good)."""

    positive: list[CondEntry]
    negative: list[CondEntry] | None
    scale: float  # the reference's guidance_scale g (cfg − 1); 0 = no negative pass
    normalization: float = 0.0
    truncation: float = 1.0
    shift: float = 3.0
    batched: bool = True
    control: Sequence[Control] = ()  # Fun ControlNets: the same hints for the conditional and unconditional passes

    def __call__(self, model, x: torch.Tensor, sigma: torch.Tensor, run: BlockRun) -> torch.Tensor:
        b, dev = len(x), x.device
        mt = model_time(sigma)
        t = mt.to(dev).expand(b)
        if self.control:
            run = replace(run, after=[*run.after, *control_hooks(self.control, model, t, tuple(x.shape[-2:]), self.shift)])
        xin = x.to(model.compute_dtype)
        pos = _active(self.positive, float(sigma), self.shift)
        if self.negative is None or (self.truncation is not None and float(self.truncation) <= 1 and mt.item() > self.truncation):
            return _predict(model, xin, t, pos, run)
        neg = _active(self.negative, float(sigma), self.shift)
        joint = _joint(pos[0], neg[0]) if self.batched and len(pos) == len(neg) == 1 else None
        if joint is not None:
            try:
                out = _forward(model, torch.cat([xin, xin]), torch.cat([t, t]), joint, run)
                return guide(out[:b], out[b:], self.scale, self.normalization)
            except torch.OutOfMemoryError:
                log.warning("Out of memory with the CFG passes batched; running them one after another.")
                self.batched = False
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return guide(_predict(model, xin, t, pos, run), _predict(model, xin, t, neg, run), self.scale, self.normalization)


def sample(
    model,
    noise: torch.Tensor,
    positive: list[torch.Tensor] | list[CondEntry],
    negative: list[torch.Tensor] | list[CondEntry] | None = None,
    *,
    sigmas: torch.Tensor,
    cfg: float = 1.0,
    cfg_normalization: float = 0.0,
    cfg_truncation: float = 1.0,
    init_latents: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    batch_cfg: bool = True,
    shift: float = 3.0,
    callback: Callable[[Step], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    control: Sequence[Control] = (),
) -> torch.Tensor:
    """Denoise from ``sigmas[0]`` to ``sigmas[-1]``; returns fp32 model-space latents.

    noise: B×16×h×w fp32. init_latents: clean model-space latents for image-to-image/inpainting
    (None: text-to-image). mask: 1 where the image is regenerated, 0 where ``init_latents`` is kept
    (broadcastable to B×1×h×w). ``positive``/``negative``: one caption tensor per latent (or one for all), or
    a list of ``CondEntry`` (weighted, with active ranges; ``shift`` maps their percents to σ).
    ``cancel()`` returning True stops between blocks and steps with ``ZImageInterrupted``.
    ``control``: Fun ControlNet inputs (controlnet.py), applied to the conditional and unconditional passes alike.
    """
    b, _, h, w = noise.shape
    if h % 2 or w % 2:
        raise ZImageError(f"latent size {h}×{w} must be even (image sides multiples of 16 pixels).")
    dev = model.device
    sig = sigmas.detach().float().cpu()
    n = len(sig) - 1
    if n < 1:
        raise ZImageError("the schedule has no step to run.")
    predict = _guidance(positive, negative, b, dev, cfg, cfg_normalization, cfg_truncation, shift, batch_cfg)
    if control:
        if any(e.refs is not None for e in predict.positive):
            raise ZImageError("ControlNet does not combine with Omni/Edit references.")
        predict.control = list(control)
    noise = noise.to(dev, torch.float32)
    init, mask = _inpaint_inputs(init_latents, mask, b, h, w, dev)
    x = sig[0].to(dev) * noise + (1.0 - sig[0].to(dev)) * (init if init is not None else torch.zeros_like(noise))
    run = BlockRun(cancel=cancel)  # the interrupt is checked before every block
    for i in range(n):
        if cancel is not None and cancel():
            raise ZImageInterrupted("sampling was interrupted")
        s, s_next = sig[i].to(dev), sig[i + 1].to(dev)
        with torch.inference_mode():
            pred = predict(model, x, sig[i], run)
        x_prev, x = x, x + (s_next - s) * (-pred)
        if mask is not None:  # the kept region follows the init image's own noise level
            proper = init if i == n - 1 else s_next * noise + (1.0 - s_next) * init
            x = (1 - mask) * proper + mask * x
        if not torch.isfinite(x).all():
            raise nonfinite_error(model, f"in the latents at step {i + 1} of {n}")
        if callback is not None:
            callback(Step(i, n, float(sig[i]), x, x_prev + s * pred))
    return x


def _guidance(positive, negative, b: int, dev, cfg: float, normalization: float, truncation: float, shift: float,
              batched: bool) -> Guidance:
    pos = _entries(positive, b, dev, "prompts")
    g = float(cfg) - 1.0
    if g <= 0:
        return Guidance(pos, None, 0.0, normalization, truncation, shift, batched)
    if negative is None:
        raise ZImageError(f"cfg {cfg} needs a negative conditioning (an empty prompt is the usual choice).")
    neg = _entries(negative, b, dev, "negative prompts")
    if len(pos) == len(neg) == 1 and pos[0].refs is None and neg[0].refs is None and all(
        p.shape == q.shape and torch.equal(p, q) for p, q in zip(pos[0].captions, neg[0].captions)
    ):
        log.warning("The prompt and the negative prompt are identical, so CFG %.2f changes nothing; "
                    "skipping the unconditional passes (set cfg to 1 to silence this).", cfg)
        return Guidance(pos, None, 0.0, normalization, truncation, shift, batched)
    return Guidance(pos, neg, g, normalization, truncation, shift, batched)


def _inpaint_inputs(init_latents, mask, b: int, h: int, w: int, dev):
    """Init latents (B×16×h×w fp32) and mask (B×1×h×w) on the device, checked against the latent size."""
    init = None if init_latents is None else init_latents.to(dev, torch.float32).expand(b, -1, -1, -1)
    if init is not None and init.shape[-2:] != (h, w):
        raise ZImageError(f"init latents are {tuple(init.shape[-2:])} but the noise is {(h, w)}; they must match.")
    if mask is None:
        return init, None
    if init is None:
        raise ZImageError("a mask needs init latents (the image to inpaint).")
    mask = mask.to(dev, torch.float32)
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.shape[-2:] != (h, w):
        raise ZImageError(f"the mask is {tuple(mask.shape[-2:])} in latent pixels but the latents are {(h, w)}; resize it to match.")
    return init, mask
