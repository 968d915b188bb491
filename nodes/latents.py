"""Latent preparation: empty latents at Z-Image's sizes, and image → latent for image-to-image / inpainting."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from .graph import RESOLUTIONS, edit_latent, empty_latent, resolution_warning

log = logging.getLogger("zimage")


class ZImageEmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageEmptyLatent",
            display_name="Z-Image Empty Latent",
            category="Z-Image",
            description="An empty 16-channel latent for text-to-image. Pick an aspect preset (about 1 or 2 megapixels, "
                        "sides multiples of 16) or 'custom' for the width and height below.",
            inputs=[
                io.Combo.Input("resolution", options=["custom", *RESOLUTIONS], default="1:1 (1024×1024)",
                               tooltip="Aspect presets Z-Image handles well; 'custom' uses width and height."),
                io.Int.Input("width", default=1024, min=16, max=4096, step=16,
                             tooltip="Pixels, multiple of 16 (used with resolution=custom). Z-Image is trained for 512–2048."),
                io.Int.Input("height", default=1024, min=16, max=4096, step=16,
                             tooltip="Pixels, multiple of 16 (used with resolution=custom)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images generated at once."),
            ],
            outputs=[io.Latent.Output(tooltip="Zeros, B×16×H/8×W/8: the sampler starts from pure noise.")],
        )

    @classmethod
    def execute(cls, resolution, width, height, batch_size) -> io.NodeOutput:
        if resolution in RESOLUTIONS:
            width, height = RESOLUTIONS[resolution]
        warning = resolution_warning(width, height)
        if warning:
            log.warning("Z-Image Empty Latent: %s", warning)
        return io.NodeOutput(empty_latent(width, height, batch_size))


class ZImageImageToLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageImageToLatent",
            display_name="Z-Image Image to Latent (img2img / inpaint)",
            category="Z-Image",
            description="Encodes an image with the VAE for image-to-image (set the sampler's denoise below 1) or, with a "
                        "mask, inpainting (white = repaint). Sides are fitted to multiples of 16.",
            inputs=[
                io.Image.Input("image", tooltip="The picture to start from."),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors)."),
                io.Mask.Input("mask", optional=True, tooltip="Optional: where to repaint (1/white). Without it: image-to-image."),
                io.Int.Input("grow_mask_by", default=6, min=-64, max=64,
                             tooltip="Pixels to grow (or, negative, shrink) the mask so repainted edges blend."),
                io.Int.Input("feather", default=8, min=0, max=128,
                             tooltip="Pixels over which the mask edge fades, for seamless inpainting."),
                io.Combo.Input("fit", options=["crop", "resize", "resize to 1MP"], default="crop",
                               tooltip="How to reach multiples of 16: crop the border, resize slightly, or resize to ~1 megapixel."),
            ],
            outputs=[io.Latent.Output(tooltip="Encoded latent (with noise_mask when a mask is given) for the Z-Image Sampler.")],
        )

    @classmethod
    def execute(cls, image, vae, grow_mask_by, feather, fit, mask=None) -> io.NodeOutput:
        return io.NodeOutput(edit_latent(vae.encode, image, mask, grow_mask_by, feather, fit))
