"""Prompt → standard CONDITIONING with our Qwen3 encoder; seed variety on any CONDITIONING."""

from __future__ import annotations

from comfy_api.latest import io

from .graph import conditioning_from_embeds, vary_conditioning
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


VARIETY_TOOLTIP = ("How far the prompt is pushed for the first steps: noise of this size relative to each token of the "
                   "prompt (0 = off, unchanged output). 0.3–0.6 gives Turbo new compositions per seed; above 1 the prompt "
                   "starts to lose its hold.")
FRACTION_TOOLTIP = ("Part of the schedule that sees the varied prompt (ComfyUI's timestep percent): 0.3 is the first 3 of 8 "
                    "Turbo steps. The rest uses the clean prompt, so text and details still follow it.")


class ZImageSeedVariety(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageSeedVariety",
            display_name="Z-Image Seed Variety",
            category="Z-Image",
            description="Z-Image-Turbo draws nearly the same picture for every seed. This adds seeded noise to the prompt "
                        "for the first steps only, so each seed finds another composition while the last steps follow the "
                        "clean prompt. Works with KSampler and the Z-Image Sampler (a standard timestep range).",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The positive conditioning (Z-Image Text Encode or CLIP Text Encode)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The variation's seed: link it to the sampler's seed so each image gets its own."),
                io.Float.Input("variety", default=0.4, min=0.0, max=4.0, step=0.05, tooltip=VARIETY_TOOLTIP),
                io.Float.Input("fraction", default=0.3, min=0.0, max=1.0, step=0.05, tooltip=FRACTION_TOOLTIP),
            ],
            outputs=[io.Conditioning.Output(tooltip="The conditioning with the varied prompt in its first timestep range.")],
        )

    @classmethod
    def execute(cls, conditioning, seed, variety, fraction) -> io.NodeOutput:
        return io.NodeOutput(vary_conditioning(conditioning, seed, variety, fraction))
