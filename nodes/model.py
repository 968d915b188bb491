"""Our transformer as a standard ComfyUI MODEL.

``ZImageDiffusionModel`` is our transformer behind the call convention of ComfyUI's native NextDiT
(``comfy/ldm/lumina/model.py``): ``(x, timesteps=σ, context, num_tokens, attention_mask, transformer_options,
ref_latents…)`` → ``−(x0 − noise)``, the flow velocity ComfyUI's ``CONST`` model sampling expects. Its
parameter names are native NextDiT's, so ComfyUI's Z-Image LoRA key map (``comfy/lora.py``,
``z_image_to_diffusers``) addresses our weights unchanged. ``ZImageBase`` is a ``comfy.model_base.Lumina2``
(native Z-Image's class: same conditioning, same LoRA key map) whose diffusion model is ours, with
ComfyUI's own Z-Image model config: flow sampling with shift 3, the Flux latent format, memory_usage_factor.
"""

from __future__ import annotations

import comfy.ldm.common_dit
import comfy.model_base
import comfy.model_patcher
import comfy.patcher_extension as pe
import comfy.supported_models
import torch

import zimage_core as zc
from zimage_core.transformer import ZImageTransformer


class ZImageDiffusionModel(ZImageTransformer):
    """``forward`` speaks native NextDiT; ``predict`` is our own call (model time, caption list, raw x0 − noise)."""

    predict = ZImageTransformer.forward

    @property
    def dtype(self) -> torch.dtype:  # what BaseModel casts inputs to; weights keep their storage dtype
        return self.compute_dtype

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, **kwargs):
        wrappers = pe.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL, kwargs.get("transformer_options", {}))
        return pe.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timesteps, context, num_tokens, attention_mask, **kwargs)

    def _forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, ref_latents=(), ref_contexts=(),  # noqa: ARG002
                 siglip_feats=(), transformer_options=None, **kwargs):  # noqa: ARG002 (native NextDiT's signature)
        if len(ref_latents) or len(siglip_feats):
            raise zc.ZImageError("Z-Image Omni references through KSampler are not supported by this loader yet; "
                                 "use the Z-Image Sampler for edit graphs.")
        h, w = x.shape[-2:]
        x = comfy.ldm.common_dit.pad_to_patch_size(x, (self.cfg.patch_size, self.cfg.patch_size))
        # native NextDiT reads every context token (it ignores attention_mask), so do we
        out = self.predict(x, 1.0 - timesteps.float(), list(context))
        return -out[..., :h, :w]


def model_config(cfg: zc.ZImageConfig, dtype: torch.dtype) -> comfy.supported_models.ZImage:
    """ComfyUI's own Z-Image config (shift 3, Flux latents, memory factor) for a model it must not build."""
    unet = {"image_model": "lumina2", "dim": cfg.dim, "n_layers": cfg.n_layers, "n_refiner_layers": cfg.n_noise_refiner,
            "cap_feat_dim": cfg.cap_feat_dim, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads,
            "axes_dims": list(cfg.axes_dims), "rope_theta": cfg.rope_theta, "time_scale": cfg.t_scale,
            "z_image_modulation": True, "pad_tokens_multiple": 32, "patch_size": cfg.patch_size,
            "in_channels": cfg.in_channels, "disable_unet_model_creation": True}
    mc = comfy.supported_models.ZImage(unet)
    mc.set_inference_dtype(dtype, None)
    return mc


class ZImageBase(comfy.model_base.Lumina2):
    """Native Z-Image's BaseModel (conditioning, LoRA key map, model sampling) around our diffusion model."""

    def __init__(self, dit: ZImageDiffusionModel, device=None):
        comfy.model_base.BaseModel.__init__(self, model_config(dit.cfg, dit.compute_dtype), comfy.model_base.ModelType.FLOW,
                                            device=device)
        self.memory_usage_factor_conds = ("ref_latents",)
        self.diffusion_model = dit



class SamplerModel:
    """A MODEL (ours, or native Z-Image from UNETLoader) as zimage_core's sampler calls a transformer:
    ``model(x, t, captions)`` → x0 − noise, t the model time. Ours is called directly (exact, no σ round trip)
    with the MODEL's transformer_options; the native one through its own ``apply_model``."""

    def __init__(self, patcher):
        self.patcher, self.base = patcher, patcher.model
        self.dit = self.base.diffusion_model
        self.ours = isinstance(self.dit, ZImageDiffusionModel)
        self.compute_dtype = self.base.get_dtype_inference()
        self.cfg = self.dit.cfg if self.ours else zc.ZImageConfig(cap_feat_dim=self.dit.cap_embedder[0].weight.shape[0])

    @property
    def device(self) -> torch.device:
        return self.dit.device if self.ours else self.patcher.load_device

    @property
    def run_block(self):  # the sampler's cancel check wraps our block runner
        return self.dit.run_block if self.ours else (lambda block, *a: block(*a))

    @run_block.setter
    def run_block(self, fn):
        if self.ours:
            self.dit.run_block = fn

    def options(self) -> dict:
        """transformer_options as ComfyUI's samplers pass them: the MODEL's patches plus its wrappers and callbacks."""
        opts = comfy.model_patcher.create_model_options_clone(self.patcher.model_options)
        to = opts.setdefault("transformer_options", {})
        pe.merge_nested_dicts(to.setdefault("wrappers", {}), self.patcher.wrappers, copy_dict1=False)
        pe.merge_nested_dicts(to.setdefault("callbacks", {}), self.patcher.callbacks, copy_dict1=False)
        return to

    def __call__(self, x, t, captions, **omni):
        if self.ours:
            return self.dit.predict(x, t, captions, **omni)
        if omni:
            raise zc.ZImageError("Omni/edit references need our Z-Image loader; the native UNETLoader model runs "
                                 "text-to-image, image-to-image and inpainting here.")
        sigma = (1.0 - torch.as_tensor(t, dtype=torch.float32, device=x.device)).reshape(-1).expand(len(x))
        outs = []
        for i in range(len(x)):  # one sample a call: native NextDiT reads every context token, so never pad captions
            ctx = captions[i][None]
            xi = x[i : i + 1].float()
            den = self.base.apply_model(xi, sigma[i : i + 1], c_crossattn=ctx, num_tokens=ctx.shape[1],
                                        transformer_options=self.options())
            outs.append((den - xi) / sigma[i])  # = −velocity = x0 − noise
        return torch.cat(outs)
