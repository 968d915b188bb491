"""Prompt enhancement with the Qwen3-4B that Z-Image already loads as its text encoder.

Z-Image was trained on long, detailed captions; short prompts leave most of the picture to chance. The
encoder holds the embedding and the first N−1 decoder layers; ``load_chat`` reads the rest of the causal
LM (the last layer, the final norm and, for untied files, ``lm_head``) from the same file and shares the
encoder's modules, so the enhancer costs one layer and a norm more. The tail is stored like the encoder:
bf16/fp16, fp8 (+ scale), ComfyUI's packed formats or GGUF blocks (llama.cpp names; a tied head is the
embedding table, expanded per token like any packed ``Linear``). Generation is greedy or sampled (as
transformers' temperature → top-k → top-p warpers, on a CPU generator so a seed means the same text on
any device), with a KV cache, the chat template's thinking switch off, streaming and cancellation.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import PLAIN, Executor
from .errors import ZImageError, ZImageInterrupted
from .layers import FP8_DTYPES, Linear, RMSNorm
from .loader import Source, fill_module
from .quant import comfy_quantized, layer_formats, scale_key
from .safetensors_io import open_weights
from .text_encoder import Qwen3PromptEncoder, QwenLayer, layer_plan, text_encoder_plan

STOP_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>

SYSTEM_PROMPT = """You rewrite short image prompts into one detailed caption for the text-to-image model Z-Image.
Keep everything the user asked for: subject, count, action, composition, style and mood. Write in the user's language.
Copy any text in quotes exactly, letter for letter, and say where it appears (a sign, a label, a title) and how it is lettered.
Add concrete visual detail: the subject's appearance, materials and textures, the setting and background, the time of day and lighting, colours, the camera (shot size, angle, lens, depth of field) and the medium or art style (photograph, oil painting, 3D render, anime...).
Do not add people, objects or text the user did not imply. If the prompt is already detailed, only polish it.
Answer with the caption alone: one flowing paragraph of about 80 to 200 words, no title, no list, no quotes around it, no explanation, no questions and no refusal."""


class KVCache:
    """Keys and values of one layer, preallocated for the whole generation (B×kv_heads×length×head_dim)."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device):
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.n = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = k.shape[2]
        if self.n and s != 1:
            raise ValueError("after the prompt, the cache takes one token at a time")
        self.k[:, :, self.n : self.n + s] = k
        self.v[:, :, self.n : self.n + s] = v
        self.n += s
        return self.k[:, :, : self.n], self.v[:, :, : self.n]


class Qwen3Chat(nn.Module):
    """Qwen3 as a causal LM around a loaded prompt encoder (its embedding and layers are shared, not copied)."""

    def __init__(self, encoder: Qwen3PromptEncoder, last: QwenLayer, norm: RMSNorm, lm_head: Linear | None):
        super().__init__()
        self.encoder, self.last, self.norm, self.lm_head = encoder, last, norm, lm_head
        self.cfg, self.compute_dtype, self.tokenizer = encoder.cfg, encoder.compute_dtype, encoder.tokenizer
        self.executor: Executor = PLAIN  # owned by the offload streamer while it is attached (blocks.py)

    @property
    def device(self) -> torch.device:
        return self.executor.device or self.last.input_layernorm.weight.device

    def blocks(self) -> list[QwenLayer]:
        return [*self.encoder.layers, self.last]

    def host_modules(self) -> list[nn.Module]:
        """A tied head reads the whole embedding every token, so then it lives with compute; untied, it stays on the host."""
        return [] if self.lm_head is None else [self.encoder.embed_tokens]

    def new_cache(self, batch: int, length: int) -> list[KVCache]:
        c = self.cfg
        return [KVCache((batch, c.n_kv_heads, length, c.head_dim), self.compute_dtype, self.device) for _ in self.blocks()]

    def forward(self, ids: torch.Tensor, cache: list[KVCache], rope: tuple[torch.Tensor, torch.Tensor],
                cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Token ids B×S at the cache's next positions → fp32 logits B×vocab of the last position.
        ``cancel()`` returning True stops before the next layer with ``ZImageInterrupted``."""
        dev, start = self.device, cache[0].n
        h = self.encoder.embed_tokens(ids.to(dev), self.compute_dtype).to(dev)
        cos, sin = (r[start : start + ids.shape[1]] for r in rope)
        self.executor.begin(self.blocks())
        for block, c in zip(self.blocks(), cache):
            if cancel is not None and cancel():
                raise ZImageInterrupted("prompt enhancement was interrupted")
            h = self.executor.run(block, block, h, cos, sin, c)
        h = self.norm(h[:, -1])
        if self.lm_head is not None:
            return self.lm_head(h).float()
        # tied: the embedding table (any storage: float, fp8 + scale, packed GGUF blocks) is the output projection
        return F.linear(h, self.encoder.embed_tokens.compute_weight(h.dtype)).float()


def load_chat(encoder: Qwen3PromptEncoder, path: str | None = None) -> Qwen3Chat:
    """The full causal LM for ``encoder``: reads only the last layer, the final norm and ``lm_head`` (if untied)."""
    files = comfy_quantized(open_weights(path or encoder.source_path, subfolder="text_encoder"))
    cfg, _, prefix = text_encoder_plan(files)
    if cfg.n_layers != encoder.cfg.n_layers or cfg.hidden != encoder.cfg.hidden:
        raise ZImageError(f"{files.path} is not the file this text encoder was loaded from (its layers differ).")
    plan = layer_plan(files, prefix, cfg.n_layers, "last.")
    plan["norm.weight"] = Source([prefix + "norm.weight"])
    if prefix + "norm.weight" not in files:
        raise ZImageError(
            f"{files.path} has no final norm ({prefix}norm.weight): it holds only the encoder part of Qwen3. The prompt "
            "enhancer needs the complete model, e.g. qwen_3_4b.safetensors from Comfy-Org/z_image_turbo."
        )
    head_keys = [k for k in (prefix.removesuffix("model.") + "lm_head.weight", prefix + "lm_head.weight") if k in files]
    if head_keys:
        plan["lm_head.weight"] = Source(head_keys[:1], [scale_key(files, head_keys[0])])
    stored = getattr(encoder.layers[0].mlp.down_proj.weight, "dtype", None) if len(encoder.layers) else None  # Packed: none
    with torch.device("meta"):
        tail = nn.ModuleDict({"last": QwenLayer(cfg), "norm": RMSNorm(cfg.hidden, cfg.eps)})
        if head_keys:
            tail["lm_head"] = Linear(cfg.hidden, cfg.vocab, bias=False)
    wanted = {k[: -len(".weight")] for src in plan.values() for k in src.keys}
    fill_module(tail, files, plan, compute_dtype=encoder.compute_dtype, device=encoder.embed_tokens.weight.device,
                storage_dtype=stored if stored in FP8_DTYPES else None, formats=layer_formats(files, wanted),
                what="Qwen3 language model")
    tail["last"].self_attn.backend = encoder.layers[0].self_attn.backend if len(encoder.layers) else "sdpa"
    return Qwen3Chat(encoder, tail["last"], tail["norm"], tail["lm_head"] if head_keys else None).eval()


# ---- generation -----------------------------------------------------------------------------------


def chat_text(prompt: str, system: str | None = SYSTEM_PROMPT, thinking: bool = False) -> str:
    """Qwen3's chat template for one turn (``enable_thinking=False`` adds the empty think block)."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n")


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """fp32 logits → probabilities after temperature, top-k and top-p, as transformers' logits warpers."""
    x = logits.float() / temperature
    if 0 < top_k < x.shape[-1]:
        x = x.masked_fill(x < torch.topk(x, top_k)[0][..., -1:], -float("inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(x, descending=False)
        drop = srt.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1:] = False
        x = x.masked_fill(drop.scatter(-1, idx, drop), -float("inf"))
    return x.softmax(-1)


@torch.inference_mode()
def generate(chat: Qwen3Chat, ids: list[int], *, max_tokens: int = 512, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop: tuple[int, ...] = STOP_IDS,
             callback: Callable[[list[int]], None] | None = None, cancel: Callable[[], bool] | None = None) -> list[int]:
    """New token ids after ``ids`` (the stop token included when reached). ``temperature`` 0 = greedy."""
    gen = torch.Generator().manual_seed(int(seed))
    cache = chat.new_cache(1, len(ids) + max_tokens)
    rope = chat.encoder.rope(len(ids) + max_tokens, chat.device)
    out: list[int] = []
    step = torch.tensor([ids], dtype=torch.long)
    for _ in range(max_tokens):
        logits = chat(step, cache, rope, cancel)[0]
        if temperature > 0:
            tok = int(torch.multinomial(warp(logits, temperature, top_k, top_p).cpu(), 1, generator=gen))
        else:
            tok = int(logits.argmax())
        out.append(tok)
        if callback is not None:
            callback(out)
        if tok in stop:
            break
        step = torch.tensor([[tok]], dtype=torch.long)
    return out


def clean(text: str) -> str:
    """The caption alone: no think block, no surrounding quotes or whitespace."""
    text = re.sub(r"^\s*<think>.*?(</think>|$)", "", text, flags=re.S).strip()
    return text[1:-1].strip() if len(text) > 1 and text[0] in "\"“" and text[-1] in "\"”" else text


def enhance(chat: Qwen3Chat, prompt: str, *, system: str | None = SYSTEM_PROMPT, max_tokens: int = 400,
            temperature: float = 0.0, top_k: int = 20, top_p: float = 0.8, seed: int = 0,
            callback: Callable[[int, int, str], None] | None = None, cancel: Callable[[], bool] | None = None) -> str:
    """A detailed Z-Image caption for ``prompt``; ``callback(tokens, max_tokens, text so far)`` streams progress."""
    if not prompt.strip():
        return prompt
    tok = chat.tokenizer.tok
    ids = chat.tokenizer.ids(chat_text(prompt, system))
    on_token = None if callback is None else (lambda out: callback(len(out), max_tokens, tok.decode(out, skip_special_tokens=True)))
    out = generate(chat, ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   callback=on_token, cancel=cancel)
    text = clean(tok.decode(out, skip_special_tokens=True))
    return text or prompt
