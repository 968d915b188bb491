"""The Z-Image sampler node: Turbo / Base / custom presets, CFG, img2img, inpainting, previews, interrupt."""

from __future__ import annotations

import os

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import latent_preview
from comfy_api.latest import io

import zimage_core as zc
from zimage_core.offload import activation_bytes

from .conditioning import FRACTION_TOOLTIP, VARIETY_TOOLTIP
from .graph import PRESET_CHOICES, SamplerSettings, StepTimer, prepare_sampling, resolve_preset
from .model import SamplerModel
from .routes import confirmed_plan, to_client


def _send(event: str, data: dict) -> None:
    to_client(lambda server: server.send_sync(event, data, server.client_id))


class ZImageSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageSampler",
            display_name="Z-Image Sampler",
            category="Z-Image",
            description="Flow-matching Euler sampling, step for step as the reference pipeline. Turbo: 8 steps, cfg 1 "
                        "(no negative needed). Base: 28–50 steps, cfg 3–5 with a negative prompt. An encoded latent with "
                        "denoise < 1 does image-to-image; a latent with a noise mask inpaints.",
            inputs=[
                io.Model.Input("model", tooltip="A Z-Image MODEL: from Load Z-Image Model, a LoRA or patch node, or ComfyUI's "
                                               "UNETLoader (the native model runs through its own apply_model)."),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning (Z-Image Text Encode)."),
                io.Latent.Input("latent_image", tooltip="Empty latent for text-to-image, or an encoded image for img2img/inpainting."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Same seed → same noise as ComfyUI's own samplers, so seeds carry between graphs."),
                io.Combo.Input("preset", options=PRESET_CHOICES, default="turbo",
                               tooltip="turbo: 8 steps, cfg 1, shift 3 (Z-Image-Turbo). base: 28 steps, cfg 4, shift 3 "
                                       "(Z-Image). custom: use the values below."),
                io.Int.Input("steps", default=8, min=1, max=200, tooltip="Model calls (with denoise < 1, only the last "
                             "steps × denoise of the schedule run). Used with preset=custom."),
                io.Float.Input("cfg", default=1.0, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Guidance, ComfyUI convention: 1 = off (Turbo). Base: 3–5. The reference's "
                                       "guidance_scale g equals cfg − 1. Used with preset=custom."),
                io.Float.Input("shift", default=3.0, min=0.1, max=20.0, step=0.1, round=0.01,
                               tooltip="Time shift of the schedule; Z-Image uses 3. Higher spends more steps at high noise. "
                                       "Used with preset=custom."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1: start from pure noise. Lower keeps more of the input latent (image-to-image strength)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="What to avoid; needed when cfg > 1 (an empty prompt works)."),
                io.Float.Input("cfg_normalization", default=0.0, min=0.0, max=10.0, step=0.05, advanced=True,
                               tooltip="Caps the guided prediction's norm at k × the conditional one (0 = off; the "
                                       "reference uses 1 for strong CFG)."),
                io.Float.Input("cfg_truncation", default=1.0, min=0.0, max=1.0, step=0.01, advanced=True,
                               tooltip="Stops guidance once the model time passes this value (1 = never; e.g. 0.9 saves the "
                                       "last unconditional passes)."),
                io.Float.Input("variety", default=0.0, min=0.0, max=4.0, step=0.05, optional=True, tooltip=VARIETY_TOOLTIP),
                io.Float.Input("variety_fraction", default=0.3, min=0.0, max=1.0, step=0.05, optional=True, advanced=True,
                               tooltip=FRACTION_TOOLTIP),
            ],
            outputs=[io.Latent.Output(tooltip="Denoised latent in VAE space: decode it with the core VAE Decode node.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, preset, steps, cfg, shift, denoise, negative=None,
                cfg_normalization=0.0, cfg_truncation=1.0, variety=0.0, variety_fraction=0.3) -> io.NodeOutput:
        steps, cfg, shift = resolve_preset(preset, steps, cfg, shift)
        settings = SamplerSettings(seed, steps, cfg, shift, denoise, cfg_normalization, cfg_truncation, variety, variety_fraction)
        sm = SamplerModel(model, shift)
        job = prepare_sampling(sm, positive, negative, latent_image, settings)
        b, _, h, w = job.noise.shape
        extra = model.get_nested_additional_models()  # other nodes' models (our ControlNets load with the transformer)
        if sm.ours:
            model.load_for(activation_bytes(sm.dit, w * 8, h * 8, b, cfg > 1.0, controls=len(model.sides())), extra)
        else:
            mm.load_models_gpu([model, *extra], memory_required=model.memory_required([b * (2 if cfg > 1.0 else 1), 16, h, w]))
        previewer = latent_preview.get_previewer(model.load_device, comfy.latent_formats.Flux())
        pbar = comfy.utils.ProgressBar(steps)  # each step reports the true total (fewer steps when denoise < 1)
        timer = StepTimer()
        node = cls.hidden.unique_id if cls.hidden is not None else None

        def on_step(st: zc.Step):
            preview = previewer.decode_latent_to_preview_image("JPEG", st.x0) if previewer else None
            pbar.update_absolute(st.index + 1, st.total, preview)
            _send("zimage.progress", {"node": node, **timer.tick(st.index + 1, st.total)})

        if sm.ours:
            _send("zimage.plan", {"node": node, "model": os.path.basename(sm.dit.source_path.rstrip("/")),
                                  "plan": confirmed_plan(model), "device": str(model.load_device)})
        try:
            out = job.run(sm, callback=on_step, cancel=mm.processing_interrupted)
        except zc.ZImageInterrupted:
            mm.throw_exception_if_processing_interrupted()
            raise
        finally:
            if getattr(model, "streamer", None) is not None:
                model.streamer.drop_inflight()  # the control models' copies too
        return io.NodeOutput(out)
