"""Z-Image transformer files: their key layouts → our internal names (the ComfyUI single-file names), and loading.

* ComfyUI single file: internal names as they are, optionally under ``model.diffusion_model.`` /
  ``diffusion_model.``; a stray ``norm_final.weight`` (written by some converters) is ignored.
* diffusers (HF ``transformer/`` folder): renamed and with q, k, v split, as layouts.py maps it.
"""

from __future__ import annotations

import torch

from .attention import resolve_backend
from .detect import block_count, describe, looks_like, strip_prefix
from .errors import ZImageError
from .layouts import WRAPPER_PREFIXES, internal_name, split_qkv
from .loader import Source, fill_module, storage_dtype_for
from .packed import Packed, stack_rows
from .quant import IGNORED_SUFFIXES, comfy_quantized, layer_formats, scale_key
from .safetensors_io import open_weights
from .transformer import ZImageConfig, ZImageTransformer

IGNORED_KEYS = ("norm_final.weight", "scaled_fp8")


def transformer_layout(keys: list[str]) -> tuple[str, str]:
    """(prefix, 'comfyui' | 'diffusers') of a Z-Image transformer key set."""
    prefix = strip_prefix(keys, WRAPPER_PREFIXES, "cap_embedder.1.weight")
    layout = "diffusers" if any(k.startswith(prefix + "all_x_embedder.") for k in keys) else "comfyui"
    return prefix, layout


def transformer_plan(files) -> tuple[dict[str, Source], list[str], str]:
    """Internal name → Source for every tensor in ``files``; also the unexpected keys and the layout name."""
    prefix, layout = transformer_layout(files.keys())
    return (*weight_plan(files, prefix, layout), layout)


def weight_plan(files, prefix: str, layout: str) -> tuple[dict[str, Source], list[str]]:
    """Internal name → Source for the keys under ``prefix`` in a 'comfyui' or 'diffusers' layout (also the control
    nets' blocks, which use the same names); the keys outside ``prefix``."""
    keys = files.keys()
    plan: dict[str, Source] = {}
    unexpected: list[str] = []
    qkv: dict[str, dict[str, str]] = {}
    for k in keys:
        if not k.startswith(prefix):
            unexpected.append(k)
            continue
        bare = k[len(prefix) :]
        if bare in IGNORED_KEYS or bare.endswith(IGNORED_SUFFIXES) or bare.endswith((".scale_weight", ".weight_scale")):
            continue
        split = split_qkv(bare) if layout == "diffusers" else None
        if split:
            qkv.setdefault(split[0], {})[split[1]] = k
            continue
        sk = scale_key(files, k) if k.endswith(".weight") else None
        plan[internal_name(bare) if layout == "diffusers" else bare] = Source([k], [sk])
    for name, parts in qkv.items():
        if set(parts) == {0, 1, 2}:  # an incomplete set leaves the fused name missing, reported by the loader
            ks = [parts[0], parts[1], parts[2]]
            plan[name] = Source(ks, [scale_key(files, k) for k in ks])
    return plan, unexpected


def internal_shape_fn(files, plan: dict[str, Source]):
    """shape(internal_name) from the file header, for reading the config before any data."""

    def shape(name: str) -> tuple[int, ...]:
        src = plan[name]
        s = list(files.shape(src.keys[0]))
        if len(src.keys) > 1:
            s[0] = sum(files.shape(k)[0] for k in src.keys)
        return tuple(s)

    return shape


def default_compute_dtype(files, plan: dict[str, Source]) -> torch.dtype:
    """The file's own float type for bf16/fp16/fp32 files; bf16 for fp8 files."""
    dt = files.dtype(plan["layers.0.feed_forward.w1.weight"].keys[0])
    return dt if dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.bfloat16


def check_unexpected(files, unexpected: list[str], what: str) -> None:
    if unexpected:
        raise ZImageError(
            f"{files.path}: {len(unexpected)} tensor(s) do not belong to a {what}, e.g. "
            f"{', '.join(sorted(unexpected)[:4])}. The file is a different variant or was merged with something else."
        )


def read_transformer_header(path: str, dtype: torch.dtype | None):
    """Open a transformer file or folder and read everything the header tells: (files, plan, unexpected keys,
    layout, config, compute dtype). Refuses files that are not Z-Image, naming what they are."""
    files = comfy_quantized(open_weights(path, subfolder="transformer"))
    if not describe(files.keys(), files.shape).startswith("Z-Image"):
        raise ZImageError(
            f"{files.path} {looks_like(files.keys(), files.shape)}, not a Z-Image transformer. Choose a Z-Image diffusion model "
            "(e.g. z_image_turbo_bf16.safetensors from Comfy-Org/z_image_turbo, in models/diffusion_models)."
        )
    plan, unexpected, layout = transformer_plan(files)
    for group, what in (("layers", "layer"), ("noise_refiner", "noise refiner block"),
                        ("context_refiner", "context refiner block"), ("siglip_refiner", "SigLIP refiner block")):
        block_count(list(plan), rf"^{group}\.(\d+)\.", what, files.path)
    try:
        cfg = ZImageConfig.from_weights(internal_shape_fn(files, plan), list(plan))
        sizes = {k: v for k, v in vars(cfg).items() if type(v) is int}
        if not all(0 <= v <= 1 << 17 for v in sizes.values()) or min(cfg.dim, cfg.head_dim) < 1 or cfg.dim % cfg.head_dim:
            raise ValueError(f"implausible sizes {sizes}")
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        raise ZImageError(
            f"{files.path}: cannot read the transformer's sizes from its weights ({str(e)[:300]}); the file is "
            "incomplete or not a Z-Image checkpoint."
        ) from None
    return files, plan, unexpected, layout, cfg, dtype or default_compute_dtype(files, plan)


def load_transformer(
    path: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    storage_dtype: torch.dtype | None = None,
    attention_backend: str = "sdpa",
    cls: type[ZImageTransformer] = ZImageTransformer,
) -> ZImageTransformer:
    """Load a Z-Image transformer from a ComfyUI single file or a diffusers folder (``transformer/`` or its parent).

    ``dtype`` is the compute dtype (default: the file's, bf16 for fp8 files). Linear weights keep their
    storage dtype unless ``storage_dtype`` asks otherwise (an fp8 type quantises per tensor on load).
    ``cls`` may be a subclass with another call convention (the ComfyUI nodes use one).
    """
    files, plan, unexpected, layout, cfg, compute = read_transformer_header(path, dtype)
    with torch.device("meta"):
        model = cls(cfg, dtype=compute)
    names = dict(model.named_parameters())
    check_unexpected(files, unexpected + [plan[k].keys[0] for k in plan if k not in names], "Z-Image transformer")
    fill_module(
        model, files, plan, compute_dtype=compute, storage_dtype=storage_dtype, device=device,
        formats=layer_formats(files), what="Z-Image transformer",
    )
    model.set_attention_backend(resolve_backend(attention_backend))
    model.source_path, model.source_layout = files.path, layout
    return model.eval()


def meta_transformer(path: str, dtype: torch.dtype | None = None, storage_dtype: torch.dtype | None = None) -> ZImageTransformer:
    """The model a file would load into, on the meta device, from its header alone (no weights read):
    parameters carry the dtypes loading would give them (GGUF weights stay packed), so offload plans can be
    computed up front."""
    files, plan, _, _, cfg, compute = read_transformer_header(path, dtype)
    with torch.device("meta"):
        model = ZImageTransformer(cfg, dtype=compute)
    stored = {name for name, m in model.named_modules() if hasattr(m, "weight_scale")}
    for name, p in list(model.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        parts = [files.meta(k) for k in plan[name].keys] if name in plan else []
        if owner_name in stored and leaf == "weight" and storage_dtype is None and any(isinstance(p, Packed) for p in parts):
            meta = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")  # noqa: E731
            owner.weight = stack_rows([p.map(meta) if isinstance(p, Packed) else meta(p) for p in parts])
            continue
        src = files.dtype(plan[name].keys[0]) if name in plan else compute
        target = storage_dtype_for(src, compute, storage_dtype) if owner_name in stored and leaf == "weight" else compute
        setattr(owner, leaf, torch.nn.Parameter(torch.empty(p.shape, dtype=target, device="meta"), requires_grad=False))
    model.source_path = files.path
    return model
