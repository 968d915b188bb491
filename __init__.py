"""Z-Image for ComfyUI: entry point. The model code lives in zimage_core/, the nodes in nodes/."""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:  # lets the nodes import zimage_core by its own name (appended: never shadows ComfyUI's modules)
    sys.path.append(_here)

if __package__:  # ComfyUI (and pytest, from a folder named like a package) import the pack as a package
    from .nodes import comfy_entrypoint  # noqa: E402
else:  # pytest from a checkout whose folder name is no identifier (``wt-gpu``) imports this file on its own
    from nodes import comfy_entrypoint  # noqa: E402

WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
