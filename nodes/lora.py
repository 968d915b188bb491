"""The LoRA node: stacks adapters onto a ZIMAGE_MODEL without touching the cached base model."""

from __future__ import annotations

import logging
import os
import weakref

import folder_paths
from comfy_api.latest import io

import zimage_core as zc
from zimage_core.lora import LoraFile, read_lora

from .types import ZImageModel

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
                ZImageModel.Input("model", tooltip="A Z-Image model (from the loader or another LoRA node)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file from models/loras made for Z-Image / Z-Image-Turbo."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="How strongly to apply it: 1 as trained, 0 off, negative reverses it."),
            ],
            outputs=[ZImageModel.Output(tooltip="The model with this LoRA added to its stack.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        path = folder_paths.get_full_path(folder_name="loras", filename=lora_name)
        if path is None:
            raise zc.ZImageError(f"{lora_name} is not in models/loras.")
        lf = parsed(path, model.module)
        log.info("Z-Image LoRA %s ×%g: %s", lora_name, strength, lf.summary())
        return io.NodeOutput(model.with_lora(lf, strength))
