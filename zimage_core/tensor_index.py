"""What every weight file answers from its header alone (safetensors and GGUF alike), before any data is read."""

from __future__ import annotations

import torch


class TensorIndex:
    """Header queries of one weight file (no data read), from ``_entries``: key → (dtype, shape, …)."""

    _entries: dict

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]
