"""Instruction editing with up to three reference images (the Z-Image Omni / Edit conditioning)."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

from zimage_core.images import crop_box, prepare_reference_image
from zimage_core.templates import TEMPLATE_PROMPT, reference_segments

from .conditioning import ENCODE_ACTIVATIONS
from .graph import omni_conditioning, siglip_from_clip_vision
from .types import ZImageTextEncoder


def _fit(image: torch.Tensor, auto_resize: bool) -> torch.Tensor:
    """IMAGE 1×H×W×3 → sides multiples of 16: shrunk to ~1 MP when larger (Lanczos, as the reference), centre-cropped."""
    img = Image.fromarray((image[0, ..., :3].clamp(0, 1).cpu().numpy() * 255).round().astype("uint8"))
    if auto_resize:
        img = prepare_reference_image(img)
    else:
        img = img.crop(crop_box(*img.size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class ZImageEditEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageEditEncode",
            display_name="Z-Image Edit Encode",
            category="Z-Image",
            description="Encodes an editing instruction with up to three reference images, as Z-Image-Edit/Omni expect: "
                        "each image becomes clean reference tokens with its own caption segment. Works with today's Turbo/Base "
                        "weights too (reference latents only); SigLIP2 features need Omni/Edit weights.",
            inputs=[
                ZImageTextEncoder.Input("text_encoder", tooltip="From Load Z-Image Text Encoder."),
                io.String.Input("prompt", multiline=True, dynamic_prompts=True,
                                tooltip="The instruction, e.g. 'make it winter' or 'put the cat from image 2 on the sofa of image 1'."),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors), to encode the reference images."),
                io.Image.Input("image1", tooltip="First reference image."),
                io.Image.Input("image2", optional=True, tooltip="Optional second reference image."),
                io.Image.Input("image3", optional=True, tooltip="Optional third reference image."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional SigLIP2 vision model for Omni/Edit weights (not for Turbo/Base)."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to avoid, encoded with the same images (used when the sampler's cfg > 1)."),
                io.Boolean.Input("auto_resize", default=True,
                                 tooltip="Shrink images above 1 megapixel as the reference does; sides are cropped to multiples of 16."),
            ],
            outputs=[
                io.Conditioning.Output("positive", tooltip="Instruction + references for the sampler's positive."),
                io.Conditioning.Output("negative", tooltip="Negative prompt with the same references, for CFG."),
                io.Latent.Output("latent", tooltip="An empty latent the size of the last reference image (the target size)."),
            ],
        )

    @classmethod
    def execute(cls, text_encoder, prompt, vae, image1, image2=None, image3=None, clip_vision=None, negative_prompt="",
                auto_resize=True) -> io.NodeOutput:
        images = [_fit(im, auto_resize) for im in (image1, image2, image3) if im is not None]
        latents = [vae.encode(im) for im in images]
        feats = [siglip_from_clip_vision(clip_vision.encode_image(im)) for im in images] if clip_vision is not None else None
        shared = reference_segments(len(images))
        patcher = text_encoder.patcher
        patcher.load_for(ENCODE_ACTIVATIONS)
        try:  # the shared segments and both prompts in one pass
            enc = [e.cpu() for e in text_encoder.module.encode(
                shared + [TEMPLATE_PROMPT.format(prompt), TEMPLATE_PROMPT.format(negative_prompt)], template="{}")]
        finally:
            patcher.unload()
        extra, (main, neg) = enc[: len(shared)], enc[len(shared):]
        h, w = images[-1].shape[1:3]
        return io.NodeOutput(omni_conditioning(main, extra, latents, feats), omni_conditioning(neg, extra, latents, feats),
                             {"samples": torch.zeros(1, 16, h // 8, w // 8)})
