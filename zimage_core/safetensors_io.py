"""Lazy, checked reading of safetensors files.

We parse the header ourselves so that a truncated or corrupt file, or a pickle file in disguise, gets a
message naming the file instead of a Rust panic, and we map the data copy-on-write so tensors are
views of the page cache until something converts or modifies them (loading stays near the weights'
own size). Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterable

import torch

from .errors import ZImageError
from .tensor_index import TensorIndex

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # mxfp8 block scales (comfy-kitchen)
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024


def _sniff_foreign(path: str, head: bytes) -> str | None:
    """Name the format of a file that is not safetensors, if we recognise it."""
    if head[:4] == b"PK\x03\x04":
        return "a PyTorch zip/pickle checkpoint (torch.save); it is never unpickled here for safety"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle file; it is never unpickled here for safety"
    if path.lower().endswith(PICKLE_SUFFIXES):
        return "a pickle-format checkpoint (by its extension); it is never unpickled here for safety"
    return None


class SafetensorsFile(TensorIndex):
    """One safetensors file: header checked on open, tensors handed out as lazy views of a private mapping."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ZImageError(f"{self.path}: file not found.")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            foreign = _sniff_foreign(self.path, head)
            if foreign:
                raise ZImageError(
                    f"{self.path} is {foreign}. Convert it to .safetensors (or download the .safetensors release) "
                    "and load that instead."
                )
            if len(head) < 8:
                raise ZImageError(f"{self.path} is empty or truncated ({size} bytes): download it again.")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or n > size - 8:
                raise ZImageError(
                    f"{self.path} is not a valid safetensors file (header length {n} for a file of {size} bytes); "
                    "it is corrupt, truncated or another format. Download it again."
                )
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise ZImageError(f"{self.path} has a corrupt safetensors header ({e}). Download it again.") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        end_max = 0
        for key, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except KeyError as err:
                if isinstance(e, dict) and e.get("dtype") not in DTYPES:
                    raise ZImageError(
                        f"{self.path}: tensor {key!r} has storage type {e.get('dtype')!r}, which this loader does not "
                        f"read (supported: {', '.join(DTYPES)})."
                    ) from None
                raise ZImageError(f"{self.path}: corrupt header entry for {key!r} ({err}).") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize or begin < 0:
                raise ZImageError(
                    f"{self.path}: tensor {key!r} claims {end - begin} bytes but shape {list(shape)} of {e['dtype']} "
                    f"needs {numel * dtype.itemsize}; the file is corrupt. Download it again."
                )
            end_max = max(end_max, end)
            self._entries[key] = (dtype, shape, begin, end)
        if self._data_start + end_max > size:
            missing = self._data_start + end_max - size
            raise ZImageError(
                f"{self.path} is truncated: {missing:,} bytes are missing at the end "
                f"({size:,} of {self._data_start + end_max:,} bytes present). The download was probably interrupted; "
                "download the file again."
            )
        self._mm: mmap.mmap | None = None

    def nbytes(self, key: str) -> int:
        _, _, b, e = self._entries[key]
        return e - b

    # -- data -------------------------------------------------------------------------------------
    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def get(self, key: str) -> torch.Tensor:
        """The tensor as a copy-on-write view of the file: no bytes are read until it is used."""
        dtype, shape, begin, end = self._entries[key]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch.frombuffer(self._map(), dtype=torch.uint8, count=end - begin, offset=self._data_start + begin)
        return t.view(dtype).reshape(shape)

    def release(self, key: str) -> None:
        """Drop the page-cache pages that only this tensor used, after it was converted into a copy."""
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        _, _, begin, end = self._entries[key]
        page = mmap.PAGESIZE
        lo = -(-(self._data_start + begin) // page) * page
        hi = (self._data_start + end) // page * page
        if hi > lo:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError, AttributeError):
                pass


def open_file(path: str):
    """A safetensors file, or a GGUF file (recognised by its magic) read through gguf_files."""
    try:
        with open(path, "rb") as f:
            gguf = f.read(4) == b"GGUF"
    except OSError:
        gguf = False
    if gguf:
        from .gguf_files import GGUFFile

        return GGUFFile(path)
    return SafetensorsFile(path)


class WeightFiles:
    """Several weight files (a sharded folder) seen as one key → tensor mapping."""

    def __init__(self, paths: Iterable[str], index: dict[str, str] | None = None):
        self.files = [open_file(p) for p in paths]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                self._where[k] = f
        if index:
            missing = sorted({os.path.basename(v) for k, v in index.items() if k not in self._where})
            if missing:
                raise ZImageError(
                    f"{os.path.dirname(self.files[0].path)}: the shard index lists tensors in {', '.join(missing[:3])} "
                    "that are not in the shards present; a shard is missing or incomplete. Download it again."
                )
        self.metadata: dict[str, str] = {}
        for f in self.files:
            self.metadata.update(f.metadata)

    @property
    def path(self) -> str:
        return self.files[0].path if len(self.files) == 1 else os.path.dirname(self.files[0].path)

    def config(self) -> dict:
        """The ``config.json`` beside the weights (an HF folder's), or {} when there is none or it is unreadable;
        a GGUF file's header instead."""
        if hasattr(self.files[0], "config"):
            return self.files[0].config()
        folder = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        try:
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                conf = json.load(f)
        except (OSError, ValueError):
            return {}
        return conf if isinstance(conf, dict) else {}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def nbytes(self, key: str) -> int:
        return self._where[key].nbytes(key)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get(key)

    def release(self, key: str) -> None:
        self._where[key].release(key)


def open_weights(path: str, subfolder: str | None = None) -> WeightFiles:
    """Open a single .safetensors or .gguf file, or a (diffusers) folder of shards with or without an index json.

    ``subfolder`` is tried inside ``path`` first (e.g. ``transformer`` in an HF model folder).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = path
        if subfolder and os.path.isdir(os.path.join(path, subfolder)):
            folder = os.path.join(path, subfolder)
        indexes = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors.index.json"))
        if indexes:
            ipath = os.path.join(folder, indexes[0])
            try:
                with open(ipath, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise ZImageError(f"{ipath}: unreadable shard index ({e}). Download it again.") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise ZImageError(
                    f"{folder}: shard(s) {', '.join(missing)} listed in {indexes[0]} are missing. "
                    "Download the complete folder."
                )
            return WeightFiles([os.path.join(folder, s) for s in shards], weight_map)
        files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        if not files:
            pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES))
            hint = (
                f" It has pickle-format weights ({', '.join(pickles[:3])}), which are never unpickled here; "
                "use the .safetensors release."
                if pickles
                else ""
            )
            raise ZImageError(f"{folder}: no .safetensors weights found.{hint}")
        return WeightFiles([os.path.join(folder, n) for n in files])
    return WeightFiles([path])
