"""Checked reading of safetensors files.

We parse and validate the whole header ourselves before any data is touched (as the official parser does,
and more: every entry's types, shape bounds, offsets that overlap, repeat or leave gaps, duplicate names,
metadata types, a bound on the parse work), so a truncated, corrupt or crafted file gets a message naming
the file instead of a Rust panic, a hang or a silent misread. A pickle file in disguise is named, never
unpickled. Tensors are read into memory the model owns (tensor by tensor, so loading peaks near the
weights' own size): a file replaced or truncated on disk later cannot change or crash (SIGBUS) a loaded
model, and a change during loading is detected from the file's identity (device, inode, size, mtime).
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import struct
from collections.abc import Iterable

import torch

from .errors import ZImageError
from .tensor_index import TensorIndex, check_layout, identity

# safetensors dtype name → (bits per element, torch dtype or None when torch cannot hold it); the list of
# huggingface/safetensors safetensors/src/tensor.rs `Dtype`
_FORMAT = {
    "BOOL": (8, torch.bool), "U8": (8, torch.uint8), "I8": (8, torch.int8), "F8_E5M2": (8, torch.float8_e5m2),
    "F8_E4M3": (8, torch.float8_e4m3fn), "F8_E8M0": (8, getattr(torch, "float8_e8m0fnu", None)),
    "I16": (16, torch.int16), "U16": (16, getattr(torch, "uint16", None)), "F16": (16, torch.float16),
    "BF16": (16, torch.bfloat16), "I32": (32, torch.int32), "U32": (32, getattr(torch, "uint32", None)),
    "F32": (32, torch.float32), "F64": (64, torch.float64), "I64": (64, torch.int64),
    "U64": (64, getattr(torch, "uint64", None)), "C64": (64, torch.complex64),
    "F4": (4, None), "F6_E2M3": (6, None), "F6_E3M2": (6, None),
}
DTYPES = {k: t for k, (_, t) in _FORMAT.items() if t is not None and k in (  # F8_E8M0: mxfp8 block scales (comfy-kitchen)
    "F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "I64", "I32", "I16", "I8", "U8", "BOOL")}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER = 100_000_000  # the official parser's limit (safetensors/src/tensor.rs MAX_HEADER_SIZE)
MAX_VALUES = 1_000_000  # JSON separators in a header (~8 a tensor): bounds the parse time of a crafted header


def _sniff_foreign(path: str, head: bytes) -> str | None:
    """Name the format of a file that is not safetensors, if we recognise it (only asked once the bytes
    cannot be a safetensors header: a valid header length may begin with a pickle's opcode bytes)."""
    if head[:4] == b"GGUF":
        return "a GGUF file (quantised weights), not a safetensors file"
    if head[:4] == b"PK\x03\x04":
        return "a PyTorch zip/pickle checkpoint (torch.save); it is never unpickled here for safety"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle file; it is never unpickled here for safety"
    if path.lower().endswith(PICKLE_SUFFIXES):
        return "a pickle-format checkpoint (by its extension); it is never unpickled here for safety"
    return None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the name {dup!r} appears twice")
    return d


def read_header(path: str) -> tuple[dict, dict[str, tuple[str, tuple[int, ...], int, int]], int, tuple]:
    """(metadata, name → (dtype name, shape, begin, end), data start, file identity), all checked."""
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            raise ZImageError(f"{path} is a folder, not a .safetensors file.")
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise ZImageError(f"{path} is not a regular file (a pipe, socket or device); point to the weights file itself.")
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ZImageError(f"{path}: file not found.") from None
    except OSError as e:
        raise ZImageError(f"{path}: cannot be read ({e.strerror}).") from None
    try:
        st = os.fstat(fd)
        size = st.st_size
        head = os.pread(fd, 9, 0)
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        if not (len(head) == 9 and 2 <= n <= min(MAX_HEADER, size - 8) and head[8:9] == b"{"):
            foreign = _sniff_foreign(path, head)
            if foreign:
                raise ZImageError(f"{path} is {foreign}. Convert it to .safetensors (or download the .safetensors "
                                  "release) and load that instead.")
            if len(head) < 8:
                raise ZImageError(f"{path} is empty or truncated ({size} bytes): download it again.")
            raise ZImageError(
                f"{path} is not a valid safetensors file (header length {n} for a file of {size} bytes); "
                "it is corrupt, truncated or another format. Download it again."
            )
        raw = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    if len(raw) != n:
        raise ZImageError(f"{path} changed while it was read; try again.")
    values = raw.count(b",") + raw.count(b":")
    if values > MAX_VALUES:
        raise ZImageError(f"{path}: the safetensors header holds {values:,} values, far more than any model file "
                          "(about 8 a tensor); the file is corrupt or crafted. Download it again.")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise ZImageError(f"{path} has a corrupt safetensors header ({why}). Download it again.") from None
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ZImageError(f"{path}: the safetensors metadata must map names to text; this file's does not "
                          "(corrupt or hand-edited). Download it again.")
    table, entries = {}, {}
    for name, e in header.items():
        if not isinstance(e, dict) or not isinstance(e.get("dtype"), str):
            raise ZImageError(f"{path}: corrupt header entry for {name!r} (not a dtype/shape/data_offsets record).")
        if e["dtype"] not in _FORMAT:
            raise ZImageError(f"{path}: tensor {name!r} has storage type {e['dtype'][:20]!r}, which is not a "
                              f"safetensors type (supported: {', '.join(DTYPES)}).")
        table[name] = (_FORMAT[e["dtype"]][0], e.get("shape"), e.get("data_offsets"))
    check_layout(path, table, size - 8 - n)
    for name, e in header.items():
        entries[name] = (e["dtype"], tuple(e["shape"]), *e["data_offsets"])
    return meta, entries, 8 + n, identity(st)


class SafetensorsFile(TensorIndex):
    """One safetensors file: header checked on open; each ``get`` reads one tensor into its own memory."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.metadata, self._entries, self._data_start, self._identity = read_header(self.path)

    def dtype(self, key: str) -> torch.dtype:
        name = self._entries[key][0]
        if name not in DTYPES:
            raise ZImageError(f"{self.path}: tensor {key!r} has storage type {name!r}, which this loader does not read "
                              f"(supported: {', '.join(DTYPES)}).")
        return DTYPES[name]


def open_file(path: str):
    """A safetensors file, or a GGUF file (recognised by its magic) read through gguf_files."""
    try:
        with open(path, "rb") if stat.S_ISREG(os.stat(path).st_mode) else io.BytesIO() as f:  # never open a FIFO
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
                if k in self._where:
                    raise ZImageError(f"{self._where[k].path} and {f.path} both hold tensor {k!r}; the folder mixes "
                                      "two downloads or versions. Keep one complete set of shards.")
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
        except (OSError, ValueError, RecursionError):
            return {}
        return conf if isinstance(conf, dict) else {}

    def config_number(self, conf: dict, key: str, default: float) -> float:
        """A positive finite number from ``config()``, or ``default`` when absent; a wrong type is named."""
        v = conf.get(key)
        if v is None:
            return default
        if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
            if hasattr(self.files[0], "config"):  # a GGUF header field
                raise ZImageError(f"{self.path}: its header gives {key} = {str(v)[:40]!r}, expected a positive number; "
                                  "the file is damaged. Download it again.")
            folder = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
            raise ZImageError(f"{os.path.join(folder, 'config.json')}: {key} is {str(v)[:40]!r}, expected a positive "
                              "number. Fix the value or remove config.json.")
        return v

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

    def meta(self, key: str):
        return self._where[key].meta(key)

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
                if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) and v and os.path.basename(v) == v for v in weight_map.values()
                ):
                    raise ValueError("weight_map must map tensor names to shard file names in this folder")
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise ZImageError(f"{ipath}: unreadable shard index ({str(e)[:200]}). Download it again.") from None
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
