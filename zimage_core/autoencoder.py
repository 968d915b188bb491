"""The FLUX.1 autoencoder (16 latent channels, 8× down) that Z-Image uses, with tiled encode/decode.

Module names follow BFL's ``ae.safetensors``; the diffusers ``vae/`` naming is mapped onto them. Latents
returned by ``encode`` and taken by ``decode`` are raw VAE space (what ComfyUI's LATENT holds);
``to_model_space`` / ``from_model_space`` apply Z-Image's shift and scale: model = (z − 0.1159) · 0.3611.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .detect import block_count, looks_like, strip_prefix
from .errors import ZImageError
from .loader import Source, fill_module
from .safetensors_io import open_weights
from .vae_tiling import decode_tiled, encode_moments_tiled

SCALE, SHIFT = 0.3611, 0.1159


def to_model_space(z: torch.Tensor) -> torch.Tensor:
    return (z - SHIFT) * SCALE


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    return x / SCALE + SHIFT


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


SCORE_ELEMENTS = 1 << 26  # attention scores held at once in the mid-block (256 MB in fp32)


class AttnBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        # One head as wide as the channels (512): no fused kernel takes it, so SDPA builds the whole score matrix
        # (20 GB at 2048², measured on an H200). Queries in chunks bound it; exact, each query's softmax is its own.
        step = max(1, SCORE_ELEMENTS // (h * w))
        o = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + step], k, v) for i in range(0, h * w, step)], dim=2)
        return x + self.proj_out(o.transpose(2, 3).reshape(b, c, h, w))


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch, groups), AttnBlock(ch, groups), ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, name, resample)
        self.resample_name = name if resample is not None else None

    def forward(self, x):
        for b in self.block:
            x = b(x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Encoder(nn.Module):
    def __init__(self, chs: list[int], n_res: int, z: int, groups: int, cin: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, chs[0], 3, padding=1)
        levels, prev = [], chs[0]
        for i, ch in enumerate(chs):
            blocks = [ResnetBlock(prev if j == 0 else ch, ch, groups) for j in range(n_res)]
            levels.append(Level(blocks, Downsample(ch) if i < len(chs) - 1 else None, "downsample"))
            prev = ch
        self.down = nn.ModuleList(levels)
        self.mid = Mid(chs[-1], groups)
        self.norm_out, self.conv_out = _norm(chs[-1], groups), nn.Conv2d(chs[-1], 2 * z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, chs: list[int], n_res: int, z: int, groups: int, cout: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(z, chs[-1], 3, padding=1)
        self.mid = Mid(chs[-1], groups)
        levels: list[Level | None] = [None] * len(chs)
        prev = chs[-1]
        for i in reversed(range(len(chs))):  # BFL indexes up-levels by resolution: up[last] runs first
            ch = chs[i]
            blocks = [ResnetBlock(prev if j == 0 else ch, ch, groups) for j in range(n_res + 1)]
            levels[i] = Level(blocks, Upsample(ch) if i > 0 else None, "upsample")
            prev = ch
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _norm(chs[0], groups), nn.Conv2d(chs[0], cout, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """``encode(images in [0, 1], B×3×H×W) → raw latents``; ``decode(raw latents) → images in [0, 1]``."""

    def __init__(self, chs: list[int], n_res: int, z: int = 16, groups: int = 32, dtype=torch.float32,
                 dec_chs: list[int] | None = None):
        super().__init__()
        self.encoder = Encoder(chs, n_res, z, groups)
        self.decoder = Decoder(dec_chs or chs, n_res, z, groups)
        self.compute_dtype, self.z_channels = dtype, z
        self.factor = 2 ** (len(chs) - 1)
        self.source_path: str | None = None  # set by the loader

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, tile: int | None = None) -> torch.Tensor:
        """Images in [0, 1] (B×3×H×W) → raw latents: the posterior mean (as ComfyUI encodes), or a sample
        drawn with ``generator`` (as diffusers' retrieve_latents). ``tile`` (pixels) runs it exactly, tile by tile."""
        x = (images.to(self.device, torch.float32) * 2.0 - 1.0).to(self.compute_dtype)
        if tile and max(x.shape[-2:]) > tile:
            moments = encode_moments_tiled(self, x, tile)
        else:
            moments = self.encoder(x).float()
        if self.compute_dtype == torch.float16 and not torch.isfinite(moments).all():
            return self.in_fp32(self.encode, images, generator, tile)
        mean, logvar = moments.chunk(2, dim=1)
        if generator is None:
            return mean
        eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Raw latents → images in [0, 1] (B×3×H×W, fp32). ``tile`` (output pixels) bounds the compute
        device's memory; the result equals the untiled decode up to rounding."""
        img = self._decode(z, tile)
        if self.compute_dtype == torch.float16 and not torch.isfinite(img).all():
            img = self.in_fp32(self._decode, z, tile)  # the FLUX autoencoder can overflow fp16: never a black image
        return (img / 2 + 0.5).clamp(0, 1)

    def _decode(self, z: torch.Tensor, tile: int | None) -> torch.Tensor:
        z = z.to(self.device, self.compute_dtype)
        if tile and max(z.shape[-2:]) * self.factor > tile:
            return decode_tiled(self, z, tile).to(self.device)
        return self.decoder(z).float()

    def in_fp32(self, fn, *args):
        """Run ``fn`` with the weights temporarily in fp32 (ComfyUI's working dtypes for this VAE are bf16 and
        fp32, comfy/sd.py; fp16 is kept for speed and memory, and this is the way out when it overflows)."""
        dtype = self.compute_dtype
        self.float()
        self.compute_dtype = torch.float32
        try:
            return fn(*args)
        finally:
            self.to(dtype)
            self.compute_dtype = dtype


# ---- files ------------------------------------------------------------------------------------------

_DIFFUSERS = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.conv_shortcut\.", r".nin_shortcut."),
]


def _bfl_name(key: str, n_levels: int) -> str:
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", key)
    if m:
        lvl = n_levels - 1 - int(m.group(1))
        key = f"decoder.up.{lvl}.block.{m.group(3)}.{m.group(4)}" if m.group(2) == "resnets" else f"decoder.up.{lvl}.upsample.{m.group(4)}"
    for pat, rep in _DIFFUSERS:
        key = re.sub(pat, rep, key)
    return key


def load_autoencoder(path: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> AutoEncoder:
    """Load the FLUX autoencoder from BFL's ``ae.safetensors`` or a diffusers ``vae/`` folder (or its parent)."""
    files = open_weights(path, subfolder="vae")
    keys = files.keys()
    prefix = strip_prefix(keys, ("vae.", "first_stage_model.", "model."), "encoder.conv_in.weight")
    if prefix + "encoder.conv_in.weight" not in files or prefix + "decoder.conv_out.weight" not in files:
        raise ZImageError(
            f"{files.path} {looks_like(keys, files.shape)}, not the FLUX autoencoder Z-Image uses. "
            "Choose ae.safetensors (black-forest-labs/FLUX.1-schnell, or Comfy-Org/z_image_turbo split_files/vae) "
            "in models/vae, or the vae/ folder of Tongyi-MAI/Z-Image-Turbo."
        )
    diffusers = any(k.startswith(prefix + "encoder.down_blocks.") for k in keys)
    bare = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    levels = block_count(bare, r"encoder\.down(?:_blocks)?\.(\d+)\.", "encoder level", files.path, limit=16)
    names = {(_bfl_name(k, levels) if diffusers else k): prefix + k for k in bare}
    try:
        chs = [files.shape(names[f"encoder.down.{i}.block.0.conv1.weight"])[0] for i in range(levels)]
        dec_chs = [files.shape(names[f"decoder.up.{i}.block.0.conv1.weight"])[0] for i in range(levels)]
        n_res = block_count(list(names), r"encoder\.down\.0\.block\.(\d+)\.", "encoder block", files.path, limit=16)
        z = files.shape(names["decoder.conv_in.weight"])[1]
        conf = files.config()  # a diffusers vae/ config; a stray config.json of something else is ignored
        groups = int(files.config_number(conf, "norm_num_groups", 32) if "latent_channels" in conf else 32)  # FLUX: 32
    except (KeyError, ValueError, IndexError) as e:
        raise ZImageError(f"{files.path}: incomplete autoencoder weights ({e}).") from None
    if z != 16:
        raise ZImageError(
            f"{files.path} is an autoencoder with {z} latent channels; Z-Image needs the 16-channel FLUX autoencoder (ae.safetensors)."
        )
    if not chs or any(c % groups for c in chs + dec_chs):
        raise ZImageError(f"{files.path}: channel counts {chs} do not divide into {groups} normalisation groups; "
                          "the file is damaged or not the FLUX autoencoder.")
    file_dtype = files.dtype(names["decoder.conv_in.weight"])
    compute = dtype or (file_dtype if file_dtype.is_floating_point and file_dtype.itemsize >= 2 else torch.float32)
    with torch.device("meta"):
        model = AutoEncoder(chs, n_res, z, groups, compute, dec_chs)
    params = dict(model.named_parameters())
    unexpected = [v for k, v in names.items() if k not in params]
    if unexpected:
        raise ZImageError(f"{files.path}: {len(unexpected)} unexpected tensor(s) for the FLUX autoencoder, e.g. {', '.join(unexpected[:4])}.")
    # diffusers stores the mid-block attention projections as linears: [C, C] → our 1×1 convs [C, C, 1, 1]
    plan = {k: Source([names[k]], view=tuple(p.shape)) for k, p in params.items() if k in names}
    fill_module(model, files, plan, compute_dtype=compute, storage_dtype=None, device=device, what="FLUX autoencoder")
    model.source_path = files.path
    return model.eval()
