"""The two key vocabularies of Z-Image transformer weights, and the prefixes files wrap them in.

Internal names are the ComfyUI single-file names. diffusers (HF ``transformer/`` folder) differs in five
module names and splits the fused ``attention.qkv`` into ``to_q``/``to_k``/``to_v`` (q, k, v rows, in order).
Weight loading (transformer_files.py) maps diffusers → internal; LoRA matching (lora.py) needs every name
a module may go by. Both read this one table.
"""

from __future__ import annotations

import re

# Prefixes that wrap a bare transformer state dict in the files people have (longest first where they overlap).
WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "unet.")

# (internal, diffusers) module names
RENAMES = (
    ("x_embedder", "all_x_embedder.2-1"),
    ("final_layer", "all_final_layer.2-1"),
    ("attention.out", "attention.to_out.0"),
    ("attention.q_norm", "attention.norm_q"),
    ("attention.k_norm", "attention.norm_k"),
)
QKV = ("attention.qkv", ("attention.to_q", "attention.to_k", "attention.to_v"))
_SPLIT_QKV = re.compile(r"^(.*)\.attention\.to_([qkv])\.weight$")


def _swap(name: str, old: str, new: str) -> str:
    """Replace the module path segment(s) ``old`` by ``new`` where they stand as whole dotted segments."""
    return re.sub(rf"(^|\.){re.escape(old)}(?=\.|$)", lambda m: m.group(1) + new, name)


def split_qkv(key: str) -> tuple[str, int] | None:
    """A diffusers ``….attention.to_q/k/v.weight`` key → (the fused internal weight name, its part 0/1/2)."""
    m = _SPLIT_QKV.match(key)
    return (f"{m.group(1)}.{QKV[0]}.weight", "qkv".index(m.group(2))) if m else None


def internal_name(key: str) -> str:
    """A prefix-free diffusers key → the internal name (to_q/to_k/to_v → the fused qkv)."""
    split = split_qkv(key)
    if split:
        return split[0]
    for internal, diffusers in RENAMES:
        key = _swap(key, diffusers, internal)
    return key


def diffusers_names(module: str) -> list[tuple[str, int | None]]:
    """The diffusers names of an internal module, with the qkv part (0, 1, 2) each covers; [] if it is the same."""
    if module == QKV[0] or module.endswith("." + QKV[0]):
        base = module[: -len(QKV[0])]
        return [(base + part, i) for i, part in enumerate(QKV[1])]
    renamed = module
    for internal, diffusers in RENAMES:
        renamed = _swap(renamed, internal, diffusers)
    return [] if renamed == module else [(renamed, None)]
