"""Registers the pack's nodes with ComfyUI (V3 node API)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import routes  # noqa: F401  (registers the frontend's server routes)
from .conditioning import ZImageSeedVariety, ZImageTextEncode
from .controlnet import ZImageApplyControlNet, ZImageControlNetLoader
from .edit import ZImageEditEncode
from .enhancer import ZImagePromptEnhancer
from .latents import ZImageEmptyLatent, ZImageImageToLatent
from .loaders import ZImageModelLoader, ZImageTextEncoderLoader
from .lora import ZImageLoraLoader
from .sampling import ZImageSampler

NODES: list[type[io.ComfyNode]] = [
    ZImageModelLoader, ZImageTextEncoderLoader, ZImageTextEncode, ZImageSampler, ZImageEmptyLatent, ZImageImageToLatent,
    ZImageLoraLoader, ZImageEditEncode, ZImageControlNetLoader, ZImageApplyControlNet, ZImagePromptEnhancer,
    ZImageSeedVariety,
]


class ZImageExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
