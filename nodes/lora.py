"""The LoRA node: our dialect reader, handing ComfyUI weight patches to a clone of the MODEL.

Every dialect ``zimage_core.lora`` reads becomes ComfyUI's own patch records (a LoRA adapter, or a dense diff,
on exact rows of the fused qkv), so the model's patcher merges them as it merges the core LoRA loaders'.
"""

from __future__ import annotations

import logging
import os
import weakref

import folder_paths
from comfy.weight_adapter import LoRAAdapter
from comfy_api.latest import io

import zimage_core as zc
from zimage_core.lora import LoraFile, read_lora

log = logging.getLogger("zimage")
# module → {file identity: parsed file}; an entry dies with its module (and frees the file's memory maps)
_PARSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def parsed(path: str, module) -> LoraFile:
    st = os.stat(path)
    per = _PARSED.setdefault(module, {})
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in per:
        per[key] = read_lora(path, module)
    return per[key]


class ZImageLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageLoraLoader",
            display_name="Z-Image LoRA",
            category="Z-Image",
            description="Applies a LoRA/LyCORIS (diffusers, PEFT, ai-toolkit, kohya/musubi, LyCORIS, LoKr, DiffSynth or "
                        "ComfyUI names). Chain several to stack them. Other graphs keep using the plain model.",
            inputs=[
                io.Model.Input("model", tooltip="A Z-Image model (from the loader, UNETLoader or another LoRA node)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file from models/loras made for Z-Image / Z-Image-Turbo."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="How strongly to apply it: 1 as trained, 0 off, negative reverses it."),
            ],
            outputs=[io.Model.Output(tooltip="A copy of the model with this LoRA added; the input model stays plain.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        path = folder_paths.get_full_path(folder_name="loras", filename=lora_name)
        if path is None:
            raise zc.ZImageError(f"{lora_name} is not in models/loras.")
        lf = parsed(path, model.model.diffusion_model)
        log.info("Z-Image LoRA %s ×%g: %s", lora_name, strength, lf.summary())
        out = model.clone()
        out.add_patches(comfy_patches(lf), strength)
        return io.NodeOutput(out)


def comfy_patches(lf: LoraFile) -> dict:
    """Our parsed deltas as ComfyUI weight patches: {key or (key, (dim, start, rows)): adapter}."""
    patches = {}
    for d in lf.deltas:
        key = f"diffusion_model.{d.target}.weight"
        if d.rows:
            key = (key, (0, d.rows[0], d.rows[1] - d.rows[0]))
        if d.kind == "lora":  # ComfyUI scales by alpha / rank
            patches[key] = LoRAAdapter(set(), (d.up, d.down, d.scale * d.down.shape[0], None, None, None))
        else:
            patches[key] = ("diff", (d.matrix(),))
    return patches
