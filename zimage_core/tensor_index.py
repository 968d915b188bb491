"""What every weight file answers from its header alone (safetensors and GGUF alike), how its tensor table is
checked (``check_layout``), and how it reads a tensor.

Tensors are read into memory of their own, never views of a file mapping: a file replaced or truncated on disk
while a model loaded from it is in use can neither change it nor crash the process (SIGBUS), and a change
before a read is detected from the file's identity (device, inode, size, mtime) and named.
"""

from __future__ import annotations

import os

import torch

from .errors import ZImageError

MAX_NDIM, MAX_DIM = 16, 2**48


def _int(v) -> bool:
    return type(v) is int  # not bool, not float


def check_layout(path: str, entries: dict[str, tuple[int | tuple[int, int], list, list]], data_size: int, *,
                 contiguous: bool = True) -> None:
    """Validate a tensor table: name → (bits per element, or (elements, bytes) per block for block-quantised types
    such as GGUF's; shape; [begin, end]) within a data area of ``data_size`` bytes. Shapes are bounded integers,
    each byte range matches its type × shape, ranges never overlap and, with ``contiguous`` (safetensors), tile
    the data area exactly."""

    def bad(name, why):
        return ZImageError(f"{path}: tensor {name!r} {why}; the file is corrupt or was edited. Download it again.")

    spans = []
    for name, (bits, shape, offsets) in entries.items():
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_int(s) and 0 <= s <= MAX_DIM for s in shape):
            raise bad(name, f"has an invalid shape {str(shape)[:80]}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(o) for o in offsets):
            raise bad(name, f"has invalid data offsets {str(offsets)[:80]}")
        begin, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        if isinstance(bits, tuple):  # (elements, bytes) per block: a partial block is as wrong as a wrong size
            per, block_bytes = bits
            nbits = numel // per * block_bytes * 8 if numel % per == 0 else -8
        else:
            nbits = numel * bits
        if nbits % 8 or not 0 <= begin <= end or end - begin != nbits // 8:
            need = f"needs {nbits / 8:g}" if nbits >= 0 else f"is not a whole number of {bits[0]}-element blocks"
            raise bad(name, f"claims bytes {begin}..{end} but shape {shape} {need}")
        spans.append((begin, end, name))
    spans.sort()
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise bad(name, f"overlaps {prev!r} (bytes {begin}..{end})")
        if contiguous and begin > pos:
            raise bad(name, f"starts at byte {begin}, leaving a gap of {begin - pos} bytes after {prev!r}")
        pos, prev = max(pos, end), name
    if pos > data_size:
        raise ZImageError(
            f"{path} is truncated: {pos - data_size:,} bytes are missing at the end ({data_size:,} of {pos:,} data bytes "
            "present). The download was probably interrupted; download the file again."
        )
    if contiguous and pos < data_size:
        raise ZImageError(f"{path} has {data_size - pos:,} bytes after its last tensor that the header does not "
                          "describe; the file is corrupt or was edited. Download it again.")


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class TensorIndex:
    """Header queries of one weight file from ``_entries``: key → (dtype, shape, begin, end, …), byte offsets counted
    from ``_data_start``; ``_identity`` is the file's identity when its header was read."""

    path: str
    _entries: dict
    _data_start: int
    _identity: tuple

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def nbytes(self, key: str) -> int:
        begin, end = self._entries[key][2:4]
        return end - begin

    def wrap(self, key: str, raw: torch.Tensor):
        """A tensor's bytes (uint8) as the tensor ``get`` gives."""
        return raw.view(self.dtype(key)).reshape(self.shape(key))

    def get(self, key: str):
        """The tensor, read into memory of its own (never a view of the file)."""
        return self.wrap(key, self.read(key))

    def meta(self, key: str):
        """What ``get`` would give, on the meta device: no data read (plans from headers alone)."""
        return self.wrap(key, torch.empty(self.nbytes(key), dtype=torch.uint8, device="meta"))

    def read(self, key: str) -> torch.Tensor:
        """The tensor's bytes (uint8), read into memory of their own."""
        begin, end = self._entries[key][2:4]
        out = torch.empty(end - begin, dtype=torch.uint8)
        if end == begin:
            return out
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            fd = -1
        try:
            if fd < 0 or identity(os.fstat(fd)) != self._identity:
                raise ZImageError(f"{self.path} was replaced, changed or removed on disk after it was opened; load it again.")
            view, pos = memoryview(out.numpy()), 0
            while pos < len(view):
                got = os.preadv(fd, [view[pos:]], self._data_start + begin + pos)
                if got <= 0:
                    raise ZImageError(f"{self.path} became shorter while it was read (truncated on disk); download it again.")
                pos += got
        finally:
            if fd >= 0:
                os.close(fd)
        return out

    def release(self, key: str) -> None:
        """Drop the page-cache pages of a tensor that was read and converted."""
        if not hasattr(os, "posix_fadvise"):
            return
        begin, end = self._entries[key][2:4]
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, self._data_start + begin, end - begin, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
