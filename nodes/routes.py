"""Server routes for the frontend extension: presets and resolutions, and the offload plan of a model file
computed from its header (no weights loaded).

Reading a header is file I/O and JSON parsing: it runs in a worker thread with a time limit, so a slow disk, a
crafted file or a pipe in the models folder never stalls ComfyUI's event loop; a header larger than any real
transformer's is not parsed for a preview at all (the C JSON parser would hold the GIL while it works)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor

import comfy.model_management as mm
from aiohttp import web
from server import PromptServer

import zimage_core as zc
from zimage_core.offload import GB, activation_bytes, module_bytes
from zimage_core.transformer_files import meta_transformer

from .graph import MAX_SIDE, MIN_SIDE, RESOLUTIONS
from .loaders import _split_dtype, resolve
from .memory import ZImagePatcher, plan_for_settings

log = logging.getLogger("zimage")
routes = PromptServer.instance.routes


@routes.get("/zimage/info")
async def info(_request):
    return web.json_response({
        "presets": {k: {"steps": p.steps, "cfg": p.cfg, "shift": p.shift} for k, p in zc.PRESETS.items()},
        "resolutions": {k: list(v) for k, v in RESOLUTIONS.items()},
        "min_side": MIN_SIDE, "max_side": MAX_SIDE,
    })


def to_client(send) -> None:
    """``send(PromptServer.instance)``: progress messages are a nicety, a node never fails for them."""
    try:
        send(PromptServer.instance)
    except Exception:
        pass


def size(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 0.995 else f"{gb * 1024:.1f} MB"


def plan_text(s: dict) -> str:
    return (f"{size(s['resident_gb'])} resident ({s['resident_blocks']} blocks) · {size(s['streamed_gb_per_step'])} "
            f"streamed per step ({s['streamed_blocks']} blocks) · peak ≈ {size(s['peak_gb'])}")


PREVIEW_SECONDS = 10.0
PREVIEW_HEADER_BYTES, PREVIEW_VALUES = 4 << 20, 200_000  # a Z-Image transformer's header: ~60 KB, ~4,000 values
_inspector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-plan")


def _check_preview_size(path: str) -> None:
    """Refuse, before any JSON parsing, headers far beyond a Z-Image transformer's (the loader checks them fully)."""
    for f in [os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else [path]:
        st = os.stat(f)
        if not f.endswith(".safetensors") or not stat.S_ISREG(st.st_mode):
            continue  # read_header names other files without parsing them
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if n > st.st_size - 8:
                continue  # not a safetensors header at all: read_header says what it is
            raw = fh.read(n) if n <= PREVIEW_HEADER_BYTES else b""
        if n > PREVIEW_HEADER_BYTES or raw.count(b",") > PREVIEW_VALUES:
            raise zc.ZImageError(f"{f} has a header far larger than a Z-Image transformer's ({n:,} bytes); no plan "
                                 "preview for it (the loader checks the file fully).")


def _plan(body: dict) -> dict:
    path = resolve("diffusion_models", str(body["model_name"]))
    _check_preview_size(path)
    dev = mm.get_torch_device()
    dtype, storage = _split_dtype(body.get("weight_dtype", "auto"), dev)
    model = meta_transformer(path, dtype, storage)
    acts = activation_bytes(model, int(body.get("width", 1024)), int(body.get("height", 1024)))
    mode = body.get("offload", "auto")
    # before loading, ComfyUI could free all of the card but its reserve; on a CPU there is no limit
    offered = None if mm.is_device_cpu(dev) else mm.get_total_memory(dev) - mm.extra_reserved_memory()
    p = plan_for_settings(model, mode, float(body.get("vram_budget_gb") or 0), offered, acts, 2, "cpu")[0]
    if offered is None and not p.streamed and mode == "auto":
        p.notes.append("CPU: weights stay in system memory")
    s = p.summary()
    return {"ok": True, "plan": s, "text": plan_text(s), "notes": p.notes, "model_size": size(module_bytes(model) / GB)}


@routes.post("/zimage/plan")
async def plan(request):
    """{model_name, weight_dtype, offload, vram_budget_gb, width, height} → the plan the loader would make."""
    try:
        body = await request.json()
        if not isinstance(body, dict) or "model_name" not in body:
            raise zc.ZImageError("the request names no model_name")
        loop = asyncio.get_running_loop()
        result = await asyncio.wait_for(loop.run_in_executor(_inspector, _plan, body), PREVIEW_SECONDS)
        return web.json_response(result)
    except zc.ZImageError as e:
        return web.json_response({"ok": False, "error": str(e)})
    except asyncio.TimeoutError:
        return web.json_response({"ok": False, "error": f"reading the header of {body.get('model_name')} took more "
                                                        f"than {PREVIEW_SECONDS:g} s; no plan preview for it."})
    except Exception as e:  # the extension shows the reason instead of failing
        log.warning("Z-Image plan route: %s", e)
        return web.json_response({"ok": False, "error": f"{type(e).__name__}: {e}"})


def confirmed_plan(patcher: ZImagePatcher) -> dict | None:
    if patcher.last_plan is None:
        return None
    s = patcher.last_plan.summary()
    return {**s, "text": plan_text(s), "notes": list(patcher.last_plan.notes)}
