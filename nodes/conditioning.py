"""Prompt → standard CONDITIONING with our Qwen3 encoder."""

from __future__ import annotations

from comfy_api.latest import io

from .graph import conditioning_from_embeds
from .types import ZImageTextEncoder

ENCODE_ACTIVATIONS = 768 * 1024**2


class ZImageTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageTextEncode",
            display_name="Z-Image Text Encode",
            category="Z-Image",
            description="Encodes a prompt exactly as Z-Image's reference pipeline does (chat template, up to 512 tokens). "
                        "The output is standard CONDITIONING: store, combine, concat or zero it with core nodes.",
            inputs=[
                ZImageTextEncoder.Input("text_encoder", tooltip="From Load Z-Image Text Encoder."),
                io.String.Input("prompt", multiline=True, dynamic_prompts=True,
                                tooltip="What to draw. Z-Image follows long, detailed prompts (Chinese and English); "
                                        "prompts over 512 tokens are cut (a warning says how much)."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Text features for the Z-Image Sampler (positive or negative).")],
        )

    @classmethod
    def execute(cls, text_encoder, prompt) -> io.NodeOutput:
        patcher = text_encoder.patcher
        patcher.load_for(ENCODE_ACTIVATIONS)
        try:
            embeds = text_encoder.module.encode([prompt])
        finally:
            patcher.unload()  # the encoder leaves the GPU right away: the transformer needs the room
        return io.NodeOutput(conditioning_from_embeds(embeds))
