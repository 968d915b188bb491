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
