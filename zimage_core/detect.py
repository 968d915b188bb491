"""Recognise what a weight file holds from its key names and shapes, so a wrong file gets a useful message."""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import ZImageError


def strip_prefix(keys: list[str], candidates: tuple[str, ...], anchor: str) -> str:
    """Return the prefix that, removed, makes ``anchor`` a key ('' if it already is one or none fits)."""
    ks = set(keys)
    if anchor in ks:
        return ""
    for p in candidates:
        if p + anchor in ks:
            return p
    return ""


def with_article(name: str) -> str:
    """'an SDXL UNet', 'an autoencoder', 'a FLUX.1 transformer': the article as the name is spoken."""
    word = name.split()[0] if name.split() else name
    spoken_vowel = word[:1].lower() in "aeiou" or re.match(r"(SD|S\d|HF|LDM|MMDiT|F\d|RGB|LLM)", word)
    return ("an " if spoken_vowel else "a ") + name


def looks_like(keys: list[str], shape: Callable[[str], tuple[int, ...]] | None = None) -> str:
    """'looks like an SDXL UNet checkpoint', or what the names are when no family fits."""
    kind = describe(keys, shape)
    if kind == "unknown":
        return f"holds tensors of no model family this pack recognises (e.g. {', '.join(sorted(keys)[:3]) or 'none at all'})"
    return f"looks like {with_article(kind)}"


def block_count(keys: list[str], pattern: str, what: str, path: str, limit: int = 1000) -> int:
    """How many numbered blocks ``pattern`` (a regex with one index group) finds: indices must run 0..n-1 and stay
    below ``limit``, so a crafted key can never make us build or loop over a billion blocks."""
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in keys if (m := rx.match(k)) and len(m.group(1)) <= 6}
    if any(rx.match(k) and len(rx.match(k).group(1)) > 6 for k in keys) or (idx and max(idx) >= limit):
        raise ZImageError(f"{path}: a {what} index in its tensor names is absurdly large (more than {limit} {what}s); "
                          "the file is corrupt or crafted.")
    if idx and len(idx) != max(idx) + 1:
        gap = min(set(range(max(idx) + 1)) - idx)
        raise ZImageError(f"{path}: {what} {gap} is missing (the file has {what}s up to {max(idx)}); the file is "
                          "incomplete or a different variant.")
    return len(idx)


def _has(keys: set[str], *fragments: str) -> bool:
    return all(any(f in k for k in keys) for f in fragments)


def _shape_of(shape: Callable[[str], tuple[int, ...]] | None, keys: set[str], suffix: str):
    if shape is None:
        return None
    for k in keys:
        if k.endswith(suffix):
            return shape(k)
    return None


def describe(keys: list[str], shape: Callable[[str], tuple[int, ...]] | None = None) -> str:
    """A short human name for the model family a key set belongs to ('unknown' when we cannot tell)."""
    ks = set(keys)
    if _has(ks, "cap_embedder.1.weight", "noise_refiner."):
        s = _shape_of(shape, ks, "cap_embedder.1.weight")
        if s and s[0] == 2304:
            return "Lumina-Image 2.0 (a NextDiT like Z-Image, but dim 2304 with a Gemma text encoder)"
        if _has(ks, "siglip_embedder."):
            return "Z-Image Omni/Edit transformer"
        return "Z-Image transformer"
    if _has(ks, "double_blocks.", "single_blocks."):
        return "FLUX.1 transformer (BFL layout)"
    if _has(ks, "transformer_blocks.", "single_transformer_blocks."):
        return "FLUX.1 transformer (diffusers layout)"
    if _has(ks, "transformer_blocks.", "img_mod.") or _has(ks, "txt_norm.", "img_in."):
        return "Qwen-Image transformer"
    if _has(ks, "joint_blocks."):
        return "Stable Diffusion 3 transformer"
    if _has(ks, "input_blocks.", "output_blocks."):
        if _has(ks, "conditioner.embedders.1") or _has(ks, "label_emb."):
            return "SDXL UNet checkpoint"
        return "Stable Diffusion 1.x/2.x UNet checkpoint"
    if _has(ks, "down_blocks.", "up_blocks.", "mid_block.") and _has(ks, "attentions."):
        return "diffusers UNet (Stable Diffusion family)"
    if _has(ks, "blocks.", "patch_embedding.") and _has(ks, "self_attn.q."):
        return "Wan video transformer"
    if _has(ks, "encoder.down.", "decoder.up."):
        s = _shape_of(shape, ks, "decoder.conv_in.weight")
        ch = f", {s[1]} latent channels" if s else ""
        return f"autoencoder / VAE (BFL/LDM layout{ch})"
    if _has(ks, "encoder.down_blocks.", "decoder.up_blocks."):
        return "autoencoder / VAE (diffusers layout)"
    if _has(ks, "self_attn.q_proj.weight", "mlp.gate_proj.weight"):
        s = _shape_of(shape, ks, "embed_tokens.weight")
        qn = _has(ks, "self_attn.q_norm.weight")
        fam = "Qwen3" if qn else "Qwen2/Llama-family"
        if _has(ks, "visual.") or _has(ks, "vision_tower."):
            fam += "-VL"
        size = f" (hidden size {s[1]}, vocabulary {s[0]})" if s else ""
        return f"{fam} language model / text encoder{size}"
    if _has(ks, "text_model.encoder.layers."):
        return "CLIP text encoder"
    if _has(ks, "encoder.block.", "SelfAttention.q.weight"):
        return "T5 text encoder"
    if _has(ks, "vision_model.encoder.layers."):
        return "CLIP/SigLIP vision encoder"
    if _has(ks, "lora_A.") or _has(ks, "lora_down.") or _has(ks, "lora_up.") or _has(ks, "lokr_w1"):
        return "LoRA / LyCORIS adapter"
    return "unknown"
