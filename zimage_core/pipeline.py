"""The whole Z-Image pipeline: find weights, encode prompts, sample, decode. Shared by the CLI, nodes and tests."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .autoencoder import AutoEncoder, from_model_space, load_autoencoder, to_model_space
from .controlnet import Control, ControlImage, control_models, prepare_control
from .errors import ZImageError
from .images import pil_to_tensor, prepare_reference_image
from .noise import comfy_noise
from .sampler import CondEntry, Step, sample
from .schedule import PRESETS, sigmas, start_index
from .templates import TEMPLATE_PROMPT, assemble_segments, reference_segments
from .text_encoder import load_text_encoder
from .transformer_files import load_transformer
from .variety import vary

log = logging.getLogger("zimage")

DOWNLOADS = """\
Z-Image needs three files (put them in a ComfyUI models folder, or pass an HF model folder with --hf):
  models/diffusion_models/z_image_turbo_bf16.safetensors   https://huggingface.co/Comfy-Org/z_image_turbo (split_files/diffusion_models)
  models/text_encoders/qwen_3_4b.safetensors                https://huggingface.co/Comfy-Org/z_image_turbo (split_files/text_encoders)
  models/vae/ae.safetensors                                 https://huggingface.co/Comfy-Org/z_image_turbo (split_files/vae)
or the whole diffusers folder https://huggingface.co/Tongyi-MAI/Z-Image-Turbo (transformer/, text_encoder/, tokenizer/, vae/)."""


@dataclass
class WeightPaths:
    transformer: str
    text_encoder: str
    vae: str
    tokenizer: str | None = None


def _pick(folder: str, patterns: list[str]) -> str | None:
    for pat in patterns:
        hits = sorted(glob.glob(os.path.join(folder, "**", pat), recursive=True))
        if hits:
            return hits[0]
    return None


def find_text_encoder(models: str) -> str | None:
    return _pick(os.path.join(models, "text_encoders"), ["qwen_3_4b.safetensors", "qwen_3_4b*.safetensors", "*qwen3*4b*.safetensors"]) \
        or _pick(os.path.join(models, "clip"), ["qwen_3_4b*.safetensors"]) \
        or _pick(os.path.join(models, "text_encoders"), ["*qwen3*4b*.gguf"]) or _pick(os.path.join(models, "clip"), ["*qwen3*4b*.gguf"])


def find_weights(models: str | None = None, hf: str | None = None, transformer: str | None = None,
                 text_encoder: str | None = None, vae: str | None = None, tokenizer: str | None = None) -> WeightPaths:
    """Explicit paths win; then an HF model folder; then a ComfyUI ``models/`` folder; else say what to download."""
    if hf:
        transformer = transformer or hf
        text_encoder = text_encoder or hf
        vae = vae or hf
    if models:
        transformer = transformer or _pick(os.path.join(models, "diffusion_models"), ["z_image_turbo*.safetensors", "z_image*.safetensors", "*z_image*.safetensors"]) \
            or _pick(os.path.join(models, "unet"), ["*z_image*.safetensors"]) \
            or _pick(os.path.join(models, "diffusion_models"), ["*z_image*.gguf"]) or _pick(os.path.join(models, "unet"), ["*z_image*.gguf"])
        text_encoder = text_encoder or find_text_encoder(models)
        vae = vae or _pick(os.path.join(models, "vae"), ["ae.safetensors", "*flux*ae*.safetensors", "*z_image*vae*.safetensors"])
    missing = [n for n, p in (("transformer", transformer), ("text encoder", text_encoder), ("VAE", vae)) if not p]
    if missing:
        where = f" in {models}" if models else ""
        names = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
        raise ZImageError(f"Could not find the {names}{where}.\n{DOWNLOADS}")
    return WeightPaths(transformer, text_encoder, vae, tokenizer)


@dataclass
class GenerationSettings:
    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int | None = None
    cfg: float | None = None
    shift: float = 3.0
    seed: int = 0
    batch_size: int = 1
    preset: str = "turbo"
    strength: float = 1.0
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    variety: float = 0.0  # seed variety (see variety.py): noise on the prompt for the first variety_fraction of the schedule
    variety_fraction: float = 0.3
    extra: dict = field(default_factory=dict)

    def resolved(self) -> GenerationSettings:
        p = PRESETS.get(self.preset)
        if p is None and (self.steps is None or self.cfg is None):
            raise ZImageError(f"unknown preset {self.preset!r}; choose {', '.join(PRESETS)} or give steps and cfg.")
        s = GenerationSettings(**asdict(self))
        s.steps = self.steps if self.steps is not None else p.steps
        s.cfg = self.cfg if self.cfg is not None else p.cfg
        return s


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if v % 16 or v < 16:
            raise ZImageError(f"{name} {v} is not a positive multiple of 16; Z-Image needs multiples of 16 "
                              f"(nearest: {max(16, round(v / 16) * 16)}).")


def image_to_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image or B×H×W×3 / B×3×H×W tensor in [0, 1] → B×3×H×W float in [0, 1]."""
    if isinstance(img, Image.Image):
        a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(a).permute(2, 0, 1)[None]
    t = img.float()
    if t.ndim == 3:
        t = t[None]
    return t if t.shape[1] == 3 else t.movedim(-1, 1)


def mask_to_latent(mask: Image.Image | torch.Tensor, h: int, w: int, binarize: bool = True) -> torch.Tensor:
    """Pixel mask (white/1 = regenerate) → B×1×h×w in latent pixels: binarised at 0.5, nearest-resized (as diffusers)."""
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    else:
        m = mask.float()
        m = m[None, None] if m.ndim == 2 else m[:, None] if m.ndim == 3 else m
    if binarize:
        m = (m >= 0.5).float()
    return F.interpolate(m, size=(h, w), mode="nearest")


class ZImagePipeline:
    """Text-to-image, image-to-image and inpainting with our transformer, text encoder and autoencoder."""

    # On a CPU device the weights already live where compute runs; tests set this to stream there all the same.
    stream_on_cpu = False

    def __init__(self, transformer, text_encoder, autoencoder: AutoEncoder, device="cpu", offload: str = "auto",
                 vram_budget_gb: float | None = None):
        self.transformer, self.text_encoder, self.autoencoder = transformer, text_encoder, autoencoder
        self.device, self.offload_mode, self.vram_budget_gb = torch.device(device), offload, vram_budget_gb

    @classmethod
    def from_paths(cls, paths: WeightPaths, dtype: torch.dtype | None = torch.bfloat16, device="cpu",
                   vae_dtype: torch.dtype | None = None, offload: str = "auto", vram_budget_gb: float | None = None,
                   storage_dtype: torch.dtype | None = None) -> ZImagePipeline:
        """Weights load into host memory; on a GPU each model is placed (or streamed) only while it runs."""
        dit = load_transformer(paths.transformer, dtype=dtype, storage_dtype=storage_dtype)
        te = load_text_encoder(paths.text_encoder, dtype=dtype, tokenizer=paths.tokenizer, expect_hidden=dit.cfg.cap_feat_dim)
        vae = load_autoencoder(paths.vae, dtype=vae_dtype)
        return cls(dit, te, vae, device, offload, vram_budget_gb)

    @contextmanager
    def on_device(self, model, sides=(), **activation_args):
        """Run ``model`` on the pipeline's device under the offload plan, and hand the memory back afterwards.
        ``sides``: its control models, planned under the same budget (streamed first when it is short)."""
        if self.device.type == "cpu" and not self.stream_on_cpu:
            yield
            return
        from .offload import offload

        st = offload(model, mode=self.offload_mode, budget_gb=self.vram_budget_gb, device=self.device, sides=sides,
                     **activation_args)
        try:
            yield
        finally:
            st.detach()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @contextmanager
    def vae_on_device(self):
        if self.device.type == "cpu":
            yield
            return
        self.autoencoder.to(self.device)
        try:
            yield
        finally:
            self.autoencoder.to("cpu")
            torch.cuda.empty_cache()

    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        with self.on_device(self.text_encoder):
            caps = [c.cpu() for c in self.text_encoder.encode(prompts)]
        if caps and caps[0].shape[-1] != self.transformer.cfg.cap_feat_dim:
            raise ZImageError(f"the text encoder gives {caps[0].shape[-1]}-d features but the transformer reads "
                              f"{self.transformer.cfg.cap_feat_dim}-d; pair the model with its own text encoder (Qwen3-4B).")
        return caps

    def encode_references(self, images: list, vae_tile: int | None = None) -> list[torch.Tensor]:
        """Reference images → model-space latents (16×h×w), prepared as the Omni reference does."""
        out = []
        with self.vae_on_device():
            for im in images:
                pil = im if isinstance(im, Image.Image) else to_pil(image_to_tensor(im)[0])
                x = pil_to_tensor(prepare_reference_image(pil))
                out.append(to_model_space(self.autoencoder.encode(x, tile=vae_tile))[0].cpu())
        return out

    def omni_conditions(self, prompts: list[str], refs: list[torch.Tensor], siglip: list | None) -> list[CondEntry]:
        """One entry per prompt: caption segments around the vision markers + the reference latents (+ SigLIP
        features). The prompt-independent segments are encoded once, with every prompt, in one pass."""
        if siglip is not None and len(siglip) != len(refs):
            raise ZImageError(f"{len(siglip)} SigLIP feature maps for {len(refs)} reference images; give one per image.")
        shared = reference_segments(len(refs))
        with self.on_device(self.text_encoder):
            enc = [c.cpu() for c in self.text_encoder.encode(shared + [TEMPLATE_PROMPT.format(p) for p in prompts], template="{}")]
        others = enc[: len(shared)]
        return [CondEntry([assemble_segments(others, seg)], refs=[refs], siglip=None if siglip is None else [list(siglip) + [None]])
                for seg in enc[len(shared):]]

    def encode_controls(self, controls: list[ControlImage], width: int, height: int, vae_tile: int | None = None) -> list[Control]:
        """Control images (PIL or tensors; resized to the output size) → the control models' inputs."""

        def fit(im):
            if im is None:
                return None
            if isinstance(im, Image.Image):
                return image_to_tensor(im if im.size == (width, height) else im.resize((width, height), Image.LANCZOS))
            t = image_to_tensor(im)
            return t if t.shape[-2:] == (height, width) else F.interpolate(t, (height, width), mode="bilinear", antialias=True)

        def encode(x):
            return to_model_space(self.autoencoder.encode(x, tile=vae_tile)).cpu()

        def mask(m):  # pixel size, not binarised yet (prepare_control does that)
            return None if m is None else mask_to_latent(m, height, width, binarize=False)

        with self.vae_on_device():
            return [prepare_control(replace(c, image=fit(c.image), inpaint_image=fit(c.inpaint_image), mask=mask(c.mask)), encode)
                    for c in controls]

    def __call__(self, settings: GenerationSettings, init_image=None, mask=None,
                 callback: Callable[[Step], None] | None = None, cancel: Callable[[], bool] | None = None,
                 vae_tile: int | None = None, reference_images: list | None = None,
                 siglip_features: list[torch.Tensor] | None = None,
                 controls: list[ControlImage] | None = None) -> tuple[list[Image.Image], torch.Tensor]:
        """Text-to-image; with ``init_image`` (and ``mask``) image-to-image (inpainting); with ``reference_images``
        (up to 3, plus optional SigLIP2 features per image) instruction editing in the Omni scheme; ``controls``:
        Fun ControlNet models with their images (structure control, ControlNet inpainting)."""
        s = settings.resolved()
        init = None
        if init_image is not None:
            init = image_to_tensor(init_image)
            ih, iw = init.shape[-2:]
            if (iw, ih) != (s.width, s.height):
                raise ZImageError(f"the init image is {iw}×{ih} but the requested size is {s.width}×{s.height}; "
                                  "resize the image or ask for its size.")
        check_size(s.width, s.height)
        if s.batch_size < 1:
            raise ZImageError(f"batch size must be at least 1 (got {s.batch_size}).")
        h, w = s.height // 8, s.width // 8
        full = sigmas(s.steps, s.shift)
        init_latents = latent_mask = None
        if init is not None:
            sig = full[start_index(s.steps, s.strength):]
            with self.vae_on_device():
                init_latents = to_model_space(self.autoencoder.encode(init, tile=vae_tile)).cpu()
            if mask is not None:
                mh, mw = (mask.size[1], mask.size[0]) if isinstance(mask, Image.Image) else tuple(mask.shape[-2:])
                if (mh, mw) != (s.height, s.width):
                    raise ZImageError(f"the mask is {mw}×{mh} but the image is {s.width}×{s.height}; they must be the same size.")
                latent_mask = mask_to_latent(mask, h, w)
        else:
            if mask is not None:
                raise ZImageError("a mask needs an init image to inpaint.")
            if s.strength != 1.0:
                log.warning("strength %.2f ignored: it applies only to image-to-image.", s.strength)
            sig = full
        use_cfg = s.cfg > 1.0
        if reference_images:
            if len(reference_images) > 3:
                raise ZImageError(f"{len(reference_images)} reference images; Z-Image's edit template takes at most 3.")
            refs = self.encode_references(reference_images, vae_tile)
            conds = self.omni_conditions([s.prompt, s.negative_prompt] if use_cfg else [s.prompt], refs, siglip_features)
            pos, neg = [conds[0]], [conds[1]] if use_cfg else None
        elif siglip_features is not None:
            raise ZImageError("SigLIP features need reference images.")
        else:  # positive and negative in one text-encoder pass
            caps = self.encode_prompts([s.prompt, s.negative_prompt] if use_cfg else [s.prompt])
            pos, neg = caps[:1], caps[1:] if use_cfg else None
            if s.variety and s.variety_fraction > 0:  # one variation per image of the batch
                parts = vary([(caps[0].expand(s.batch_size, -1, -1), 0.0, 1.0)], s.seed, s.variety, s.variety_fraction)
                pos = [CondEntry(list(x.unbind(0)), start=a, end=b) for _, x, a, b in parts]
        ctl = self.encode_controls(controls, s.width, s.height, vae_tile) if controls else []
        noise = comfy_noise((s.batch_size, 16, h, w), s.seed)
        with self.on_device(self.transformer, control_models(ctl), width=s.width, height=s.height, batch=s.batch_size, cfg=use_cfg):
            x = sample(self.transformer, noise, pos, neg, sigmas=sig, cfg=s.cfg, cfg_normalization=s.cfg_normalization,
                       cfg_truncation=s.cfg_truncation, init_latents=init_latents, mask=latent_mask, shift=s.shift,
                       callback=callback, cancel=cancel, control=ctl).cpu()
        with self.vae_on_device():
            images = self.autoencoder.decode(from_model_space(x), tile=vae_tile).cpu()
        return [to_pil(im) for im in images], x


def to_pil(img: torch.Tensor) -> Image.Image:
    """3×H×W in [0, 1] → PIL (rounded as diffusers' numpy_to_pil: ×255 then round)."""
    a = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(a)
