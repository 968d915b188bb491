"""Our models inside ComfyUI's memory manager.

``ZImagePatcher`` is a ModelPatcher whose load/unload calls drive our block streamer: when ComfyUI loads
it (``load_models_gpu``) it offers a VRAM budget, which becomes an offload plan; when another model needs
room ComfyUI calls ``partially_unload`` / ``detach`` and we demote blocks to pinned host memory. So
``--lowvram``, ``--novram``, ``--highvram`` and ``--reserve-vram`` reach our planner through ComfyUI's
own arithmetic. Loaded modules are cached weakly by file and load options: ComfyUI's node cache owns
them, and freeing it frees them.
"""

from __future__ import annotations

import logging
import os
import weakref

import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher

from zimage_core.loader import COMPUTE_DTYPES, STORAGE_DTYPES
from zimage_core.offload import GB, BlockStreamer, module_bytes, plan_offload

log = logging.getLogger("zimage")


def plan_for_settings(model, mode: str, budget_gb: float, offered: float | None, activations: int, prefetch: int, device):
    """The plan for a loader's offload settings when ComfyUI offers ``offered`` bytes (None: no limit)."""
    if mode == "budget" and budget_gb > 0:
        cap = budget_gb * GB if offered is None else min(budget_gb * GB, offered)
        return plan_offload(model, mode="budget", budget=int(cap), activations=activations, prefetch=prefetch, device=device)
    if mode in ("resident", "min_vram"):
        return plan_offload(model, mode=mode, activations=activations, prefetch=prefetch, device=device)
    free = None if offered is None else int(offered)
    return plan_offload(model, mode="auto", free_bytes=free, activations=activations, prefetch=prefetch, device=device)


class ZImagePatcher(ModelPatcher):
    # On a CPU device the weights already live where compute runs, so loading streams nothing. Tests set this
    # to drive the same bookkeeping (plans, partial loads and unloads) on a CPU-only machine.
    stream_on_cpu = False

    def __init__(self, model, load_device, offload_device, mode: str = "auto", budget_gb: float = 0.0, prefetch: int = 2):
        super().__init__(model, load_device, offload_device, size=module_bytes(model))
        self.mode, self.budget_gb, self.prefetch = mode, budget_gb, prefetch
        self.activations = 0
        self.streamer: BlockStreamer | None = None
        self.last_plan = None

    # -- what ComfyUI asks ------------------------------------------------------------------------
    def model_dtype(self):
        return self.model.compute_dtype

    def loaded_size(self):
        return self.streamer.placed_bytes if self.streamer is not None and self.streamer.attached else 0

    def current_loaded_device(self):
        return self.load_device if self.loaded_size() > 0 else self.offload_device

    def plan_for(self, weight_budget: float):
        offered = None if weight_budget >= 1e30 else weight_budget + self.activations
        return plan_for_settings(self.model, self.mode, self.budget_gb, offered, self.activations, self.prefetch,
                                 self.load_device)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):  # noqa: ARG002 (ComfyUI's signature)
        if mm.is_device_cpu(self.load_device) and not self.stream_on_cpu:
            return 0  # weights already live in host memory; nothing to stream
        before = self.loaded_size()
        plan = self.plan_for(before + extra_memory if extra_memory < 1e30 else 1e32)
        if self.streamer is None or not self.streamer.attached:
            self.streamer = BlockStreamer(self.model, plan).attach()
        else:
            self.streamer.replan(plan)
        self.last_plan = plan
        (log.warning if plan.shortfall else log.info)("Z-Image %s: %s", type(self.model).__name__, plan.describe())
        return self.loaded_size() - before

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):  # noqa: ARG002 (ComfyUI's signature)
        if self.streamer is None or not self.streamer.attached:
            return 0
        before = self.loaded_size()
        plan = plan_offload(self.model, mode="budget", budget=max(0, int(before - memory_to_free)) + self.activations,
                            activations=self.activations, prefetch=self.prefetch, device=self.load_device)
        self.streamer.replan(plan)
        self.last_plan = plan
        return before - self.loaded_size()

    def detach(self, unpatch_all=True):  # noqa: ARG002 (ComfyUI's signature; we always detach all)
        if self.streamer is not None:
            self.streamer.detach()
        return self.model

    def load_for(self, activations: int) -> None:
        """Ask ComfyUI for room and load (or stream) the model for a run needing ``activations`` bytes."""
        self.activations = activations
        mm.load_models_gpu([self], memory_required=activations)

    def unload(self) -> None:
        """Leave the GPU now (the text encoder does this after encoding)."""
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            if mm.current_loaded_models[i].model is self:
                mm.current_loaded_models.pop(i).model_unload()
        self.detach()
        mm.soft_empty_cache()


class Handle:
    """What a ZIMAGE_MODEL / ZIMAGE_TEXT_ENCODER socket carries: the module, its patcher, where it came from."""

    def __init__(self, module, patcher: ZImagePatcher, path: str, options: dict):
        self.module, self.patcher, self.path, self.options = module, patcher, path, options
        self.loras: list[tuple[str, float]] = []
        self.controls: list = []  # zimage_core.controlnet.Control, from Z-Image Apply ControlNet
        self.control_patchers: list[ModelPatcher] = []  # their control models, loaded with this model

    def __repr__(self):
        return f"<Z-Image {type(self.module).__name__} from {os.path.basename(self.path)}>"

    def with_lora(self, lora, strength: float) -> Handle:
        """A new handle on the same module and patcher, with one more LoRA in its stack."""
        h = Handle(self.module, self.patcher, self.path, self.options)
        h.loras = [*self.loras, (lora, strength)]
        h.controls, h.control_patchers = self.controls, self.control_patchers
        return h

    def activate(self) -> None:
        """Make the shared module carry exactly this handle's LoRA stack (re-patching on the host if it differs)."""
        from zimage_core.lora import LoraPatcher

        lp = LoraPatcher.of(self.module)
        wanted = tuple((id(f), float(s)) for f, s in self.loras) + (None,)
        if lp.active != wanted and (lp.active or self.loras):
            self.patcher.detach()  # weights back on the host before they change
            lp.apply(self.loras)


_CACHE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _key(path: str, *options) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size, *options)


def cached_load(kind: str, path: str, loader, options: dict, offload: dict) -> Handle:
    """Load once per (file, weight options); offload settings update the shared patcher in place."""
    key = _key(path, kind, tuple(sorted((k, str(v)) for k, v in options.items())))
    handle = _CACHE.get(key)
    if handle is None:
        mm.cleanup_models_gc()  # weights load lazily into host memory; VRAM is requested by load_for() before use
        module = loader()
        patcher = ZImagePatcher(module, mm.get_torch_device(), mm.unet_offload_device(), **offload)
        handle = Handle(module, patcher, path, options)
        _CACHE[key] = handle
    else:
        p = handle.patcher
        if (p.mode, p.budget_gb, p.prefetch) != (offload["mode"], offload["budget_gb"], offload["prefetch"]):
            p.mode, p.budget_gb, p.prefetch = offload["mode"], offload["budget_gb"], offload["prefetch"]
            p.unload()  # the next load plans with the new settings
    return handle


def compute_dtype(choice: str, device: torch.device, fp16: bool = True) -> torch.dtype | None:
    """The compute dtype for a loader's dtype choice: bf16 where supported, else fp16 where ComfyUI would use it
    (GTX 10xx/16xx, RTX 20xx; the transformer's blocks keep fp16 finite, see zimage_core/precision.py), else fp32.
    ``fp16=False`` (the text encoder, whose fp16 range is not guarded) picks fp32 there instead."""
    if choice in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[choice]
    if mm.is_device_cpu(device):
        return torch.float32 if choice == "auto" else torch.bfloat16
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if fp16 and mm.should_use_fp16(device) else torch.float32


def storage_dtype(choice: str) -> torch.dtype | None:
    return STORAGE_DTYPES.get(choice)

