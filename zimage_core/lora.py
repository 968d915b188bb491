"""LoRA and LyCORIS adapters for the Z-Image transformer, in every key dialect people have.

Each key is reduced to (module, parameter). Modules are matched against both vocabularies of the
model (ComfyUI's fused ``attention.qkv`` / ``attention.out`` / ``x_embedder`` and diffusers'
``to_q/to_k/to_v`` / ``to_out.0`` / ``all_x_embedder.2-1``), dotted or with underscores (kohya's
``lora_unet_``, LyCORIS' ``lycoris_``), under any of the usual prefixes (``diffusion_model.`` ai-toolkit,
``transformer.`` diffusers, ``base_model.model.`` PEFT, bare or ``.default.`` DiffSynth). Separate
q/k/v deltas land exactly on their rows of the fused qkv.

Scales follow each format: LoRA alpha/rank (1 without alpha, as PEFT and diffusers; a diffusers
training script's ``lora_adapter_metadata`` gives lora_alpha/r and its patterns), LoKr alpha/dim only
when a factor is itself factored (as LyCORIS and ComfyUI), LoHa alpha/rank. Full deltas: ``.diff``
(weights, norms included) and ``.diff_b`` (biases), as ComfyUI's trainer and LoRA extractor write them
(ComfyUI comfy_extras/nodes_train.py, comfy_extras/nodes_lora_extract.py), and LyCORIS' ``w_norm``/``b_norm``.

A file holding both the fused (``attention.qkv`` / ``attention.out``) and the split (``to_q/k/v`` /
``to_out.0``) copy of one layer is applied once, from the split copy, as diffusers does
(diffusers loaders/lora_conversion_utils.py ``_convert_non_diffusers_z_image_lora_to_diffusers``: "qkv
duplicates individual to.q/k/v keys → skip qkv", "out duplicates to_out.0 keys → skip bare out").

``LoraPatcher`` merges deltas into bf16/fp16/fp32 weights (keeping the original tensors to restore them
bit for bit) or, for fp8 or packed storage, attaches them as run-time patches so nothing is re-quantised.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .detect import describe
from .errors import ZImageError
from .layers import Linear
from .layouts import WRAPPER_PREFIXES, diffusers_names
from .packed import Packed
from .safetensors_io import open_weights

log = logging.getLogger("zimage")

PREFIXES = ("base_model.model.", *WRAPPER_PREFIXES, "pipe.dit.", "dit.")
# "lora_unet__": VideoX-Fun / alibaba-pai (Z-Image-Fun LoRAs): aigc-apps/VideoX-Fun videox_fun/utils/lora_utils.py
# names each module "lora_unet" + "." + "" + "." + child name with dots → "_" (the root has an empty name)
UNDERSCORE_PREFIXES = ("lora_unet__", "lora_unet_", "lycoris_", "lora_transformer_")
DIALECTS = {"lora_unet__": "VideoX-Fun", "lora_unet_": "kohya/musubi", "lycoris_": "LyCORIS"}
MAX_RANK = 4096
PARAMS = (
    "lora_A.default.weight", "lora_B.default.weight", "lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight",
    "lora.down.weight", "lora.up.weight", "lora_A", "lora_B", "alpha", "dora_scale",
    "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2", "lokr_t2",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "diff_b", "diff", "w_norm", "b_norm",
)
BIAS_PARAMS = ("diff_b", "b_norm")
DOWN = {"lora_A.default.weight", "lora_A.weight", "lora_down.weight", "lora.down.weight", "lora_A"}
UP = {"lora_B.default.weight", "lora_B.weight", "lora_up.weight", "lora.up.weight", "lora_B"}
OTHER_MODELS = [
    (("double_blocks", "single_blocks"), "FLUX.1"),
    (("single_transformer_blocks", "ff_context", "norm1_context"), "FLUX.1 (diffusers names)"),
    (("img_mod", "txt_mod", "img_mlp"), "Qwen-Image"), (("input_blocks", "output_blocks"), "SD 1.x / SDXL"),
    (("down_blocks", "up_blocks", "mid_block"), "SD 1.x / SDXL (diffusers names)"), (("lora_te",), "an SD text encoder"),
    (("joint_blocks",), "SD3"), (("self_attn_q", "cross_attn"), "Wan"), (("text_model",), "CLIP"),
]


@dataclass
class Delta:
    """One adapter module's change of a target parameter (a Linear's weight, optionally only some of its rows;
    or any module's weight/bias as a dense delta)."""

    target: str
    rows: tuple[int, int] | None
    kind: str  # "lora" (up @ down), "full" (a dense tensor)
    up: torch.Tensor | None
    down: torch.Tensor | None
    scale: float
    param: str = "weight"

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
    duplicates: list[str] = field(default_factory=list)  # fused copies skipped for their split twins

    def summary(self) -> str:
        s = f"{len(self.deltas)} module deltas ({', '.join(self.dialects) or 'unknown dialect'})"
        if self.duplicates:
            s += f"; {len(self.duplicates)} fused copies of split layers skipped (the split copy applies), e.g. {self.duplicates[0]}"
        if self.unmatched:
            s += f"; {len(self.unmatched)} keys matched nothing, e.g. {', '.join(self.unmatched[:3])}"
        return s


def _aliases(model) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """Every name an adapter may use for a module with parameters of ``model`` → (internal name, rows)."""
    out: dict[str, tuple[str, tuple[int, int] | None]] = {}
    dim = model.cfg.dim
    for name, m in model.named_modules():
        if not name or not (any(p is not None for p in m._parameters.values()) or isinstance(m.__dict__.get("weight"), Packed)):
            continue
        for n, part in [(name, None), *diffusers_names(name)]:
            rows = None if part is None else (part * dim, (part + 1) * dim)
            out[n] = out[n.replace(".", "_")] = (name, rows)
            if n.endswith(("to_q", "to_k", "to_v")):  # "to.q": Anime-Z (see diffusers' converter)
                out[n[:-4] + "to." + n[-1]] = (name, rows)
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
                return mod[len(p):], DIALECTS.get(p, p)
        for p in PREFIXES:
            if mod.startswith(p):
                mod = mod[len(p):]
                break
        else:
            break
    return (mod, "") if mod in aliases else None


def _dialect(key: str) -> str:
    for p, name in DIALECTS.items():
        if key.startswith(p):
            return name
    if key.startswith("diffusion_model."):
        return "ai-toolkit/ComfyUI"
    if key.startswith("transformer."):
        return "diffusers"
    if key.startswith("base_model.model."):
        return "PEFT"
    if ".default." in key:
        return "DiffSynth"
    return "bare"


def _peft_config(files) -> dict | None:
    """The transformer's LoraConfig from diffusers' ``lora_adapter_metadata`` (JSON of ``transformer.``-prefixed
    LoraConfig fields: diffusers loaders/lora_base.py ``_save_lora_weights`` / ``_pack_dict_with_prefix``, read
    back in loaders/peft.py ``load_lora_adapter`` → utils/peft_utils.py ``_create_lora_config``)."""
    raw = files.metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as e:
        raise ZImageError(f"{files.path}: its lora_adapter_metadata is not readable JSON ({str(e)[:100]}).") from None
    conf = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    for k in ("r", "lora_alpha"):
        v = conf.get(k)
        if v is not None and (type(v) not in (int, float) or not math.isfinite(v) or v <= 0):
            raise ZImageError(f"{files.path}: lora_adapter_metadata gives {k} = {str(v)[:40]!r}; expected a positive number.")
    for k in ("rank_pattern", "alpha_pattern"):
        pat = conf.get(k) or {}
        if not isinstance(pat, dict) or not all(type(v) in (int, float) and v > 0 for v in pat.values()):
            raise ZImageError(f"{files.path}: lora_adapter_metadata's {k} must map module patterns to positive numbers.")
    return conf or None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's pattern lookup (peft tuners/tuners_utils.py ``get_pattern_key``): a key matches a module whose
    dotted name ends with it."""
    for pat, v in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return v
    return default


def _peft_scale(conf: dict, module: str, rank: int) -> float:
    """lora_alpha / r for ``module`` (diffusers module name), per PEFT's LoraLayer.update_layer."""
    alpha = _pattern_value(conf.get("alpha_pattern") or {}, module, conf.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if conf.get("use_rslora") else alpha / rank


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
        if describe(files.keys(), files.shape).startswith("Z-Image"):
            raise ZImageError(f"{files.path} is a full Z-Image transformer, not a LoRA; load it with the model loader "
                              "(models/diffusion_models).")
        text = " ".join(files.keys())
        for marks, name in OTHER_MODELS:
            if any(m in text for m in marks):
                raise ZImageError(f"{files.path} is a LoRA for {name}, not for Z-Image; it has no keys for Z-Image's layers.")
        raise ZImageError(
            f"{files.path}: none of its {len(files.keys())} keys match a Z-Image layer (e.g. {', '.join(list(files.keys())[:3])}). "
            "It is not a Z-Image LoRA, or uses a naming this loader does not know."
        )
    duplicates = _drop_fused_twins(groups, aliases)
    peft = _peft_config(files)
    deltas = []
    for alias, parts in groups.items():
        if "dora_scale" in parts:
            raise ZImageError(f"{files.path}: {parts['dora_scale']} is a DoRA magnitude; DoRA adapters are not supported yet.")
        target, rows = aliases[alias]
        found = _deltas(files, alias, parts, target, rows, model.get_submodule(target), peft)
        if not found:
            unmatched.extend(parts.values())
        deltas.extend(found)
    if not deltas:
        raise ZImageError(f"{files.path}: its keys name Z-Image layers but hold no weight changes (e.g. "
                          f"{', '.join(list(files.keys())[:3])}); the file is incomplete or not an adapter.")
    broken = next((d for d in deltas if not all(torch.isfinite(t).all() for t in (d.up, d.down) if t is not None)), None)
    if broken is not None:
        raise ZImageError(f"{files.path}: its weight change for {broken.target} holds NaN/inf; the adapter is broken "
                          "(a failed training run or a damaged download).")
    if all(not (d.up.any() and (d.down is None or d.down.any())) for d in deltas):
        raise ZImageError(f"{files.path}: every weight change in it is zero (an untrained or emptied adapter); "
                          "it would change nothing.")
    lf = LoraFile(files.path, deltas, unmatched, sorted(dialects), duplicates)
    if unmatched:
        log.warning("LoRA %s: %d of %d keys match no Z-Image layer and were not applied, e.g. %s",
                    files.path, len(unmatched), len(files.keys()), ", ".join(unmatched[:4]))
    return lf


def _drop_fused_twins(groups: dict[str, dict[str, str]], aliases) -> list[str]:
    """Keep one copy of each layer's weight (and bias) change: split q/k/v rows before the fused qkv, diffusers
    names (``to_out.0``) before ours, else the first in the file (see the module docstring). Returns the keys
    skipped."""

    def rank(a):  # lower wins
        return aliases[a][1] is None, "to_" not in a

    by_target: dict[str, list[str]] = defaultdict(list)
    for a in groups:
        by_target[aliases[a][0]].append(a)
    skipped = []
    for names in by_target.values():
        taken: list[tuple] = []
        for a in sorted(names, key=rank):
            rows = aliases[a][1]
            for kind in {"bias" if p in BIAS_PARAMS else "weight" for p in groups[a] if p != "alpha"}:
                if any(k == kind and (r is None or rows is None or r == rows) for r, k in taken):
                    drop = [p for p in groups[a] if p != "alpha" and (p in BIAS_PARAMS) == (kind == "bias")]
                    skipped += [groups[a].pop(p) for p in drop]
                else:
                    taken.append((rows, kind))
            if not set(groups[a]) - {"alpha"}:
                skipped += list(groups.pop(a).values())
    return sorted(skipped)


def _deltas(files, alias: str, parts: dict[str, str], target: str, rows, module, peft) -> list[Delta]:
    """The Deltas one module's keys describe (LoRA pair, LoKr, LoHa, full weight/bias diffs), checked against the
    module's parameters before anything large is computed."""

    def get(p):
        return files.get(parts[p]).float()

    def shape_of(p):
        return tuple(files.shape(parts[p]))

    def need(*ps):
        missing = [p for p in ps if p not in parts]
        if missing:
            raise ZImageError(f"{files.path}: {alias} has {', '.join(sorted(p for p in parts if p != 'alpha'))} but not "
                              f"{', '.join(missing)}; the adapter is incomplete.")

    out: list[Delta] = []
    for bias_key in BIAS_PARAMS:
        if bias_key in parts:
            b = getattr(module, "bias", None)
            if b is None or shape_of(bias_key) != tuple(b.shape):
                raise ZImageError(f"{files.path}: {parts[bias_key]} has shape {list(shape_of(bias_key))}, but {alias} "
                                  f"{'has no bias' if b is None else f'has a bias of {list(b.shape)}'}.")
            out.append(Delta(target, None, "full", get(bias_key), None, 1.0, "bias"))
    w = getattr(module, "weight", None)
    if w is None:
        return out
    shape = ((rows[1] - rows[0]) if rows else w.shape[0], *w.shape[1:])
    alpha = None
    if "alpha" in parts:
        if files.nbytes(parts["alpha"]) > 16 or math.prod(files.shape(parts["alpha"])) != 1:
            raise ZImageError(f"{files.path}: {parts['alpha']} has shape {list(files.shape(parts['alpha']))}; alpha is one number.")
        alpha = float(get("alpha").reshape(()))
        if not math.isfinite(alpha):
            raise ZImageError(f"{files.path}: {parts['alpha']} is {alpha}; the file is damaged.")
    up_key = next((p for p in parts if p in UP), None)
    down_key = next((p for p in parts if p in DOWN), None)
    lowrank = [p for p in parts if p.startswith(("lokr", "hada"))]
    if up_key or down_key:
        if not (up_key and down_key):
            raise ZImageError(f"{files.path}: {parts[up_key or down_key]} has no {'down' if up_key else 'up'} half; "
                              "the adapter is incomplete.")
        su, sd = shape_of(up_key), shape_of(down_key)
        if len(su) != 2 or len(sd) != 2 or su[1] != sd[0] or not 0 < sd[0] <= MAX_RANK:
            raise ZImageError(f"{files.path}: {parts[up_key]} {list(su)} and {parts[down_key]} {list(sd)} "
                              "do not form a low-rank pair (rank mismatch).")
        if (su[0], sd[1]) != shape:
            lumina = " (2304 wide: a Lumina-Image 2.0 LoRA)" if 2304 in (su[0], sd[1]) else ""
            raise ZImageError(f"{files.path}: {parts[down_key]} gives a {su[0]}×{sd[1]} update but "
                              f"{alias} is {'×'.join(map(str, shape))}; the LoRA was made for a different model size{lumina}.")
        rank = sd[0]
        if alpha is not None:
            scale = alpha / rank
        elif peft is not None:
            scale = _peft_scale(peft, alias, rank)
        else:
            scale = 1.0
        out.append(Delta(target, rows, "lora", get(up_key), get(down_key), scale))
    elif lowrank:
        full, scale, src = _lycoris(files, alias, parts, shape, alpha, need, shape_of, get)
        out.append(Delta(target, rows, "full", full, None, scale))
    for full_key in ("diff", "w_norm"):
        if full_key in parts:
            if shape_of(full_key) != tuple(shape):
                raise ZImageError(f"{files.path}: {parts[full_key]} has shape {list(shape_of(full_key))}, expected "
                                  f"{list(shape)} for {alias}.")
            out.append(Delta(target, rows, "full", get(full_key), None, 1.0))
    return out


def _lycoris(files, alias, parts, shape, alpha, need, shape_of, get):
    """LoKr (kron(w1, w2)) or LoHa ((w1a@w1b) * (w2a@w2b)) with every factor's shape checked first
    (LyCORIS lycoris/modules/lokr.py, loha.py; ComfyUI comfy/weight_adapter/lokr.py, loha.py)."""
    out_f, in_f = shape[0], math.prod(shape[1:])

    def mm_shape(a, b):
        need(a, b)
        sa, sb = shape_of(a), shape_of(b)
        if len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0] or sa[1] > MAX_RANK:
            raise ZImageError(f"{files.path}: {parts[a]} {list(sa)} and {parts[b]} {list(sb)} of {alias} do not multiply.")
        return sa[0], sb[1]

    if any(p.startswith("lokr") for p in parts):
        s1 = shape_of("lokr_w1") if "lokr_w1" in parts else mm_shape("lokr_w1_a", "lokr_w1_b")
        s2 = shape_of("lokr_w2") if "lokr_w2" in parts else mm_shape("lokr_w2_a", "lokr_w2_b")
        if len(s1) != 2 or len(s2) != 2 or (s1[0] * s2[0], s1[1] * s2[1]) != (out_f, in_f):
            raise ZImageError(f"{files.path}: the LoKr factors of {alias} ({list(s1)} ⊗ {list(s2)}) do not make its "
                              f"{out_f}×{in_f} weight; the adapter was made for another model or is damaged.")
        w1 = get("lokr_w1") if "lokr_w1" in parts else get("lokr_w1_a") @ get("lokr_w1_b")
        w2 = get("lokr_w2") if "lokr_w2" in parts else get("lokr_w2_a") @ get("lokr_w2_b")
        dim = shape_of("lokr_w1_b")[0] if "lokr_w1_b" in parts else shape_of("lokr_w2_b")[0] if "lokr_w2_b" in parts else None
        return torch.kron(w1, w2).reshape(shape), alpha / dim if alpha and dim else 1.0, "LoKr"
    s1, s2 = mm_shape("hada_w1_a", "hada_w1_b"), mm_shape("hada_w2_a", "hada_w2_b")
    if s1 != (out_f, in_f) or s2 != (out_f, in_f):
        raise ZImageError(f"{files.path}: the LoHa factors of {alias} make {list(s1)} and {list(s2)}, expected "
                          f"{[out_f, in_f]}.")
    full = (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b"))
    return full.reshape(shape), alpha / shape_of("hada_w1_b")[0] if alpha else 1.0, "LoHa"


class LoraPatcher:
    """Applies a stack of (LoraFile, strength) to one model; ``apply([])`` restores the original weights exactly."""

    def __init__(self, model):
        self.model = model
        self.backup: dict[tuple[str, str], nn.Parameter] = {}
        self.runtime: set[str] = set()
        self.active: tuple = ()

    @classmethod
    def of(cls, model) -> LoraPatcher:
        """The model's patcher (one per model, kept in its declared ``lora_patcher`` slot)."""
        if model.lora_patcher is None:
            model.lora_patcher = cls(model)
        return model.lora_patcher

    def restore(self) -> None:
        for (name, param), w in self.backup.items():
            setattr(self.model.get_submodule(name), param, w)
        for name in self.runtime:
            self.model.get_submodule(name).patches = []
        self.backup.clear()
        self.runtime.clear()
        self.active = ()

    def apply(self, stack: list[tuple[LoraFile, float]], runtime: bool | None = None) -> None:
        """Make the model's weights base + Σ strength·Δ: merged into bf16/fp16/fp32 weights, or as run-time
        patches for fp8 Linear storage (or every Linear weight with ``runtime=True``); biases and norm weights
        are always merged."""
        key = tuple((id(f), float(s)) for f, s in stack) + (runtime,)
        if key == self.active:
            return
        self.restore()
        per: dict[tuple[str, str], list[tuple[Delta, float]]] = defaultdict(list)
        for f, s in stack:
            if s != 0:
                for d in f.deltas:
                    per[(d.target, d.param)].append((d, float(s)))
        with torch.no_grad():
            for (name, param), items in per.items():
                mod = self.model.get_submodule(name)
                if param == "weight" and isinstance(mod, Linear) and (runtime or mod.patch_only):
                    mod.patches = [self._runtime_patch(mod, d, s) for d, s in items]  # fp8/packed: never re-quantised
                    self.runtime.add(name)
                    continue
                w = getattr(mod, param)
                merged = w.detach().float().clone()
                for d, s in items:
                    rows = merged[d.rows[0]:d.rows[1]] if d.rows else merged
                    if d.kind == "lora":  # one fused multiply-add, no full-size temporary
                        rows.addmm_(d.up.float().to(merged.device), d.down.float().to(merged.device), alpha=s * d.scale)
                    else:
                        rows.add_(d.matrix().to(merged.device), alpha=s)
                self.backup[(name, param)] = w
                setattr(mod, param, nn.Parameter(merged.to(w.dtype), requires_grad=False))
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
