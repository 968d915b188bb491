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

from dataclasses import replace

import comfy.ldm.common_dit
import comfy.model_base
import comfy.model_patcher
import comfy.patcher_extension as pe
import comfy.supported_models
import torch
from comfy.ldm.flux.layers import EmbedND

import zimage_core as zc
from zimage_core.blocks import BlockCall, BlockRun
from zimage_core.controlnet import control_hooks
from zimage_core.packed import Packed
from zimage_core.packing import grid_ids, pad_to_multiple
from zimage_core.transformer import ZImageTransformer

# transformer_options keys of ours: Fun ControlNets (nodes/controlnet.py), the shift their start/end percents use, and
# whether calls may replay as CUDA graphs (the loader's option, per MODEL clone)
CONTROL, SHIFT, GRAPHS = "zimage_control", "zimage_shift", "zimage_cuda_graphs"


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
        captions = list(context)
        t = 1.0 - timesteps.float()
        run = comfy_block_run(self, transformer_options or {}, x, t, captions)
        return -self.predict(x, t, captions, run=run)[..., :h, :w]


def comfy_block_run(dit: ZImageTransformer, to: dict, x: torch.Tensor, t: torch.Tensor, captions: list,
                    run: BlockRun | None = None) -> BlockRun:
    """``transformer_options`` at native NextDiT's patch points, as block hooks: ``block_index`` / ``total_blocks`` /
    ``block_type`` set before each main layer, and the ``noise_refiner`` and ``double_block`` patches called after
    their blocks with native's arguments (image tokens with their pads, the block input, native-format rope,
    the time embedding, the padded latent); they may edit the tokens in place or return replacements. Our Fun
    ControlNets (``to[CONTROL]``) add their hints first, at model time ``t``. ``run`` (e.g. the sampler's cancel
    check) is kept."""
    run = replace(run or BlockRun(), cuda_graphs=bool(to.get(GRAPHS)))
    if to.get(CONTROL):
        run = replace(run, after=[*run.after, *control_hooks(to[CONTROL], dit, t, tuple(x.shape[-2:]), to.get(SHIFT, 3.0))])
    patches = to.get("patches", {})
    if not to.get(CONTROL) and not patches.get("noise_refiner") and not patches.get("double_block"):
        return run  # no hook would act: the forward stays free of per-block Python (and may replay as a CUDA graph)
    p, n_img = dit.cfg.patch_size, (x.shape[-2] // dit.cfg.patch_size) * (x.shape[-1] // dit.cfg.patch_size)
    img_len = pad_to_multiple(n_img)
    memo: dict = {}

    def rope() -> torch.Tensor:  # native's freqs_cis for each sample's image tokens: ids (caption run + 1, h, w), pads 0
        if "pe" not in memo:
            ids = [torch.cat([grid_ids(x.shape[-2] // p, x.shape[-1] // p, pad_to_multiple(len(c)) + 1),
                              torch.zeros(img_len - n_img, 3, dtype=torch.long)]) for c in captions]
            ids = torch.stack(ids).to(x.device, torch.float32)
            memo["pe"] = EmbedND(dit.cfg.head_dim, dit.cfg.rope_theta, list(dit.cfg.axes_dims))(ids).movedim(1, 2)
        return memo["pe"]

    def before(call: BlockCall, h, inner):
        if call.index == 0:
            memo[call.stage] = h  # the stage's input: native's img_input
        if call.stage == "layers":
            to.update(block_index=call.index, total_blocks=len(dit.layers), block_type="double")
        return inner(h)

    def after(call: BlockCall, h):
        name = {"noise_refiner": "noise_refiner", "layers": "double_block"}.get(call.stage)
        if name not in patches:
            return h
        if call.stage == "noise_refiner":
            img, img_in, txt = h, memo["noise_refiner"], None  # native's txt here is the refined caption; ours refines it later
        else:
            cap = call.spans[0]["caption"]
            img, img_in, txt = h[:, :img_len], memo["layers"][:, :img_len], h[:, cap]
        for patch in patches[name]:
            out = patch({"img": img, "img_input": img_in, "txt": txt, "pe": rope(), "vec": call.temb, "x": x,
                         "block_index": call.index, "transformer_options": to, "block_type": call.stage})
            if call.stage == "noise_refiner":
                img = h = out.get("img", h)
            else:
                if "img" in out:
                    h[:, :img_len] = out["img"]
                if "txt" in out:
                    h[:, cap] = out["txt"]
        return h

    return replace(run, wraps=[*run.wraps, before], after=[*run.after, after])


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

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        to = {SHIFT: float(getattr(self.model_sampling, "shift", 3.0)), **(transformer_options or {})}  # as patched now,
        # unless the Z-Image Sampler passes its own shift
        return super()._apply_model(x, t, c_concat, c_crossattn, control, to, **kwargs)

    def state_dict(self, *args, **kwargs):
        """Also lists packed weights (GGUF, ComfyUI quant formats; not Parameters) with their Packed objects, so
        ComfyUI's LoRA key map and ``add_patches`` address them (the patcher turns their patches into run-time ones)."""
        sd = super().state_dict(*args, **kwargs)
        if not args and not kwargs:
            for name, m in self.named_modules():
                if isinstance(m.__dict__.get("weight"), Packed):
                    sd[f"{name}.weight"] = m.weight
        return sd


class SamplerModel:
    """A MODEL (ours, or native Z-Image from UNETLoader) as zimage_core's sampler calls a transformer:
    ``model(x, t, captions)`` → x0 − noise, t the model time. Ours is called directly (exact, no σ round trip)
    with the MODEL's transformer_options (``shift``: what our ControlNets' start/end percents map with); the native
    one, and ours when nodes wrapped its call (``wrapped``), through ComfyUI's ``apply_model``."""

    def __init__(self, patcher, shift: float = 3.0):
        self.patcher, self.base, self.shift = patcher, patcher.model, shift
        self.dit = self.base.diffusion_model
        self.ours = isinstance(self.dit, ZImageDiffusionModel)
        self.compute_dtype = self.base.get_dtype_inference()
        self.cfg = self.dit.cfg if self.ours else zc.ZImageConfig(cap_feat_dim=self.dit.cap_embedder[0].weight.shape[0])

    @property
    def device(self) -> torch.device:
        return self.dit.device if self.ours else self.patcher.load_device

    def options(self) -> dict:
        """transformer_options as ComfyUI's samplers pass them: the MODEL's patches plus its wrappers and callbacks."""
        opts = comfy.model_patcher.create_model_options_clone(self.patcher.model_options)
        to = opts.setdefault("transformer_options", {})
        pe.merge_nested_dicts(to.setdefault("wrappers", {}), self.patcher.wrappers, copy_dict1=False)
        pe.merge_nested_dicts(to.setdefault("callbacks", {}), self.patcher.callbacks, copy_dict1=False)
        to[SHIFT] = self.shift
        return to

    def forward_omni(self, x, t, captions, run=None, **omni):
        if not self.ours:
            raise zc.ZImageError("Omni/edit references need our Z-Image loader; the native UNETLoader model runs "
                                 "text-to-image, image-to-image and inpainting here.")
        return self.dit.forward_omni(x, t, captions, run=run, **omni)

    def wrapped(self) -> bool:
        """Whether nodes wrapped the model's call (TorchCompileModel, step caches…): those wrappers sit on ComfyUI's
        ``apply_model`` / diffusion-model call, so ours then goes that way too, as under KSampler."""
        return any(self.patcher.wrappers.get(k) for k in (pe.WrappersMP.APPLY_MODEL, pe.WrappersMP.DIFFUSION_MODEL))

    def __call__(self, x, t, captions, run=None):
        if self.ours and not self.wrapped():
            return self.dit.predict(x, t, captions, run=comfy_block_run(self.dit, self.options(), x, t, captions, run))
        sigma = (1.0 - torch.as_tensor(t, dtype=torch.float32, device=x.device)).reshape(-1).expand(len(x))
        outs = []
        for i in range(len(x)):  # one sample a call: NextDiT (and ours) reads every context token, so never pad captions
            ctx = captions[i][None]
            xi = x[i : i + 1].float()
            den = self.base.apply_model(xi, sigma[i : i + 1], c_crossattn=ctx, num_tokens=ctx.shape[1],
                                        transformer_options=self.options())
            outs.append((den - xi) / sigma[i])  # = −velocity = x0 − noise
        return torch.cat(outs)
