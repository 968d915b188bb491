"""Fun ControlNet Union nodes: load a control model, apply it (with an image, and for 2.x an image to inpaint) to a
Z-Image model.

Why a model patch rather than conditioning: the hints go into the transformer's own blocks, for every pass
(conditional and unconditional alike, as the reference pipelines do), so they belong to the model, like
ComfyUI's native ``ZImageFunControlnet``. The Apply node returns a copy of the model carrying the controls;
the input model stays plain for other branches, several Apply nodes stack, and LoRA nodes compose either side.
The controls ride in the MODEL's ``transformer_options["zimage_control"]`` (where our diffusion model reads them
on every sampler call, KSampler included: nodes/model.py). The MODEL's patcher loads their control models with the
transformer under one plan (nodes/memory.py): resident when the budget allows, else their blocks stream too.
"""

from __future__ import annotations

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

import zimage_core as zc
from zimage_core.controlnet import Control, ControlImage, load_controlnet, prepare_control

from .loaders import file_identity
from .model import CONTROL, ZImageDiffusionModel

ZImageControlNet = io.Custom("ZIMAGE_CONTROLNET")
FOLDERS = ("model_patches", "controlnet")
_LOADED: dict[tuple, ModelPatcher] = {}


def control_files() -> list[str]:
    names = []
    for folder in FOLDERS:
        if folder in folder_paths.folder_names_and_paths:
            names += [n for n in folder_paths.get_filename_list(folder) if n not in names]
    return names


def control_path(name: str) -> str:
    for folder in FOLDERS:
        if folder in folder_paths.folder_names_and_paths:
            p = folder_paths.get_full_path(folder, name)
            if p:
                return p
    raise zc.ZImageError(f"{name} is not in models/model_patches or models/controlnet; put the file there.")


def with_control(model: ModelPatcher, control: Control) -> ModelPatcher:
    """A copy of ``model`` with one more control. Not an additional model for ComfyUI to load whole: the MODEL's
    patcher plans and streams the control model with the transformer (``ZImagePatcher.sides``)."""
    if not isinstance(getattr(model.model, "diffusion_model", None), ZImageDiffusionModel):
        raise zc.ZImageError("Z-Image Apply ControlNet needs the MODEL of Load Z-Image Model; for ComfyUI's own "
                             "UNETLoader model use ModelPatchLoader + ZImageFunControlnet.")
    out = model.clone()
    to = out.model_options.setdefault("transformer_options", {})
    to[CONTROL] = [*to.get(CONTROL, ()), control]
    return out


def load_control_patcher(path: str, weight_dtype: str) -> ModelPatcher:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(weight_dtype)
    key = (path, weight_dtype)
    if key not in _LOADED:
        model = load_controlnet(path, dtype=dtype or torch.bfloat16,
                                storage_dtype={"fp8_e4m3fn": torch.float8_e4m3fn}.get(weight_dtype))
        _LOADED[key] = ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    return _LOADED[key]


def encoder(vae):
    """B×3×H×W pixels in [0, 1] → model-space latents with ComfyUI's VAE (Flux latent format)."""
    fmt = comfy.latent_formats.Flux()
    return lambda px: fmt.process_in(vae.encode(px.movedim(1, -1)[..., :3]).float())


def control_latents(cn, vae, image, inpaint_image, mask):
    """(h, w) → the control model's input for a latent of that size: the images are resized to it (area) and
    encoded on first use, as ComfyUI's native node does."""
    enc = encoder(vae)

    def fit(img, h, w):
        if img is None:
            return None
        px = img.movedim(-1, 1)[:, :3]
        if px.shape[-2:] != (h * 8, w * 8):
            px = comfy.utils.common_upscale(px, w * 8, h * 8, "area", "center")
        return px

    def latent(h: int, w: int) -> torch.Tensor:
        m = None
        if mask is not None:
            m = mask.reshape(-1, 1, *mask.shape[-2:]).float()
            m = comfy.utils.common_upscale(m, w * 8, h * 8, "bilinear", "center")
        loaded = mm.loaded_models(only_currently_used=True)
        out = prepare_control(ControlImage(cn, fit(image, h, w), 1.0, fit(inpaint_image, h, w), m), enc)
        mm.load_models_gpu(loaded)  # encoding may have moved the sampling models off the device
        return out.latent

    return latent


class ZImageControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageControlNetLoader",
            display_name="Z-Image ControlNet Loader",
            category="Z-Image",
            description="Loads an alibaba-pai Fun ControlNet Union for Z-Image (v1, 2.0, 2.1, lite, tile, 2602 gray) "
                        "from models/model_patches or models/controlnet; its version is read from the weights.",
            inputs=[
                io.Combo.Input("control_net_name", options=control_files(),
                               tooltip="e.g. Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors (model_patches or controlnet folder)."),
                io.Combo.Input("weight_dtype", options=["auto", "bf16", "fp16", "fp32", "fp8_e4m3fn"], default="auto",
                               tooltip="auto keeps the file's storage (fp8 files stay fp8); fp8_e4m3fn halves a bf16 file's memory."),
            ],
            outputs=[ZImageControlNet.Output(tooltip="The control model, for Z-Image Apply ControlNet.")],
        )

    @classmethod
    def fingerprint_inputs(cls, control_net_name, **_):
        return file_identity(control_path, control_net_name)

    @classmethod
    def execute(cls, control_net_name, weight_dtype="auto") -> io.NodeOutput:
        return io.NodeOutput(load_control_patcher(control_path(control_net_name), weight_dtype))


class ZImageApplyControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageApplyControlNet",
            display_name="Z-Image Apply ControlNet",
            category="Z-Image",
            description="Guides the structure of the image with a preprocessed control image (canny, depth, pose, HED, "
                        "gray, tile…). With a 2.x model, an image to inpaint and its mask make it a ControlNet inpainter. "
                        "Returns a copy of the model; chain several to stack controls.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of Load Z-Image Model to guide (or of a LoRA / patch node after it)."),
                ZImageControlNet.Input("control_net", tooltip="From Z-Image ControlNet Loader."),
                io.Vae.Input("vae", tooltip="The Z-Image (FLUX) VAE: the images are encoded with it."),
                io.Float.Input("strength", default=0.75, min=-2.0, max=2.0, step=0.05,
                               tooltip="Hint scale. alibaba-pai suggests 0.65–0.9 (0.75 for Union, up to 1.0 for tile); 0 = off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the schedule the control starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where it stops (1 = last step); stopping early lets details depart from the control."),
                io.Image.Input("image", optional=True,
                               tooltip="The preprocessed control image (e.g. from a Canny node); resized to the output size."),
                io.Image.Input("inpaint_image", optional=True,
                               tooltip="2.x models: the image to inpaint; the masked area is blanked before encoding."),
                io.Mask.Input("mask", optional=True, tooltip="2.x models: white = regenerate, with inpaint_image."),
            ],
            outputs=[io.Model.Output(tooltip="The model with this control added (KSampler or the Z-Image Sampler); the "
                                             "input model stays plain.")],
        )

    @classmethod
    def execute(cls, model, control_net, vae, strength, start_percent, end_percent, image=None, inpaint_image=None,
                mask=None) -> io.NodeOutput:
        cn = control_net.model
        if start_percent > end_percent:
            raise zc.ZImageError(f"start_percent {start_percent} is after end_percent {end_percent}.")
        if image is None and (inpaint_image is None or not cn.cfg.inpaint):
            raise zc.ZImageError("connect a control image" + (" or an image to inpaint" if cn.cfg.inpaint else "") + ".")
        if (inpaint_image is not None or mask is not None) and not cn.cfg.inpaint:
            raise zc.ZImageError(f"{cn.cfg.name} has no inpainting input; use a 2.x Union model to inpaint.")
        control = Control(cn, control_latents(cn, vae, image, inpaint_image, mask), strength, start_percent, end_percent)
        return io.NodeOutput(with_control(model, control))
