"""Exact tiled execution of the FLUX autoencoder: low memory without seams.

Blending independently decoded tiles leaves seams and colour shifts, because every GroupNorm sees
different statistics. Here the network runs layer by layer: whole-image activations stay on the
``store`` device (the CPU when computing on a GPU), GroupNorm statistics are accumulated over the whole
image, and each convolution is computed tile by tile from a window with a one-pixel halo. The result
equals the untiled pass up to rounding; only one tile's intermediate tensors live on the compute device.
The mid-block (with its global attention) runs untiled at 1/8 resolution, where it is small.
The modules are autoencoder.py's (``AutoEncoder``, ``Level``, ``ResnetBlock``); this file only walks them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _spans(n: int, tile: int) -> list[tuple[int, int]]:
    return [(a, min(a + tile, n)) for a in range(0, n, tile)]


def group_stats(x: torch.Tensor, norm: nn.GroupNorm, tile: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and 1/std over the whole image, accumulated tile by tile in float64."""
    b, c, h, w = x.shape
    g = norm.num_groups
    s = torch.zeros(b, g, dtype=torch.float64, device=dev)
    ss = torch.zeros_like(s)
    for y0, y1 in _spans(h, tile):
        part = x[:, :, y0:y1].to(dev, torch.float64).reshape(b, g, -1)
        s += part.sum(-1)
        ss += (part * part).sum(-1)
    n = (c // g) * h * w
    mean = s / n
    var = (ss / n - mean * mean).clamp(min=0)
    return mean.float(), torch.rsqrt(var.float() + norm.eps)


def _normalize(t: torch.Tensor, norm: nn.GroupNorm, stats) -> torch.Tensor:
    b, c = t.shape[:2]
    g = norm.num_groups
    mean, rstd = stats
    y = (t.float().reshape(b, g, c // g, *t.shape[2:]) - mean[:, :, None, None, None]) * rstd[:, :, None, None, None]
    y = y.reshape(t.shape) * norm.weight.float()[None, :, None, None] + norm.bias.float()[None, :, None, None]
    return F.silu(y).to(t.dtype)


def conv_tiled(conv: nn.Conv2d, x: torch.Tensor, tile: int, dev, store, pre=None, up: bool = False,
               pad_lo: int | None = None) -> torch.Tensor:
    """conv(pre(x)) (or conv(upsample2(pre(x)))) computed per output tile; zero padding where the window leaves the image."""
    k, s = conv.kernel_size[0], conv.stride[0]
    p = conv.padding[0] if pad_lo is None else pad_lo
    b, _, h, w = x.shape
    hin, win = (2 * h, 2 * w) if up else (h, w)
    pad_total = 2 * p if pad_lo is None else 1  # the downsampler pads (0, 1) on each axis
    hout, wout = (hin + pad_total - k) // s + 1, (win + pad_total - k) // s + 1
    out = torch.empty(b, conv.out_channels, hout, wout, dtype=x.dtype, device=store)
    for oy0, oy1 in _spans(hout, tile):
        for ox0, ox1 in _spans(wout, tile):
            iy0, iy1 = oy0 * s - p, (oy1 - 1) * s - p + k
            ix0, ix1 = ox0 * s - p, (ox1 - 1) * s - p + k
            cy0, cy1, cx0, cx1 = max(iy0, 0), min(iy1, hin), max(ix0, 0), min(ix1, win)
            if up:  # the low-resolution rows/columns that cover [c0, c1) after ×2 nearest upsampling
                sy0, sy1, sx0, sx1 = cy0 // 2, (cy1 - 1) // 2 + 1, cx0 // 2, (cx1 - 1) // 2 + 1
                src = x[:, :, sy0:sy1, sx0:sx1].to(dev)
                src = pre(src) if pre else src
                src = F.interpolate(src, scale_factor=2.0, mode="nearest")
                src = src[:, :, cy0 - 2 * sy0 : cy1 - 2 * sy0, cx0 - 2 * sx0 : cx1 - 2 * sx0]
            else:
                src = x[:, :, cy0:cy1, cx0:cx1].to(dev)
                src = pre(src) if pre else src
            src = F.pad(src, (cx0 - ix0, ix1 - cx1, cy0 - iy0, iy1 - cy1))
            out[:, :, oy0:oy1, ox0:ox1] = F.conv2d(src, conv.weight, conv.bias, stride=s).to(store)
    return out


def resnet_tiled(blk: nn.Module, x: torch.Tensor, tile: int, dev, store) -> torch.Tensor:
    st1 = group_stats(x, blk.norm1, tile, dev)
    h = conv_tiled(blk.conv1, x, tile, dev, store, pre=lambda t: _normalize(t, blk.norm1, st1))
    st2 = group_stats(h, blk.norm2, tile, dev)
    h = conv_tiled(blk.conv2, h, tile, dev, store, pre=lambda t: _normalize(t, blk.norm2, st2))
    if blk.nin_shortcut is None:
        return h.add_(x)
    return h.add_(conv_tiled(blk.nin_shortcut, x, tile, dev, store))


def _level(level: nn.Module, x, tile, dev, store):
    for blk in level.block:
        x = resnet_tiled(blk, x, tile, dev, store)
    if level.resample_name == "upsample":
        return conv_tiled(level.upsample.conv, x, tile, dev, store, up=True)
    if level.resample_name == "downsample":
        return conv_tiled(level.downsample.conv, x, tile, dev, store, pad_lo=0)
    return x


def store_device(dev: torch.device, full_res_bytes: int) -> torch.device:
    """Where whole-image activations wait between layers: the compute device when a few of them fit in its free
    memory (then tiling only bounds each convolution's workspace, at untiled speed), else host memory (every layer
    then crosses the bus: about 70× slower at 1024² on an H200, but it fits any card)."""
    if dev.type != "cuda":
        return dev
    return dev if 4 * full_res_bytes < torch.cuda.mem_get_info(dev)[0] else torch.device("cpu")


def _full_res_bytes(ae: nn.Module, b: int, h: int, w: int) -> int:
    """Bytes of the largest whole-image activation: the widest full-resolution level."""
    chs = max(ae.encoder.down[0].block[0].conv1.out_channels, ae.decoder.up[0].block[0].conv1.out_channels)
    return b * chs * h * w * torch.finfo(ae.compute_dtype).bits // 8


@torch.inference_mode()
def decode_tiled(ae: nn.Module, z: torch.Tensor, tile: int) -> torch.Tensor:
    """Raw latents → decoder output in [-1, 1] (fp32, on the store device); ``tile`` in output pixels."""
    dev = ae.device
    store = store_device(dev, _full_res_bytes(ae, z.shape[0], z.shape[2] * ae.factor, z.shape[3] * ae.factor))
    d = ae.decoder
    h = d.mid(d.conv_in(z.to(dev, ae.compute_dtype))).to(store)
    scale = ae.factor
    for level in reversed(d.up):
        h = _level(level, h, max(8, tile // scale), dev, store)
        if level.resample_name:
            scale //= 2
    st = group_stats(h, d.norm_out, tile, dev)
    return conv_tiled(d.conv_out, h, tile, dev, store, pre=lambda t: _normalize(t, d.norm_out, st)).float()


@torch.inference_mode()
def encode_moments_tiled(ae: nn.Module, x: torch.Tensor, tile: int) -> torch.Tensor:
    """Images in [-1, 1] → encoder output (mean and log-variance), tile by tile; ``tile`` in input pixels."""
    dev = ae.device
    store = store_device(dev, _full_res_bytes(ae, x.shape[0], x.shape[2], x.shape[3]))
    e = ae.encoder
    h = conv_tiled(e.conv_in, x.to(store, ae.compute_dtype), tile, dev, store)
    scale = 1
    for level in e.down:
        h = _level(level, h, max(8, tile // scale), dev, store)
        if level.resample_name:
            scale *= 2
    h = e.mid(h.to(dev))
    return e.conv_out(F.silu(e.norm_out(h))).float()
