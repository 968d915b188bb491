"""Tiny random Z-Image models and checkpoint files with the real key names, built at test time.

The reference models come from diffusers/transformers (test-only dependencies); every parameter is
randomised, the pad tokens included (diffusers starts them at zero, which would hide pad bugs).
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

TINY_DIT = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
    n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512],
)


def gpu_test_transformer(**cfg) -> torch.nn.Module:
    """A bf16 transformer of head width 128 with weights N(0, 0.02), built on the host (the GPU tests' model)."""
    from zimage_core.transformer import ZImageConfig, ZImageTransformer

    model = ZImageTransformer(ZImageConfig(head_dim=128, axes_dims=ZImageConfig.axes_for_head_dim(128), **cfg),
                              dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value of a sensible scale (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name or name.endswith("cap_embedder.0.weight") or name.endswith("siglip_embedder.0.weight"):
                v = 1.0 + 0.2 * r
            elif p.ndim >= 2 and "pad_token" not in name:
                v = r / p.shape[-1] ** 0.5
            else:
                v = 0.5 * r
            p.copy_(v.to(p.dtype))
    return module


def diffusers_transformer(seed: int = 0, dtype=torch.float32, **overrides):
    from diffusers import ZImageTransformer2DModel

    cfg = {**TINY_DIT, **overrides}
    model = ZImageTransformer2DModel(**cfg)
    randomize_(model, seed)
    return model.to(dtype).eval()


def _to_comfy_key(k: str) -> str:
    k = re.sub(r"^all_x_embedder\.2-1\.", "x_embedder.", k)
    k = re.sub(r"^all_final_layer\.2-1\.", "final_layer.", k)
    k = k.replace(".attention.to_out.0.", ".attention.out.")
    k = k.replace(".attention.norm_q.", ".attention.q_norm.").replace(".attention.norm_k.", ".attention.k_norm.")
    return k


def comfyui_state_dict(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers names → ComfyUI single-file names (fused qkv), as ComfyUI's own conversion writes them."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*)\.attention\.to_([qkv])\.weight$", k)
        if m:
            if m.group(2) == "q":
                base = m.group(1) + ".attention."
                out[prefix + m.group(1) + ".attention.qkv.weight"] = torch.cat(
                    [sd[base + "to_q.weight"], sd[base + "to_k.weight"], sd[base + "to_v.weight"]]
                )
            continue
        out[prefix + _to_comfy_key(k)] = v
    return {k: v.contiguous() for k, v in out.items()}


def save_comfyui(model, path: str, prefix: str = "", dtype=None, extra: dict | None = None, metadata=None) -> str:
    sd = {k: (v.to(dtype) if dtype else v) for k, v in model.state_dict().items()}
    sd = comfyui_state_dict(sd, prefix)
    sd.update(extra or {})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(sd, path, metadata=metadata)
    return path


def save_diffusers_folder(model, root: str, n_shards: int = 2, subfolder: str = "transformer", dtype=None) -> str:
    """HF layout: <root>/<subfolder>/diffusion_pytorch_model-0000i-of-0000n.safetensors + index + config.json."""
    folder = os.path.join(root, subfolder)
    os.makedirs(folder, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.state_dict().items()}
    keys = list(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n_shards]}
        save_file(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    if hasattr(model, "config"):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(dict(model.config), f, default=list)
    return folder


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative norm error ||a − b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ---- text encoder and autoencoder ----------------------------------------------------------------


def tiny_qwen(seed: int = 0, dtype=torch.float32, hidden: int = 32, layers: int = 3):
    from transformers import Qwen3Config, Qwen3Model

    c = Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6)
    return randomize_(Qwen3Model(c), seed).to(dtype).eval()


def save_qwen_comfyui(model, path: str, dtype=None) -> str:
    """ComfyUI's text_encoders/qwen_3_4b.safetensors layout: HF Qwen3 names under 'model.'."""
    sd = {"model." + k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(sd, path)
    return path


TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 64, 64], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    m = AutoencoderKL(**TINY_VAE)
    with torch.no_grad():  # a gentler randomisation than randomize_: deep conv stacks blow up with unit gains
        g = torch.Generator().manual_seed(seed)
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            elif p.ndim >= 2:
                p.copy_(r / (p[0].numel() ** 0.5))
            else:
                p.copy_(0.05 * r)
    return m.eval()


def bfl_vae_state_dict(sd: dict[str, torch.Tensor], n_levels: int = 4) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names → BFL ae.safetensors names (written independently of the loader)."""
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", n)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", n)
        if m:
            n = f"decoder.up.{n_levels - 1 - int(m.group(1))}.block.{m.group(2)}.{m.group(3)}"
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", n)
        if m:
            n = f"decoder.up.{n_levels - 1 - int(m.group(1))}.upsample.{m.group(2)}"
        n = n.replace(".mid_block.resnets.0.", ".mid.block_1.").replace(".mid_block.resnets.1.", ".mid.block_2.")
        n = n.replace(".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm.")
        for a in "qkv":
            n = n.replace(f".mid_block.attentions.0.to_{a}.", f".mid.attn_1.{a}.")
        n = n.replace(".mid_block.attentions.0.to_out.0.", ".mid.attn_1.proj_out.")
        n = n.replace(".conv_norm_out.", ".norm_out.").replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attn_1." in n and n.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[n] = v.contiguous()
    return out


def save_bfl_vae(model, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(bfl_vae_state_dict(model.state_dict()), path)
    return path


def write_models_dir(root: str, dit=None, te=None, vae=None, dit_name="z_image_turbo_bf16.safetensors",
                     te_name="qwen_3_4b.safetensors", vae_name="ae.safetensors") -> dict[str, str]:
    """A ComfyUI-style models/ folder with tiny weights under the real file names."""
    dit = dit if dit is not None else diffusers_transformer(seed=1)
    te = te if te is not None else tiny_qwen(0)
    vae = vae if vae is not None else tiny_vae(0)
    return {
        "transformer": save_comfyui(dit, os.path.join(root, "diffusion_models", dit_name)),
        "text_encoder": save_qwen_comfyui(te, os.path.join(root, "text_encoders", te_name)),
        "vae": save_bfl_vae(vae, os.path.join(root, "vae", vae_name)),
    }


def sample_picture(w: int = 64, h: int = 64, seed: int = 0):
    """A smooth RGB test picture (gradients and a disc) as a PIL image."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.2, 0.8, 3)
    r = (x / w) * c[0] + 0.2 * np.sin(y / 7)
    g = (y / h) * c[1] + 0.1
    b = ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 3) ** 2) * c[2]
    a = np.clip(np.stack([r, g, b], -1), 0, 1)
    return Image.fromarray((a * 255).round().astype("uint8"))


# ---- Fun ControlNet Union --------------------------------------------------------------------------------
# Layouts from VideoX-Fun config/z_image/z_image_control*.yaml (aigc-apps/VideoX-Fun); 2.0 runs its control
# layers as the refiner (its own refiner shipped untrained), hence diffusers' "control_layers" mode.
CONTROL_LAYOUTS = {
    "v1": dict(control_layers_places=list(range(0, 30, 5)), control_in_dim=16, add_control_noise_refiner=None),
    "2.1": dict(control_layers_places=list(range(0, 30, 2)), control_in_dim=33,
                add_control_noise_refiner="control_noise_refiner"),
    "2.0": dict(control_layers_places=list(range(0, 30, 2)), control_in_dim=33, add_control_noise_refiner="control_layers"),
    "lite": dict(control_layers_places=[0, 10, 20], control_in_dim=33, add_control_noise_refiner="control_noise_refiner"),
}


def diffusers_controlnet(layout: str, seed: int = 3, dtype=torch.float32, **size):
    """diffusers' ZImageControlNetModel in a published layout, at the tiny transformer's width (or ``size``)."""
    from diffusers import ZImageControlNetModel

    dims = {"dim": TINY_DIT["dim"], "n_heads": TINY_DIT["n_heads"], "n_kv_heads": TINY_DIT["n_kv_heads"], **size}
    cn = ZImageControlNetModel(**CONTROL_LAYOUTS[layout], control_refiner_layers_places=[0, 1], n_refiner_layers=2, **dims)
    return randomize_(cn, seed).to(dtype).eval()


def save_controlnet(cn, path, layout: str, style: str = "diffusers", dtype=None) -> str:
    """The published file: the control model's own tensors under VideoX-Fun's (= diffusers') names, or ComfyUI's
    converted ones (``z_image_convert`` in ComfyUI comfy_extras/nodes_model_patch.py); 2.0 also carries its
    zero-initialised refiner (before_proj/after_proj all zero)."""
    sd = {k: v.to(dtype) if dtype else v for k, v in cn.state_dict().items()}
    if layout == "2.0":
        ref = diffusers_controlnet("2.1", dim=cn.config.dim, n_heads=cn.config.n_heads, n_kv_heads=cn.config.n_kv_heads)
        for k, v in ref.control_noise_refiner.state_dict().items():
            zero = ".before_proj." in k or ".after_proj." in k
            sd[f"control_noise_refiner.{k}"] = (torch.zeros_like(v) if zero else v).to(dtype or v.dtype)
    if style == "comfyui":
        sd = comfyui_state_dict(sd)
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)
