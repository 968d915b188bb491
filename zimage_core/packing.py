"""Sequence packing: per-sample token runs of different lengths → one B×S×D batch with RoPE and a key mask.

Z-Image pads every run (image patches, caption, SigLIP) to a multiple of 32 with a learned pad token;
those pads are attended to. Only the padding *between* samples of different lengths is masked.
Position ids are host tensors (they are built from sizes, never from data); the RoPE table made from them
is built once per layout and kept on the compute device, since a sampler asks for the same layout at
every step — and its float64 angles then never run on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import rope_angles, rope_freqs

SEQ_MULTIPLE = 32


def pad_to_multiple(n: int, m: int = SEQ_MULTIPLE) -> int:
    return n + (-n) % m


def grid_ids(h: int, w: int, first) -> torch.Tensor:
    """Position ids (first, y, x) of an h×w token grid, row-major (h·w × 3, long, on the host)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(yy, first), yy, xx], -1).reshape(h * w, 3)


@dataclass
class Tokens:
    """Per sample: one token run (Lᵢ×D), its position ids (Lᵢ×3) and, for Omni, noise flags (Lᵢ bool;
    True = noisy target, False = clean reference)."""

    x: list[torch.Tensor]
    ids: list[torch.Tensor]
    noisy: list[torch.Tensor] | None = None

    def lengths(self) -> list[int]:
        return [len(s) for s in self.x]


@dataclass
class Packed:
    """Runs of different lengths stacked into one B×S×D batch, with their rope, key mask and noise flags."""

    x: torch.Tensor
    rope: torch.Tensor
    mask: torch.Tensor | None
    noisy: torch.Tensor | None
    lengths: list[int]

    def unpack(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[i, :n] for i, n in enumerate(self.lengths)]


def _stack(seqs: list[torch.Tensor], n: int) -> torch.Tensor:
    if all(len(s) == n for s in seqs):
        return torch.stack(seqs)
    out = seqs[0].new_zeros(len(seqs), n, *seqs[0].shape[1:])
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def pack(tok: Tokens, axes_dims, theta: float) -> Packed:
    """Stack per-sample runs; mask only between-sample padding; RoPE in fp32 (fp64 for fp64 tokens)."""
    lengths = tok.lengths()
    n = max(lengths)
    x, pid = _stack(tok.x, n), _stack(tok.ids, n)
    mask = None
    if any(length != n for length in lengths):
        mask = _cached(("mask", tuple(lengths), str(x.device)), lambda: (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).to(x.device))
    noisy = None if tok.noisy is None else _stack(tok.noisy, n)
    return Packed(x, rope_table(pid, tuple(axes_dims), theta, x.dtype == torch.float64, x.device), mask, noisy, lengths)


_TABLES: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, build) -> torch.Tensor:
    """Device tensors that depend only on the token layout, built once: after the first step a forward copies nothing
    from the host (a host-to-device copy would make the host wait for the GPU)."""
    if torch.compiler.is_compiling():
        return build()
    if key not in _TABLES:
        if len(_TABLES) >= 32:  # a few layouts are live at a time (CFG pairs, refiner and unified runs)
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = build()
    return _TABLES[key]


def rope_table(pid: torch.Tensor, axes_dims: tuple, theta: float, fp64: bool, device) -> torch.Tensor:
    """B×S×1×D/2 unit complex RoPE factors (complex64, or complex128 for fp64) for host ids B×S×3, on ``device``."""
    def build():
        return rope_freqs(rope_angles(pid, axes_dims, theta, torch.float64 if fp64 else torch.float32)).to(device)[:, :, None]

    if torch.compiler.is_compiling():
        return build()
    return _cached((tuple(pid.shape), pid.numpy().tobytes(), axes_dims, theta, fp64, str(device)), build)


def join(parts: list[Tokens]) -> Tokens:
    """Per sample, the runs of ``parts`` one after another (the unified sequence)."""
    b = len(parts[0].x)
    cat = lambda get: [torch.cat([get(p)[i] for p in parts]) for i in range(b)]  # noqa: E731
    noisy = None if parts[0].noisy is None else cat(lambda p: p.noisy)
    return Tokens(cat(lambda p: p.x), cat(lambda p: p.ids), noisy)
