"""Fetch the published Z-Image weights from the Hugging Face hub into a ComfyUI ``models/`` folder.

Files land where ComfyUI's loaders and :func:`zimage_core.pipeline.find_weights` look (``diffusion_models/``,
``text_encoders/``, ``vae/``). ``huggingface_hub`` does the HTTP, so ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``
and ``HF_HUB_OFFLINE`` apply as everywhere else. We keep the transfer ourselves because the layout differs from the
repositories' (``split_files/vae/ae.safetensors`` → ``vae/ae.safetensors``) and because a 12 GB file must survive
Ctrl-C: a partial file stays next to its target and the next run continues it with a Range request. Every file is
checked against the hub's metadata: its size, and its sha256 (the hub's ETag of an LFS file) or git blob id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from urllib.parse import quote

from .errors import ZImageError

log = logging.getLogger("zimage")

HUB = "https://huggingface.co"
TURBO_REPO, BASE_REPO = "Comfy-Org/z_image_turbo", "Comfy-Org/z_image"
HF_REPOS = {"turbo": "Tongyi-MAI/Z-Image-Turbo", "base": "Tongyi-MAI/Z-Image"}
HF_PARTS = ("transformer/", "text_encoder/", "tokenizer/", "vae/", "scheduler/", "model_index.json")
# Community GGUF conversions (ComfyUI key names for the DiT, llama.cpp names for Qwen3-4B); the quant is in the name.
GGUF_REPOS = {"turbo": ("jayn7/Z-Image-Turbo-GGUF", "z_image_turbo-{}.gguf"), "base": ("jayn7/Z-Image-GGUF", "z_image-{}.gguf"),
              "text_encoder": ("unsloth/Qwen3-4B-GGUF", "Qwen3-4B-{}.gguf")}
VERIFIED = ".zimage-verified.json"  # in the models folder: files already hashed (size, mtime, sha), so reruns skip hashing
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository and the ComfyUI models sub-folder it belongs in."""

    repo: str
    path: str
    folder: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def url(self, endpoint: str = HUB) -> str:
        return f"{endpoint}/{self.repo}/resolve/main/{quote(self.path)}"


def _split(repo: str, folder: str, name: str) -> HubFile:
    """Comfy-Org's repackaged repositories keep each file under ``split_files/<models folder>/``."""
    return HubFile(repo, f"split_files/{folder}/{name}", folder)


# What ComfyUI's official Z-Image templates link (Comfy-Org/workflow_templates templates/image_z_image_turbo.json,
# image_z_image.json; ComfyUI blueprints/Text to Image (Z-Image-Turbo).json): base shares Turbo's encoder and VAE.
VAE = _split(TURBO_REPO, "vae", "ae.safetensors")
FORMATS = {  # format → (DiT file per variant, text encoder); int8 after templates/image_z_image_turbo_int8.json
    "bf16": ({"turbo": _split(TURBO_REPO, "diffusion_models", "z_image_turbo_bf16.safetensors"),
              "base": _split(BASE_REPO, "diffusion_models", "z_image_bf16.safetensors")},
             _split(TURBO_REPO, "text_encoders", "qwen_3_4b.safetensors")),
    "int8": ({"turbo": _split(TURBO_REPO, "diffusion_models", "z_image_turbo_int8_convrot.safetensors")},
             _split(TURBO_REPO, "text_encoders", "qwen_3_4b_fp8_mixed.safetensors")),
}


def files_for(variant: str = "turbo", fmt: str = "bf16") -> list[HubFile]:
    """The transformer, text encoder and VAE of ``variant`` (turbo/base) in ``fmt`` (bf16, int8, gguf-<quant>)."""
    if variant not in HF_REPOS:
        raise ZImageError(f"unknown model {variant!r}; choose turbo or base.")
    if fmt.lower().startswith("gguf-"):
        quant = fmt[5:].upper()
        (repo, pattern), (te_repo, te_pattern) = GGUF_REPOS[variant], GGUF_REPOS["text_encoder"]
        return [HubFile(repo, pattern.format(quant), "diffusion_models"),
                HubFile(te_repo, te_pattern.format(quant), "text_encoders"), VAE]
    if fmt not in FORMATS:
        raise ZImageError(f"unknown format {fmt!r}; choose {', '.join(FORMATS)} or gguf-<quant> (e.g. gguf-q8_0, gguf-q4_k_m).")
    dits, te = FORMATS[fmt]
    if variant not in dits:
        raise ZImageError(f"{fmt} is published for {' and '.join(dits)} only; use --format bf16 for {variant}.")
    return [dits[variant], te, VAE]


def catalog() -> list[HubFile]:
    """Every file ``files_for`` can name (except GGUF, whose quant is chosen at download time)."""
    out = [VAE]
    for dits, te in FORMATS.values():
        out += [*dits.values(), te]
    return out


def default_models_dir() -> str:
    """A ComfyUI ``models/`` folder: $COMFYUI_PATH/models, the ComfyUI this pack is installed in (custom_nodes/<pack>),
    ~/ComfyUI/models, else ~/.cache/zimage/models."""
    if os.environ.get("COMFYUI_PATH"):
        return os.path.join(os.environ["COMFYUI_PATH"], "models")
    pack = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in ([os.path.join(pack, "..", "..", "models")] if os.path.basename(os.path.dirname(pack)) == "custom_nodes" else []) \
            + [os.path.expanduser("~/ComfyUI/models")]:
        if os.path.isdir(cand):
            return os.path.normpath(cand)
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zimage", "models")


def command(variant: str, models: str, fmt: str = "bf16") -> str:
    """The exact command that fetches what ``files_for(variant, fmt)`` names into ``models``."""
    return f"python -m zimage_core download {variant}" + (f" --format {fmt}" if fmt != "bf16" else "") + f" --to {models}"


# ---- verification -------------------------------------------------------------------------------------


def _digest(path: str, algo: str, prefix: bytes = b"") -> str:
    from tqdm import tqdm

    h = hashlib.new(algo, prefix)
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"verifying {os.path.basename(path)}",
                                     disable=True if size < 1 << 28 else None, leave=False) as bar:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def matches(path: str, size: int, etag: str) -> bool:
    """``path`` has the hub's size and content: sha256 for LFS files (their ETag), git's blob sha1 for small ones."""
    if os.path.getsize(path) != size:
        return False
    if _SHA256.match(etag):
        return _digest(path, "sha256") == etag
    return _digest(path, "sha1", b"blob %d\0" % size) == etag


class _Record:
    """Remembers files already hashed (by size and mtime), so a second run neither downloads nor re-reads 20 GB."""

    def __init__(self, models: str):
        self.path = os.path.join(models, VERIFIED)
        try:
            with open(self.path, encoding="utf-8") as f:
                self.data = json.load(f)
        except (OSError, ValueError):
            self.data = {}

    @staticmethod
    def _stamp(path: str) -> list[int]:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]

    def known(self, rel: str, path: str, etag: str | None) -> bool:
        e = self.data.get(rel)
        return bool(e) and e["stamp"] == self._stamp(path) and (etag is None or e["etag"] == etag)

    def add(self, rel: str, path: str, etag: str, f: HubFile) -> None:
        self.data[rel] = {"stamp": self._stamp(path), "etag": etag, "repo": f.repo, "path": f.path}
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.data, fh, indent=1)
        os.replace(tmp, self.path)


# ---- transfer -----------------------------------------------------------------------------------------


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed request raises: OSError (requests, hub HTTP errors) and the HTTP client's own errors (huggingface_hub
    1.x speaks httpx, 2.x httpx2)."""
    import importlib

    errs: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errs.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def _explain(e: BaseException, f: HubFile, endpoint: str) -> str:
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    if isinstance(e, OSError) and e.errno and not isinstance(e, ConnectionError):  # the local disk, not the network
        return f"{e.strerror} ({e.filename or 'writing the file'})"
    if isinstance(e, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE): unset it to download"
    if isinstance(e, GatedRepoError) or getattr(getattr(e, "response", None), "status_code", 0) in (401, 403):
        return f"{f.repo} needs a Hugging Face login: set HF_TOKEN (or run `hf auth login`)"
    if isinstance(e, RepositoryNotFoundError) or getattr(getattr(e, "response", None), "status_code", 0) == 404:
        return f"{f.path} is not published in {f.repo} (see {endpoint}/{f.repo}/tree/main)"
    return f"could not reach {endpoint} ({type(e).__name__}: {e}); check the connection, or set HF_ENDPOINT to a mirror"


def _metadata(f: HubFile, endpoint: str):
    from huggingface_hub import get_hf_file_metadata

    m = get_hf_file_metadata(f.url(endpoint))
    if m.size is None or not m.etag:
        raise ZImageError(f"{endpoint} gave no size/ETag for {f.repo}/{f.path}; cannot verify the download.")
    return m


def _fetch(f: HubFile, meta, target: str) -> None:
    """Download into ``<target>.<etag>.incomplete`` (continuing what an interrupted run left), verify, move in place."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    partial = f"{target}.{meta.etag[:16]}.incomplete"
    for stale in os.listdir(folder):  # partial files of an older revision of the same file
        if stale.startswith(os.path.basename(target) + ".") and stale.endswith(".incomplete") and os.path.join(folder, stale) != partial:
            os.remove(os.path.join(folder, stale))
    cached = try_to_load_from_cache(f.repo, f.path, revision=meta.commit_hash) if meta.commit_hash else None
    if isinstance(cached, str) and not os.path.exists(partial):  # already in the HF cache (HF_HOME): link or copy it
        log.info("%s: taking it from the Hugging Face cache %s", f.name, cached)
        try:
            os.link(os.path.realpath(cached), partial)
        except OSError:
            shutil.copyfile(cached, partial)
    done = os.path.getsize(partial) if os.path.exists(partial) else 0
    if done > meta.size:
        os.remove(partial)
        done = 0
    if done < meta.size:
        if done:
            log.info("%s: continuing an interrupted download at %.1f of %.1f MB", f.name, done / 1e6, meta.size / 1e6)
        with open(partial, "ab") as out:
            http_get(meta.location, out, resume_size=done, headers=build_hf_headers(), expected_size=meta.size,
                     displayed_filename=f.name)
    if not matches(partial, meta.size, meta.etag):
        os.remove(partial)
        raise ZImageError(f"{f.name}: the downloaded bytes do not match the hub's checksum ({meta.etag}); the partial "
                          f"file was removed, run the command again.")
    os.replace(partial, target)


def ensure(files: list[HubFile], models: str, endpoint: str | None = None) -> list[str]:
    """Make each file present and verified at ``models/<folder>/<name>``; return the paths.

    A present file that matches the hub is kept (no transfer); one that does not is fetched again. Offline
    (HF_HUB_OFFLINE) or with the hub unreachable, present files are used as they are and missing ones are an error."""
    from huggingface_hub import constants

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    os.makedirs(models, exist_ok=True)
    record, metas = _Record(models), {}
    targets = {f: os.path.join(models, f.folder, f.name) for f in files}
    for f, target in targets.items():
        try:
            metas[f] = _metadata(f, endpoint)
        except _network_errors() as e:
            if not os.path.isfile(target):
                raise ZImageError(f"cannot download {f.name}: {_explain(e, f, endpoint)}.\nOr fetch it by hand from "
                                  f"{f.url()} into {os.path.dirname(target)}/") from None
            log.warning("%s: %s; using the file already at %s unchecked", f.name, _explain(e, f, endpoint), target)
    todo = sum(m.size for f, m in metas.items() if not os.path.isfile(targets[f]))
    if todo:
        free = shutil.disk_usage(models).free
        if free < todo:
            raise ZImageError(f"{models} has {free / 1e9:.1f} GB free; the download needs {todo / 1e9:.1f} GB.")
        log.info("downloading %.2f GB into %s", todo / 1e9, models)
    for f, meta in metas.items():
        target = targets[f]
        rel = os.path.relpath(target, models)
        if os.path.isfile(target):
            if record.known(rel, target, meta.etag) or matches(target, meta.size, meta.etag):
                log.info("%s: present and verified", rel)
                record.add(rel, target, meta.etag, f)
                continue
            log.warning("%s does not match %s/%s (size or checksum differs): fetching it again", rel, f.repo, f.path)
        try:
            _fetch(f, meta, target)
        except _network_errors() as e:
            raise ZImageError(f"download of {f.name} stopped: {_explain(e, f, endpoint)}. Run the command again "
                              "to continue where it stopped.") from None
        record.add(rel, target, meta.etag, f)
        log.info("%s: downloaded and verified", rel)
    return list(targets.values())


def hf_files(variant: str, endpoint: str | None = None) -> list[HubFile]:
    """The diffusers folder of Tongyi-MAI/Z-Image(-Turbo): transformer, text encoder, tokenizer, VAE, scheduler."""
    from huggingface_hub import HfApi

    repo = HF_REPOS[variant]
    try:
        names = [s.rfilename for s in HfApi(endpoint=endpoint).model_info(repo, revision="main").siblings or []]
    except _network_errors() as e:
        raise ZImageError(f"cannot list {repo}: {_explain(e, HubFile(repo, '', ''), endpoint or HUB)}.") from None
    root = f"diffusion_models/{repo.split('/')[1]}"
    return [HubFile(repo, n, os.path.dirname(f"{root}/{n}")) for n in names if n.startswith(HF_PARTS)]


def download(variant: str = "turbo", fmt: str = "bf16", models: str | None = None, hf: bool = False,
             endpoint: str | None = None) -> list[str]:
    """``python -m zimage_core download``: the split files (or with ``hf`` the diffusers folder) into ``models``."""
    models = models or default_models_dir()
    files = hf_files(variant, endpoint) if hf else files_for(variant, fmt)
    if not files:
        raise ZImageError(f"{HF_REPOS[variant]} lists none of {', '.join(HF_PARTS)}.")
    return ensure(files, models, endpoint)
