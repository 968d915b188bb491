"""GGML block formats, the quantised tensor types of GGUF files, expanded by vectorised torch code.

A GGUF weight stays in memory as its raw blocks (uint8, one row of blocks per weight row) inside a
``Packed`` (packed.py) and is expanded per call on the device the blocks are on. The block layouts and the
arithmetic follow gguf-py's reference (``gguf/quants.py`` in ggml-org/llama.cpp, ``gguf.quants.dequantize``)
step for step in float32, so the result equals it bit for bit; the vectorised form is city96/ComfyUI-GGUF's
``dequant.py``. Pure tensor code without data-dependent control flow: ``torch.compile`` can fuse it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gguf
import torch

QT = gguf.GGMLQuantizationType
QK_K = 256
# The IQ4 non-linear levels (llama.cpp ggml-common.h kvalues_iq4nl).
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    return list(torch.split(blocks, [*sizes, blocks.shape[1] - sum(sizes)], dim=1))


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.float16).float()


def _bits(x: torch.Tensor, width: int, group: int) -> torch.Tensor:
    """Unpack ``width``-bit fields: byte rows of ``group`` bytes, low bits first → (n, groups, 8 / width, group).
    The shifts come from ``arange`` (a kernel, not a host-to-device copy that would wait for the GPU)."""
    sh = torch.arange(0, 8, width, dtype=torch.uint8, device=x.device).reshape(1, 1, -1, 1)
    return (x.reshape(x.shape[0], -1, 1, group) >> sh) & ((1 << width) - 1)


def _u32(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.int32)
    return x[:, 0] | x[:, 1] << 8 | x[:, 2] << 16 | x[:, 3] << 24


def _low_high_5(qs: torch.Tensor, qh: torch.Tensor, half: int) -> torch.Tensor:
    """Q5_0/Q5_1: 4 low bits from nibbles, the 5th bit from a little-endian uint32 per block."""
    n = qs.shape[0]
    high = (_u32(qh)[:, None] >> torch.arange(32, device=qs.device, dtype=torch.int32)) & 1
    low = _bits(qs, 4, half).reshape(n, -1)
    return low.to(torch.int32) | (high << 4)


def q8_0(b):
    d, x = _split(b, 2)
    return x.view(torch.int8).float() * _f16(d)


def q4_0(b):
    d, qs = _split(b, 2)
    return _f16(d) * (_bits(qs, 4, 16).reshape(b.shape[0], -1).to(torch.int8) - 8).float()


def q4_1(b):
    d, m, qs = _split(b, 2, 2)
    return _f16(d) * _bits(qs, 4, 16).reshape(b.shape[0], -1).float() + _f16(m)


def q5_0(b):
    d, qh, qs = _split(b, 2, 4)
    return _f16(d) * (_low_high_5(qs, qh, 16) - 16).float()


def q5_1(b):
    d, m, qh, qs = _split(b, 2, 2, 4)
    return _f16(d) * _low_high_5(qs, qh, 16).float() + _f16(m)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K super-block, packed in 12 bytes."""
    d, m, m_d = torch.split(scales.reshape(-1, 3, 4), 1, dim=1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.reshape(-1, 8).float(), mn.reshape(-1, 8).float()


def q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = _split(b, QK_K // 16, QK_K // 4, 2)
    dl = (_f16(d) * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (_f16(dmin) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, 2, 32).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = _split(b, QK_K // 8, QK_K // 4, 12)
    low = _bits(scales[:, :8], 4, 8).reshape(n, 16)
    high = _bits(scales[:, 8:], 2, 4).reshape(n, 16)
    sc = (low | (high << 4)).to(torch.int8) - 32
    dl = (_f16(d) * sc.float()).reshape(n, 16, 1)
    ql = _bits(qs, 2, 32).reshape(n, 16, 16)
    qh = _bits(hmask, 1, 32).reshape(n, 16, 16) ^ 1
    return (dl * (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()).reshape(n, QK_K)


def q4_k(b):
    n = b.shape[0]
    d, dmin, scales, qs = _split(b, 2, 2, 12)
    sc, mn = _scale_min_k4(scales)
    dl = (_f16(d) * sc).reshape(n, -1, 1)
    ml = (_f16(dmin) * mn).reshape(n, -1, 1)
    q = _bits(qs, 4, 32).reshape(n, -1, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def q5_k(b):
    n = b.shape[0]
    d, dmin, scales, qh, qs = _split(b, 2, 2, 12, QK_K // 8)
    sc, mn = _scale_min_k4(scales)
    dl = (_f16(d) * sc).reshape(n, -1, 1)
    ml = (_f16(dmin) * mn).reshape(n, -1, 1)
    ql = _bits(qs, 4, 32).reshape(n, -1, 32)
    high = _bits(qh, 1, 32).reshape(n, -1, 32)
    return (dl * (ql | (high << 4)).float() - ml).reshape(n, QK_K)


def q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = _split(b, QK_K // 2, QK_K // 4, QK_K // 16)
    dl = (_f16(d) * scales.view(torch.int8).float()).reshape(n, QK_K // 16, 1)
    low = _bits(ql, 4, 64).reshape(n, -1, 32)
    high = _bits(qh, 2, 32).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1)
    return (dl * q.float()).reshape(n, QK_K)


@functools.cache  # never evicted: a CUDA graph may hold its address (cuda_graphs.py)
def _iq4_levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=device)  # copied to each device once


def _iq4(idx: torch.Tensor) -> torch.Tensor:
    return _iq4_levels(idx.device)[idx.long()]


def iq4_nl(b):
    d, qs = _split(b, 2)
    return _f16(d) * _iq4(_bits(qs, 4, 16).reshape(b.shape[0], -1))


def iq4_xs(b):
    n = b.shape[0]
    d, sh, sl, qs = _split(b, 2, 2, QK_K // 64)
    high = (sh.to(torch.int32)[:, :1] | sh.to(torch.int32)[:, 1:] << 8) >> torch.arange(0, 16, 2, device=b.device, dtype=torch.int32)
    low = _bits(sl, 4, 1).reshape(n, -1)
    sc = (low.to(torch.int32) | ((high & 3) << 4)) - 32
    dl = (_f16(d) * sc.float()).reshape(n, -1, 1)
    return (dl * _iq4(_bits(qs, 4, 16).reshape(n, -1, 32))).reshape(n, QK_K)


EXPAND = {
    QT.Q8_0: q8_0, QT.Q5_1: q5_1, QT.Q5_0: q5_0, QT.Q4_1: q4_1, QT.Q4_0: q4_0,
    QT.Q6_K: q6_k, QT.Q5_K: q5_k, QT.Q4_K: q4_k, QT.Q3_K: q3_k, QT.Q2_K: q2_k,
    QT.IQ4_NL: iq4_nl, QT.IQ4_XS: iq4_xs,
}


@dataclass(frozen=True)
class GGMLFormat:
    """One GGML quantisation type; its tensor is ``blocks``: uint8, rows × (row length / block size · block bytes)."""

    qtype: int
    rowwise: bool = True

    @property
    def name(self) -> str:
        return QT(self.qtype).name

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = gguf.GGML_QUANT_SIZES[QT(self.qtype)][1]
        return EXPAND[QT(self.qtype)](tensors["blocks"].reshape(-1, size)).reshape(shape).to(dtype)
