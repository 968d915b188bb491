"""The pack's own socket types; everything else uses ComfyUI's standard types."""

from comfy_api.latest import io

ZImageTextEncoder = io.Custom("ZIMAGE_TEXT_ENCODER")
