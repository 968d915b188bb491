"""Qwen3 as Z-Image's prompt encoder: the hidden state after the second-to-last layer, before the final norm.

Only the embedding and the first N−1 decoder layers are built and read from disk; the last layer, the
final norm and any ``lm_head`` are never touched. q/k/v and gate/up are fused into one matmul each.
Prompts are right-padded within a batch, so a causal mask alone keeps every prompt's tokens
independent of the others (what the reference computes with its padding mask).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, resolve_backend
from .blocks import PLAIN, Executor
from .detect import block_count, looks_like, strip_prefix
from .errors import ZImageError
from .layers import Embedding, Linear, RMSNorm
from .loader import Source, fill_module
from .quant import comfy_quantized, layer_formats, scale_key
from .safetensors_io import open_weights
from .templates import TEMPLATE
from .tokenizer import PAD_ID, PromptTokenizer, find_tokenizer_dir

QWEN3_SIZES = {1024: "Qwen3-0.6B", 2048: "Qwen3-1.7B", 2560: "Qwen3-4B", 4096: "Qwen3-8B", 5120: "Qwen3-14B/32B"}
Z_IMAGE_HIDDEN = 2560


@dataclass
class Qwen3Config:
    hidden: int
    n_layers_file: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 1_000_000.0
    eps: float = 1e-6

    @property
    def n_layers(self) -> int:
        """Layers we run: all but the last (its output is not the feature Z-Image reads)."""
        return self.n_layers_file - 1


class QwenAttention(nn.Module):
    def __init__(self, cfg: Qwen3Config, backend: str = "sdpa"):
        super().__init__()
        self.cfg, self.backend = cfg, backend
        hd = cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=False)
        self.o_proj = Linear(cfg.n_heads * hd, cfg.hidden, bias=False)
        self.q_norm = RMSNorm(hd, cfg.eps)
        self.k_norm = RMSNorm(hd, cfg.eps)

    def forward(self, x, cos, sin, cache=None):
        """``cache`` (the enhancer's KV cache) prepends earlier keys/values; a single new token attends to all."""
        b, s, _ = x.shape
        c, hd = self.cfg, self.cfg.head_dim
        q, k, v = self.qkv_proj(x).split([c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd], dim=-1)
        q = self.q_norm(q.view(b, s, -1, hd)).transpose(1, 2)
        k = self.k_norm(k.view(b, s, -1, hd)).transpose(1, 2)
        v = v.view(b, s, -1, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        o = attention(q, k, v, None, self.backend, causal=s == k.shape[2])
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))


def rotate(x, cos, sin):
    """Qwen's RoPE: halves rotated (not interleaved pairs), in the activation dtype as transformers does."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class QwenMLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden, 2 * cfg.intermediate, bias=False)
        self.down_proj = Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class QwenLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = QwenAttention(cfg)
        self.mlp = QwenMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.eps)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3PromptEncoder(nn.Module):
    """``encode(prompts)`` → one Lᵢ×hidden tensor per prompt (template applied, ≤ 512 tokens, pads dropped)."""

    def __init__(self, cfg: Qwen3Config, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.cfg, self.compute_dtype = cfg, dtype
        self.embed_tokens = Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList([QwenLayer(cfg) for _ in range(cfg.n_layers)])
        self.tokenizer: PromptTokenizer | None = None
        self.executor: Executor = PLAIN  # owned by the offload streamer while it is attached (blocks.py)
        self.source_path: str | None = None  # set by the loader

    @property
    def device(self) -> torch.device:
        """Where compute runs: the executor's device, else where the layers are."""
        return self.executor.device or self.layers[0].input_layernorm.weight.device

    def blocks(self) -> list[QwenLayer]:
        return list(self.layers)

    def host_modules(self) -> list[nn.Module]:
        """Kept in host memory even when streaming: the 151k-row embedding is only gathered from (0.8 GB saved)."""
        return [self.embed_tokens]

    def rope(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        hd = self.cfg.head_dim
        inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.compute_dtype), emb.sin().to(self.compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids B×S (right-padded) → hidden states B×S×hidden after layer N−1."""
        dev = self.device
        ids = ids.to(dev)
        h = self.embed_tokens(ids, self.compute_dtype).to(dev)
        cos, sin = self.rope(ids.shape[1], dev)
        self.executor.begin(self.layers)
        for layer in self.layers:
            h = self.executor.run(layer, layer, h, cos, sin)
        return h

    @torch.inference_mode()
    def encode(self, prompts: list[str] | str, template: str = TEMPLATE) -> list[torch.Tensor]:
        """Features per prompt; ``template="{}"`` encodes the strings as they are (Omni caption segments)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.tokenizer is None:
            raise ZImageError("This text encoder has no tokenizer; load it with load_text_encoder(..., tokenizer=PATH).")
        ids, _ = self.tokenizer(list(prompts), template)
        n = max(len(i) for i in ids)
        batch = torch.full((len(ids), n), PAD_ID, dtype=torch.long)
        for r, i in enumerate(ids):
            batch[r, : len(i)] = torch.tensor(i, dtype=torch.long)
        h = self.forward(batch)
        return [h[r, : len(i)].clone() for r, i in enumerate(ids)]


# ---- files ------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def text_encoder_plan(files) -> tuple[Qwen3Config, dict[str, Source], str]:
    keys = files.keys()
    prefix = strip_prefix(keys, ("model.", "text_model.", "qwen3_4b.transformer.model.", "transformer.model."), "embed_tokens.weight")
    if prefix + "embed_tokens.weight" not in files or prefix + "layers.0.self_attn.q_norm.weight" not in files:
        raise ZImageError(
            f"{files.path} {looks_like(keys, files.shape)}, not the Qwen3 text encoder Z-Image uses. Choose qwen_3_4b.safetensors "
            "(Comfy-Org/z_image_turbo, split_files/text_encoders) in models/text_encoders, or the text_encoder/ folder "
            "of Tongyi-MAI/Z-Image-Turbo."
        )
    shape = lambda k: files.shape(prefix + k)  # noqa: E731
    n_file = block_count([k[len(prefix):] for k in keys if k.startswith(prefix)], _LAYER.pattern, "layer", files.path)
    hd = shape("layers.0.self_attn.q_norm.weight")[0]
    conf = files.config()
    rope_params = conf.get("rope_parameters")
    rope = conf.get("rope_theta") or (rope_params.get("rope_theta") if isinstance(rope_params, dict) else None)
    try:
        cfg = Qwen3Config(
            hidden=shape("embed_tokens.weight")[1], n_layers_file=n_file, n_heads=shape("layers.0.self_attn.q_proj.weight")[0] // hd,
            n_kv_heads=shape("layers.0.self_attn.k_proj.weight")[0] // hd, head_dim=hd,
            intermediate=shape("layers.0.mlp.gate_proj.weight")[0], vocab=shape("embed_tokens.weight")[0],
            rope_theta=files.config_number({"rope_theta": rope}, "rope_theta", 1e6),
            eps=files.config_number(conf, "rms_norm_eps", 1e-6),
        )
        if not all(0 < v <= 1 << 20 for v in (cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate, cfg.vocab)):
            raise ValueError("implausible sizes")
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise ZImageError(f"{files.path}: cannot read the Qwen3 text encoder's sizes from its weights ({str(e)[:200]}); "
                          "the file is incomplete or damaged.") from None
    plan: dict[str, Source] = {"embed_tokens.weight": Source([prefix + "embed_tokens.weight"], [scale_key(files, prefix + "embed_tokens.weight")])}
    for i in range(cfg.n_layers):
        plan.update(layer_plan(files, prefix, i, f"layers.{i}."))
    return cfg, plan, prefix


def layer_plan(files, prefix: str, i: int, into: str) -> dict[str, Source]:
    """Sources of the file's decoder layer ``i`` as ``QwenLayer`` parameters named ``into + name`` (q/k/v, gate/up fused)."""
    plan = {}
    for suffix in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                   "input_layernorm.weight", "post_attention_layernorm.weight"):
        k = f"{prefix}layers.{i}.{suffix}"
        if k in files:
            plan[into + suffix] = Source([k], [scale_key(files, k) if "proj" in suffix else None])
    for fused, parts in _FUSED.items():
        ks = [f"{prefix}layers.{i}.{p}" for p in parts]
        if all(k in files for k in ks):
            plan[into + fused] = Source(ks, [scale_key(files, k) for k in ks])
    return plan


def check_hidden_size(cfg: Qwen3Config, path: str, expected: int | None) -> None:
    if expected is not None and cfg.hidden != expected:
        name = QWEN3_SIZES.get(cfg.hidden, f"a Qwen3 model with hidden size {cfg.hidden}")
        want = QWEN3_SIZES.get(expected, f"hidden size {expected}")
        raise ZImageError(
            f"{path} is {name} (hidden size {cfg.hidden}), but this Z-Image model reads {want} features "
            f"(hidden size {expected}). Use qwen_3_4b.safetensors (or its fp8 variant)."
        )


def load_text_encoder(
    path: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    tokenizer: str | None = None,
    storage_dtype: torch.dtype | None = None,
    expect_hidden: int | None = None,
    attention_backend: str = "sdpa",
) -> Qwen3PromptEncoder:
    """Load the Qwen3 prompt encoder from ``qwen_3_4b*.safetensors`` or an HF ``text_encoder/`` folder (or its parent).

    ``dtype`` is the compute dtype (default: the file's, bf16 for fp8 files). The tokenizer is found as
    ``find_tokenizer_dir`` describes. ``expect_hidden`` (e.g. 2560) refuses encoders of another size.
    """
    files = comfy_quantized(open_weights(path, subfolder="text_encoder"))
    cfg, plan, prefix = text_encoder_plan(files)
    check_hidden_size(cfg, files.path, expect_hidden)
    wanted = {src_key[: -len(".weight")] for src in plan.values() for src_key in src.keys}
    formats = layer_formats(files, wanted)
    file_dtype = files.dtype(plan["layers.0.mlp.down_proj.weight"].keys[0]) if cfg.n_layers else torch.bfloat16
    compute = dtype or (file_dtype if file_dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16)
    with torch.device("meta"):
        model = Qwen3PromptEncoder(cfg, compute)
    fill_module(model, files, plan, compute_dtype=compute, storage_dtype=storage_dtype, device=device, formats=formats,
                what="Qwen3 text encoder")
    backend = resolve_backend(attention_backend)
    for layer in model.layers:
        layer.self_attn.backend = backend
    model.tokenizer = PromptTokenizer(find_tokenizer_dir(tokenizer, files.path))
    model.source_path = files.path
    return model.eval()
