"""Weights kept in a storage form torch cannot multiply directly (GGUF blocks; ComfyUI's nvfp4, mxfp8, int8 …).

A ``Packed`` holds the stored tensors of one weight and the ``Format`` that expands them to a dense tensor.
``Linear`` and ``Embedding`` keep it in place of their ``weight`` parameter and expand it on each call,
on the device the tensors are on (the compute device), so memory holds only the packed bytes. The offload
executor moves a ``Packed`` as its tensors: a streamed block travels packed and the planner counts packed
bytes. LoRA on a packed weight always runs as run-time patches (nothing is re-quantised).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


class Format(Protocol):
    """One storage format. ``rowwise``: every non-scalar tensor's dim 0 indexes the weight's rows, so rows can
    be gathered (embedding lookup) and parts stacked (fused q/k/v) without expanding anything."""

    name: str
    rowwise: bool

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...


@dataclass(eq=False)
class Packed:
    fmt: Format
    shape: tuple[int, ...]  # the dense weight's shape
    tensors: dict[str, torch.Tensor]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.fmt.dequantize(self.tensors, self.shape, dtype)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Packed:
        """The same weight with ``fn`` applied to every stored tensor (device moves, pinning, copies)."""
        return Packed(self.fmt, self.shape, {k: fn(t) for k, t in self.tensors.items()})

    def rows(self, index: torch.Tensor) -> Packed:
        """Rows ``index`` (1-D) of a row-wise format, still packed."""
        index = index.to(self.device)
        return Packed(self.fmt, (index.numel(), *self.shape[1:]),
                      {k: t if t.dim() == 0 else t.index_select(0, index) for k, t in self.tensors.items()})

    def __repr__(self) -> str:
        return f"Packed({self.fmt.name}, {list(self.shape)}, {self.nbytes:,} bytes)"


@dataclass(frozen=True)
class Stacked:
    """Rows of several packed parts of different formats (e.g. q, k, v quantised to different GGUF types)."""

    parts: tuple[tuple[Format, tuple[int, ...]], ...]
    name: str = "stacked"
    rowwise: bool = False

    def dequantize(self, tensors, shape, dtype):
        return torch.cat([fmt.dequantize({k.split(".", 1)[1]: t for k, t in tensors.items() if k.startswith(f"{i}.")}, s, dtype)
                          for i, (fmt, s) in enumerate(self.parts)]).reshape(shape)


def stack_rows(parts: list[Packed | torch.Tensor]) -> Packed | torch.Tensor:
    """Concatenate weights along dim 0 keeping them packed: one format stacks its tensors, mixed ones a ``Stacked``."""
    if not any(isinstance(p, Packed) for p in parts):
        return torch.cat(parts)
    parts = [p if isinstance(p, Packed) else Packed(Dense(), tuple(p.shape), {"w": p}) for p in parts]
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    fmt = parts[0].fmt
    if fmt.rowwise and all(p.fmt == fmt and all(t.dim() for t in p.tensors.values()) for p in parts):
        return Packed(fmt, shape, {k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})
    return Packed(Stacked(tuple((p.fmt, p.shape) for p in parts)), shape,
                  {f"{i}.{k}": t for i, p in enumerate(parts) for k, t in p.tensors.items()})


@dataclass(frozen=True)
class Dense:
    """A plain tensor as a part of a ``Stacked`` weight."""

    name: str = "dense"
    rowwise: bool = True

    def dequantize(self, tensors, shape, dtype):
        return tensors["w"].to(dtype).reshape(shape)
