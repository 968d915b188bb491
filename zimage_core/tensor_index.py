"""What every weight file answers from its header alone (safetensors and GGUF alike), and how it reads a tensor.

Tensors are read into memory of their own, never views of a file mapping: a file replaced or truncated on disk
while a model loaded from it is in use can neither change it nor crash the process (SIGBUS), and a change
before a read is detected from the file's identity (device, inode, size, mtime) and named.
"""

from __future__ import annotations

import os

import torch

from .errors import ZImageError


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
