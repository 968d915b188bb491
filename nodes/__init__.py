"""ComfyUI adapters. ``graph`` holds what the nodes do as plain functions (importable without ComfyUI);
the node classes import ComfyUI and are loaded only by ``comfy_entrypoint``."""


async def comfy_entrypoint():
    from .extension import ZImageExtension

    return ZImageExtension()
