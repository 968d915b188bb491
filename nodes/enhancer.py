"""The prompt enhancer node: a short prompt → a detailed Z-Image caption, written by the loaded Qwen3-4B."""

from __future__ import annotations

import weakref

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

import zimage_core as zc
from zimage_core import enhancer

from .conditioning import ENCODE_ACTIVATIONS
from .memory import Handle, ZImagePatcher
from .routes import to_client
from .types import ZImageTextEncoder

_CHATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # encoder handle → (chat model, its patcher)


def chat_for(handle: Handle) -> tuple[enhancer.Qwen3Chat, ZImagePatcher]:
    """The causal LM over this encoder's modules (the last layer and head are read once, on first use)."""
    if handle not in _CHATS:
        chat = enhancer.load_chat(handle.module, handle.path)
        p = handle.patcher
        q = ZImagePatcher(chat, p.load_device, p.offload_device)
        q.set_offload(p.mode, p.budget_gb, p.prefetch)
        _CHATS[handle] = (chat, q)
    return _CHATS[handle]


def _show(text: str, node) -> None:
    to_client(lambda server: server.send_progress_text(text, node))


class ZImagePromptEnhancer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImagePromptEnhancer",
            display_name="Z-Image Prompt Enhancer",
            category="Z-Image",
            description="Rewrites a short prompt into the long, detailed caption Z-Image was trained on, with the Qwen3-4B "
                        "text encoder you already loaded (one more layer is read from the same file). Connect its output "
                        "to Z-Image Text Encode's prompt.",
            inputs=[
                ZImageTextEncoder.Input("text_encoder", tooltip="From Load Z-Image Text Encoder (the full qwen_3_4b file)."),
                io.String.Input("prompt", multiline=True, dynamic_prompts=True,
                                tooltip="Your idea in a few words, any language. Text in quotes is kept verbatim."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Another seed writes another caption (with temperature > 0). Same seed, same caption, on any device."),
                io.Float.Input("temperature", default=0.7, min=0.0, max=2.0, step=0.05,
                               tooltip="0: always the single most likely caption (greedy). 0.7 (Qwen3's recommendation): varied "
                                       "but sensible. Above 1: wilder."),
                io.Int.Input("max_tokens", default=400, min=16, max=1024,
                             tooltip="Longest caption in tokens. Z-Image reads at most 512 tokens, so more is cut when encoding."),
                io.Float.Input("top_p", default=0.8, min=0.05, max=1.0, step=0.05, optional=True, advanced=True,
                               tooltip="Sample only from the most likely words that together hold this probability."),
                io.Int.Input("top_k", default=20, min=0, max=200, optional=True, advanced=True,
                             tooltip="Sample only from this many most likely words (0 = no limit)."),
                io.String.Input("system_prompt", multiline=True, default=enhancer.SYSTEM_PROMPT, optional=True, advanced=True,
                                tooltip="The instructions the language model follows. Empty: none (plain chat)."),
            ],
            outputs=[io.String.Output(display_name="prompt", tooltip="The detailed caption, for Z-Image Text Encode.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, text_encoder, prompt, seed, temperature, max_tokens, top_p=0.8, top_k=20,
                system_prompt=enhancer.SYSTEM_PROMPT) -> io.NodeOutput:
        chat, patcher = chat_for(text_encoder)
        node = cls.hidden.unique_id if cls.hidden is not None else None
        pbar = comfy.utils.ProgressBar(max_tokens)

        def on_token(n: int, total: int, text: str):
            pbar.update_absolute(n, total)
            if n % 8 == 0:
                _show(text, node)

        text_encoder.patcher.unload()  # the same modules: the encoder's own placement must not hold them
        patcher.load_for(ENCODE_ACTIVATIONS)
        try:
            text = enhancer.enhance(chat, prompt, system=system_prompt or None, max_tokens=max_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seed=seed, callback=on_token, cancel=mm.processing_interrupted)
        except zc.ZImageInterrupted:
            mm.throw_exception_if_processing_interrupted()
            raise
        finally:
            patcher.unload()
        _show(text, node)
        return io.NodeOutput(text)
