"""LoRA and LyCORIS adapters for the Z-Image transformer, in every key dialect people have.

Each key is reduced to (module, parameter). Modules are matched against both vocabularies of the
model (ComfyUI's fused ``attention.qkv`` / ``attention.out`` / ``x_embedder`` and diffusers'
``to_q/to_k/to_v`` / ``to_out.0`` / ``all_x_embedder.2-1``), dotted or with underscores (kohya's
``lora_unet_``, LyCORIS' ``lycoris_``), under any of the usual prefixes (``diffusion_model.`` ai-toolkit,
``transformer.`` diffusers, ``base_model.model.`` PEFT, bare or ``.default.`` DiffSynth). Separate
q/k/v deltas land exactly on their rows of the fused qkv.

Scales follow each format: LoRA alpha/rank (1 without alpha, as PEFT and diffusers), LoKr
alpha/dim only when a factor is itself factored (as LyCORIS and ComfyUI), LoHa alpha/rank.

``LoraPatcher`` merges deltas into bf16/fp16/fp32 weights (keeping the original tensors to restore them
bit for bit) or, for fp8 or packed storage, attaches them as run-time patches so nothing is re-quantised.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ZImageError
from .layers import Linear
from .layouts import WRAPPER_PREFIXES, diffusers_names
from .safetensors_io import open_weights

log = logging.getLogger("zimage")

PREFIXES = ("base_model.model.", *WRAPPER_PREFIXES, "pipe.dit.", "dit.")
UNDERSCORE_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_")
PARAMS = (
    "lora_A.default.weight", "lora_B.default.weight", "lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight",
    "lora.down.weight", "lora.up.weight", "lora_A", "lora_B", "alpha", "dora_scale",
    "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2", "lokr_t2",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "diff", "diff_b",
)
DOWN = {"lora_A.default.weight", "lora_A.weight", "lora_down.weight", "lora.down.weight", "lora_A"}
UP = {"lora_B.default.weight", "lora_B.weight", "lora_up.weight", "lora.up.weight", "lora_B"}
OTHER_MODELS = [
    (("double_blocks", "single_blocks"), "FLUX.1"), (("single_transformer_blocks",), "FLUX.1 (diffusers names)"),
    (("img_mod", "txt_mod", "img_mlp"), "Qwen-Image"), (("input_blocks", "output_blocks"), "SD 1.x / SDXL"),
    (("down_blocks", "up_blocks", "mid_block"), "SD 1.x / SDXL (diffusers names)"), (("lora_te",), "an SD text encoder"),
    (("joint_blocks",), "SD3"), (("self_attn_q", "cross_attn"), "Wan"), (("text_model",), "CLIP"),
]


@dataclass
class Delta:
    """One adapter module's weight change for a target Linear (optionally only some of its rows)."""

    target: str
    rows: tuple[int, int] | None
    kind: str  # "lora" (up @ down), "full" (a dense matrix)
    up: torch.Tensor | None
    down: torch.Tensor | None
    scale: float

    def matrix(self) -> torch.Tensor:
        if self.kind == "lora":
            return (self.up.float() @ self.down.float()) * self.scale
        return self.up.float() * self.scale


@dataclass
class LoraFile:
    path: str
    deltas: list[Delta]
    unmatched: list[str] = field(default_factory=list)
    dialects: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{len(self.deltas)} module deltas ({', '.join(self.dialects) or 'unknown dialect'})"
        if self.unmatched:
            s += f"; {len(self.unmatched)} keys matched nothing, e.g. {', '.join(self.unmatched[:3])}"
        return s


def _aliases(model) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """Every name a LoRA may use for a Linear of ``model`` → (internal name, rows)."""
    out: dict[str, tuple[str, tuple[int, int] | None]] = {}
    dim = model.cfg.dim
    for name, m in model.named_modules():
        if not isinstance(m, Linear):
            continue
        for n, part in [(name, None), *diffusers_names(name)]:
            rows = None if part is None else (part * dim, (part + 1) * dim)
            out[n] = out[n.replace(".", "_")] = (name, rows)
    return out


def _split(key: str) -> tuple[str, str] | None:
    for p in PARAMS:
        if key.endswith("." + p):
            return key[: -len(p) - 1], p
    return None


def _module(mod: str, aliases) -> tuple[str, str] | None:
    """(alias found, dialect) after peeling prefixes."""
    for _ in range(3):
        if mod in aliases:
            return mod, ""
        for p in UNDERSCORE_PREFIXES:
            if mod.startswith(p) and mod[len(p):] in aliases:
                return mod[len(p):], {"lora_unet_": "kohya/musubi", "lycoris_": "LyCORIS"}.get(p, p)
        for p in PREFIXES:
            if mod.startswith(p):
                mod = mod[len(p):]
                break
        else:
            break
    return (mod, "") if mod in aliases else None


def _dialect(key: str) -> str:
    if key.startswith("lora_unet_"):
        return "kohya/musubi"
    if key.startswith("lycoris_"):
        return "LyCORIS"
    if key.startswith("diffusion_model."):
        return "ai-toolkit/ComfyUI"
    if key.startswith("transformer."):
        return "diffusers"
    if key.startswith("base_model.model."):
        return "PEFT"
    if ".default." in key:
        return "DiffSynth"
    return "bare"


def read_lora(path: str, model) -> LoraFile:
    """Parse an adapter file against ``model``; shapes are checked, unmatched keys reported, other models named."""
    files = open_weights(path)
    aliases = _aliases(model)
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    unmatched, dialects = [], set()
    for key in files.keys():
        sp = _split(key)
        found = _module(sp[0], aliases) if sp else None
        if found is None:
            unmatched.append(key)
            continue
        groups[found[0]][sp[1]] = key
        dialects.add(found[1] or _dialect(key))
        if sp[1].startswith("lokr"):
            dialects.add("LoKr")
        if sp[1].startswith("hada"):
            dialects.add("LoHa")
    if not groups:
        text = " ".join(files.keys())
        for marks, name in OTHER_MODELS:
            if any(m in text for m in marks):
                raise ZImageError(f"{files.path} is a LoRA for {name}, not for Z-Image; it has no keys for Z-Image's layers.")
        raise ZImageError(
            f"{files.path}: none of its {len(files.keys())} keys match a Z-Image layer (e.g. {', '.join(list(files.keys())[:3])}). "
            "It is not a Z-Image LoRA, or uses a naming this loader does not know."
        )
    deltas = []
    for alias, parts in groups.items():
        if "dora_scale" in parts:
            raise ZImageError(f"{files.path}: {parts['dora_scale']} is a DoRA magnitude; DoRA adapters are not supported yet.")
        target, rows = aliases[alias]
        lin = model.get_submodule(target)
        shape = ((rows[1] - rows[0]) if rows else lin.out_features, lin.in_features)
        d = _delta(files, alias, parts, target, rows, shape)
        if d is None:
            unmatched.extend(parts.values())
        else:
            deltas.append(d)
    lf = LoraFile(files.path, deltas, unmatched, sorted(dialects))
    if unmatched:
        log.warning("LoRA %s: %d of %d keys match no Z-Image layer and were not applied, e.g. %s",
                    files.path, len(unmatched), len(files.keys()), ", ".join(unmatched[:4]))
    return lf


def _delta(files, alias: str, parts: dict[str, str], target: str, rows, shape: tuple[int, int]) -> Delta | None:
    """The Delta one module's keys describe (LoRA pair, LoKr, LoHa or a full diff), checked against ``shape``."""

    def get(p):
        return files.get(parts[p]).float() if p in parts else None

    alpha = get("alpha")
    alpha = float(alpha.reshape(-1)[0]) if alpha is not None else None
    up_key = next((p for p in parts if p in UP), None)
    down_key = next((p for p in parts if p in DOWN), None)
    if up_key and down_key:
        up, down = get(up_key), get(down_key)
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ZImageError(f"{files.path}: {parts[up_key]} {list(up.shape)} and {parts[down_key]} {list(down.shape)} "
                              "do not form a low-rank pair (rank mismatch).")
        if (up.shape[0], down.shape[1]) != shape:
            raise ZImageError(f"{files.path}: {parts[down_key]} gives a {up.shape[0]}×{down.shape[1]} update but "
                              f"{alias} is {shape[0]}×{shape[1]}; the LoRA was made for a different model size.")
        return Delta(target, rows, "lora", up, down, alpha / down.shape[0] if alpha else 1.0)
    if any(p.startswith("lokr") for p in parts):
        w1 = get("lokr_w1") if "lokr_w1" in parts else get("lokr_w1_a") @ get("lokr_w1_b")
        w2 = get("lokr_w2") if "lokr_w2" in parts else get("lokr_w2_a") @ get("lokr_w2_b")
        dim = get("lokr_w1_b").shape[0] if "lokr_w1_b" in parts else get("lokr_w2_b").shape[0] if "lokr_w2_b" in parts else None
        full, scale, src = torch.kron(w1, w2), alpha / dim if alpha and dim else 1.0, "LoKr"
    elif "hada_w1_a" in parts:
        full = (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b"))
        scale, src = alpha / get("hada_w1_b").shape[0] if alpha else 1.0, "LoHa"
    elif "diff" in parts:
        full, scale, src = get("diff"), 1.0, "diff"
    else:
        return None
    if tuple(full.shape) != shape:
        raise ZImageError(f"{files.path}: the {src} weights of {alias} make {list(full.shape)}, expected {list(shape)}.")
    return Delta(target, rows, "full", full, None, scale)


class LoraPatcher:
    """Applies a stack of (LoraFile, strength) to one model; ``apply([])`` restores the original weights exactly."""

    def __init__(self, model):
        self.model = model
        self.backup: dict[str, nn.Parameter] = {}
        self.runtime: set[str] = set()
        self.active: tuple = ()

    @classmethod
    def of(cls, model) -> LoraPatcher:
        """The model's patcher (one per model, kept in its declared ``lora_patcher`` slot)."""
        if model.lora_patcher is None:
            model.lora_patcher = cls(model)
        return model.lora_patcher

    def restore(self) -> None:
        for name, w in self.backup.items():
            self.model.get_submodule(name).weight = w
        for name in self.runtime:
            self.model.get_submodule(name).patches = []
        self.backup.clear()
        self.runtime.clear()
        self.active = ()

    def apply(self, stack: list[tuple[LoraFile, float]], runtime: bool | None = None) -> None:
        """Make the model's weights base + Σ strength·Δ: merged into bf16/fp16/fp32 weights, or as run-time
        patches for fp8 storage (or everywhere with ``runtime=True``)."""
        key = tuple((id(f), float(s)) for f, s in stack) + (runtime,)
        if key == self.active:
            return
        self.restore()
        per: dict[str, list[tuple[Delta, float]]] = defaultdict(list)
        for f, s in stack:
            if s != 0:
                for d in f.deltas:
                    per[d.target].append((d, float(s)))
        with torch.no_grad():
            for name, items in per.items():
                lin = self.model.get_submodule(name)
                if runtime or lin.patch_only:  # fp8 and packed weights are never re-quantised: always at run time
                    lin.patches = [self._runtime_patch(lin, d, s) for d, s in items]
                    self.runtime.add(name)
                    continue
                w = lin.weight
                merged = w.detach().float().clone()
                for d, s in items:
                    rows = merged[d.rows[0]:d.rows[1]] if d.rows else merged
                    if d.kind == "lora":  # one fused multiply-add, no full-size temporary
                        rows.addmm_(d.up.float().to(merged.device), d.down.float().to(merged.device), alpha=s * d.scale)
                    else:
                        rows.add_(d.matrix().to(merged.device), alpha=s)
                self.backup[name] = w
                lin.weight = nn.Parameter(merged.to(w.dtype), requires_grad=False)
        self.active = key

    @staticmethod
    def _runtime_patch(lin: Linear, d: Delta, s: float):
        """(down, up, factor) with up padded to the full output rows; a dense delta travels as (None, ΔW, factor)."""
        if d.kind == "lora":
            up = d.up
            if d.rows:
                full = torch.zeros(lin.out_features, up.shape[1])
                full[d.rows[0]:d.rows[1]] = up
                up = full
            return (d.down.float(), up.float(), s * d.scale)
        dense = torch.zeros(lin.out_features, lin.in_features)
        if d.rows:
            dense[d.rows[0]:d.rows[1]] = d.up.float()
        else:
            dense = d.up.float()
        return (None, dense.to(torch.bfloat16), s * d.scale)


def parse_spec(spec: str) -> tuple[str, float]:
    path, _, strength = spec.rpartition(":")
    if not path or not re.fullmatch(r"-?\d+(\.\d*)?", strength):
        return spec, 1.0
    return path, float(strength)


def apply_lora_specs(model, specs: list[str]) -> list[LoraFile]:
    """``FILE:STRENGTH`` strings (strength optional) → applied to ``model``; returns the parsed files."""
    stack = []
    for spec in specs:
        path, strength = parse_spec(spec)
        lf = read_lora(path, model)
        log.info("LoRA %s ×%g: %s", path, strength, lf.summary())
        stack.append((lf, strength))
    LoraPatcher.of(model).apply(stack)
    return [f for f, _ in stack]
