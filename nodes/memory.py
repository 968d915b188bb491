"""Our models inside ComfyUI's memory manager.

``ZImagePatcher`` is a ModelPatcher whose load/unload calls drive our block streamer: when ComfyUI loads
it (``load_models_gpu``) it offers a VRAM budget, which becomes an offload plan; when another model needs
room ComfyUI calls ``partially_unload`` / ``detach`` and we demote blocks to pinned host memory. So
``--lowvram``, ``--novram``, ``--highvram`` and ``--reserve-vram`` reach our planner through ComfyUI's
own arithmetic. Loaded modules are cached weakly by file and load options: ComfyUI's node cache owns
them, and freeing it frees them.
"""

from __future__ import annotations

import collections
import logging
import os
import weakref
from dataclasses import dataclass, field

import comfy.lora
import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher
from comfy.weight_adapter import LoRAAdapter

from zimage_core.controlnet import control_models
from zimage_core.layers import FP8_DTYPES, Linear
from zimage_core.loader import COMPUTE_DTYPES, STORAGE_DTYPES
from zimage_core.offload import GB, BlockStreamer, OffloadPlan, module_bytes, plan_with_sides
from zimage_core.packed import Packed
from zimage_core.quant import quantize_fp8

from .model import CONTROL

log = logging.getLogger("zimage")


def plan_for_settings(model, mode: str, budget_gb: float, offered: float | None, activations: int, prefetch: int, device,
                      sides=()) -> list[OffloadPlan]:
    """The plans for a loader's offload settings when ComfyUI offers ``offered`` bytes (None: no limit): the model's,
    then its control models' (``sides``), all under that one budget."""
    kw = dict(activations=activations, prefetch=prefetch, device=device)
    if mode == "budget" and budget_gb > 0:
        cap = budget_gb * GB if offered is None else min(budget_gb * GB, offered)
        return plan_with_sides(model, sides, mode="budget", budget=int(cap), **kw)
    if mode in ("resident", "min_vram"):
        return plan_with_sides(model, sides, mode=mode, **kw)
    return plan_with_sides(model, sides, mode="auto", free_bytes=None if offered is None else int(offered), **kw)


@dataclass
class OffloadState:
    """Offload settings and the streamer of one set of weights, shared by every clone of its patcher."""

    mode: str = "auto"
    budget_gb: float = 0.0
    prefetch: int = 2
    activations: int = 0
    streamer: BlockStreamer | None = None
    last_plan: OffloadPlan | None = None
    scale_backup: dict = field(default_factory=dict)  # fp8 weight scales replaced by merged weight patches
    runtime: set = field(default_factory=set)  # Linear modules carrying LoRA factors as run-time patches


def _shared(name: str):
    return property(lambda self: getattr(self.state, name), lambda self, v: setattr(self.state, name, v))


class ZImagePatcher(ModelPatcher):
    """A ModelPatcher over our ``ZImageBase`` (or the text encoder module) whose loading streams blocks.

    ComfyUI weight patches (core LoRA loaders, our LoRA node) are merged into the host weights before the
    streamer places them, so resident and streamed blocks alike compute with them. fp8 and packed weights (GGUF,
    ComfyUI quant formats) are never re-quantised for a plain LoRA: its factors ride along as run-time patches of
    our Linear; other adapters become a dense run-time delta on packed weights, and on fp8 are merged in fp32 and
    re-quantised with a fresh scale. Clones share the weights, so they share the state.
    """

    # On a CPU device the weights already live where compute runs, so loading streams nothing. Tests set this
    # to drive the same bookkeeping (plans, partial loads and unloads) on a CPU-only machine.
    stream_on_cpu = False
    mode, budget_gb, prefetch, activations = _shared("mode"), _shared("budget_gb"), _shared("prefetch"), _shared("activations")
    streamer, last_plan = _shared("streamer"), _shared("last_plan")

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        # the module whose blocks stream: the transformer inside its BaseModel, the encoder inside its CLIP model
        # (its ``streamed``), else the model itself (the prompt enhancer's chat model)
        self.net = getattr(model, "diffusion_model", None) or getattr(model, "streamed", model)
        super().__init__(model, load_device, offload_device, size=size or module_bytes(self.net),
                         weight_inplace_update=weight_inplace_update)
        if "zimage_offload" not in model.__dict__:
            model.__dict__["zimage_offload"] = OffloadState()
        self.state: OffloadState = model.__dict__["zimage_offload"]

    def set_offload(self, mode: str, budget_gb: float, prefetch: int) -> bool:
        """Take a loader's offload settings; whether they changed (the next load then plans with them)."""
        changed = (self.mode, self.budget_gb, self.prefetch) != (mode, budget_gb, prefetch)
        self.mode, self.budget_gb, self.prefetch = mode, budget_gb, prefetch
        return changed

    def sides(self) -> list:
        """The Fun ControlNets this clone carries (nodes/controlnet.py): planned under its budget, streamed with it."""
        return control_models(self.model_options.get("transformer_options", {}).get(CONTROL, ()))

    # -- what ComfyUI asks ------------------------------------------------------------------------
    def model_size(self) -> int:  # stored bytes (fp8, packed) plus run-time LoRA patches, as they stand now
        return module_bytes(self.net) + sum(module_bytes(m) for m in self.sides())

    def model_dtype(self):
        return self.net.compute_dtype

    def loaded_size(self):
        return self.streamer.placed_bytes if self.streamer is not None and self.streamer.attached else 0

    def current_loaded_device(self):
        return self.load_device if self.loaded_size() > 0 else self.offload_device

    def plan_for(self, weight_budget: float) -> list[OffloadPlan]:
        offered = None if weight_budget >= 1e30 else weight_budget + self.activations
        return plan_for_settings(self.net, self.mode, self.budget_gb, offered, self.activations, self.prefetch,
                                 self.load_device, self.sides())

    def use_plans(self, plans: list[OffloadPlan]) -> None:
        """Attach or replan the streamers of the transformer and of each control model; control models this clone
        does not carry leave the device."""
        plan, *side = plans
        if self.streamer is None or not self.streamer.attached:
            self.streamer = BlockStreamer(self.net, plan).attach()
        else:
            self.streamer.replan(plan)
        old = {id(st.model): st for st in self.streamer.sides}
        new = []
        for m, p in zip(self.sides(), side):
            st = old.pop(id(m), None)
            if st is None:
                if isinstance(m.executor, BlockStreamer):  # streamed for another model until now
                    m.executor.detach()
                st = BlockStreamer(m, p).attach()
            else:
                st.replan(p)
            new.append(st)
        for st in old.values():
            st.detach()
        self.streamer.sides = new
        self.last_plan = plan
        self.model.model_loaded_weight_memory = self.loaded_size()
        for m, p in zip((self.net, *self.sides()), plans):
            (log.warning if p.shortfall else log.info)("Z-Image %s: %s", type(m).__name__, p.describe())

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):  # noqa: ARG002 (ComfyUI's signature)
        with self.use_ejected(skip_and_inject_on_exit_only=True):
            self.patch_weights()
            self.patch_model(load_weights=False)
            if mm.is_device_cpu(self.load_device) and not self.stream_on_cpu:
                return 0  # weights already live in host memory; nothing to stream
            before = self.loaded_size()
            self.use_plans(self.plan_for(before + extra_memory if extra_memory < 1e30 else 1e32))
            return self.loaded_size() - before

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):  # noqa: ARG002 (ComfyUI's signature)
        graphs = self.drop_graphs()
        if self.streamer is None or not self.streamer.attached:
            return graphs
        before = self.loaded_size()
        self.use_plans(plan_with_sides(self.net, self.sides(), mode="budget", activations=self.activations,
                                       budget=max(0, int(before - max(0, memory_to_free - graphs))) + self.activations,
                                       prefetch=self.prefetch, device=self.load_device))
        return graphs + before - self.loaded_size()

    def detach(self, unpatch_all=True):
        self.detach_streamer()
        return super().detach(unpatch_all)

    def drop_graphs(self) -> int:
        """ComfyUI wants memory back: CUDA graphs (cuda_graphs.py) hold their layouts' activations outside its count.
        Returns the bytes they gave back."""
        graphs = getattr(self.net, "cuda_graphs", None)
        return graphs.drop() if graphs is not None else 0

    def detach_streamer(self) -> None:
        self.drop_graphs()
        if self.streamer is not None:
            self.streamer.detach()
        self.model.model_loaded_weight_memory = 0

    # -- weight patches ---------------------------------------------------------------------------
    def patch_weights(self) -> None:
        """Make the shared host weights carry exactly this clone's patches (undoing another clone's first)."""
        if self.model.current_weight_patches_uuid == self.patches_uuid:
            return
        self.unpatch_model(unpatch_weights=True)
        with torch.no_grad():
            for key in self.patches:
                self.merge(key)
        self.model.current_weight_patches_uuid = self.patches_uuid

    def merge(self, key: str) -> None:
        owner_name, _, leaf = key.rpartition(".")
        owner = self.model.get_submodule(owner_name)
        w = getattr(owner, leaf)
        if isinstance(owner, Linear) and leaf == "weight" and owner.patch_only:
            factors = lora_factors(self.patches[key], owner.out_features)
            if factors is None and isinstance(w, Packed):  # any other adapter: its exact delta on the expanded weight
                base = w.dequantize(torch.float32).to(self.load_device)
                delta = comfy.lora.calculate_weight(self.patches[key], base.clone(), key, intermediate_dtype=torch.float32) - base
                factors = [(None, delta.to(w.device, self.net.compute_dtype), 1.0)]
            if factors is not None:
                owner.patches = factors
                self.state.runtime.add(owner_name)
                return
        self.backup[key] = _Backup(w, False)
        scale = getattr(owner, "weight_scale", None) if leaf == "weight" else None
        dev = self.load_device
        base = w.to(dev, torch.float32, copy=True)
        if scale is not None:
            self.state.scale_backup[owner_name] = scale
            base = base * scale.to(dev, torch.float32)
        out = comfy.lora.calculate_weight(self.patches[key], base, key, intermediate_dtype=torch.float32)
        if w.dtype in FP8_DTYPES:
            out, scale = quantize_fp8(out, w.dtype)
            owner.weight_scale = scale.to(w.device)
        elif scale is not None:
            owner.weight_scale = None
        # a weight stored narrower than compute (a bf16 file run in fp32) keeps the merge at compute precision
        wide = self.net.compute_dtype if w.dtype not in FP8_DTYPES and w.dtype.itemsize < self.net.compute_dtype.itemsize else w.dtype
        setattr(owner, leaf, torch.nn.Parameter(out.to(w.device, wide), requires_grad=False))

    def unpatch_model(self, device_to=None, unpatch_weights=True):  # noqa: ARG002 (ComfyUI's signature)
        if unpatch_weights:
            self.detach_streamer()
            for name, scale in self.state.scale_backup.items():
                self.model.get_submodule(name).weight_scale = scale
            for name in self.state.runtime:
                self.model.get_submodule(name).patches = []
            self.state.scale_backup.clear()
            self.state.runtime.clear()
        super().unpatch_model(None, unpatch_weights)  # placement is the streamer's: ComfyUI never moves our modules

    # -- what our nodes ask -----------------------------------------------------------------------
    def load_for(self, activations: int, extra=()) -> None:
        """Ask ComfyUI for room and load (or stream) the model and its control models under one plan, with ``extra``
        models (loaded whole), for a run needing ``activations`` bytes."""
        self.activations = activations
        mm.load_models_gpu([self, *extra], memory_required=activations)

    def unload(self) -> None:
        """Leave the GPU now (the text encoder does this after encoding)."""
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            if mm.current_loaded_models[i].model is self:
                mm.current_loaded_models.pop(i).model_unload()
        self.detach()
        mm.soft_empty_cache()


def lora_factors(patches: list, out_features: int) -> list | None:
    """ComfyUI patch records of plain LoRAs as our Linear's run-time patches [(down, up, factor)]; None if any
    record is something else (DoRA, LoCon mid, LoKr, a diff, a model strength or a function)."""
    out = []
    for strength, v, strength_model, offset, function in patches:
        if not isinstance(v, LoRAAdapter) or strength_model != 1.0 or function is not None or any(x is not None for x in v.weights[3:]):
            return None
        up, down, alpha = v.weights[0].float().flatten(1), v.weights[1].float().flatten(1), v.weights[2]
        if offset is not None:
            if offset[0] != 0:
                return None
            up = torch.zeros(out_features, up.shape[1]).index_copy_(0, torch.arange(offset[1], offset[1] + offset[2]), up)
        out.append((down, up, strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0)))
    return out


_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # ModelPatcher's own backup record


class Handle:
    """What a ZIMAGE_TEXT_ENCODER socket carries: the module, its patcher, where it came from."""

    def __init__(self, module, patcher: ZImagePatcher, path: str, options: dict):
        self.module, self.patcher, self.path, self.options = module, patcher, path, options

    def __repr__(self):
        return f"<Z-Image {type(self.module).__name__} from {os.path.basename(self.path)}>"


_CACHE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _key(path: str, *options) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size, *options)


def cached_load(kind: str, path: str, loader, options: dict, offload: dict) -> ZImagePatcher:
    """Load once per (file, weight options) into a patcher over ``loader()``; offload settings update it in place."""
    key = _key(path, kind, tuple(sorted((k, str(v)) for k, v in options.items())))
    patcher = _CACHE.get(key)
    if patcher is None:
        mm.cleanup_models_gc()  # weights load lazily into host memory; VRAM is requested when ComfyUI loads the model
        patcher = ZImagePatcher(loader(), mm.get_torch_device(), mm.unet_offload_device())
        patcher.set_offload(**offload)
        _CACHE[key] = patcher
    elif patcher.set_offload(**offload):
        patcher.unload()  # the next load plans with the new settings
    return patcher


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

