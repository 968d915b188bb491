"""Our Qwen3 prompt encoder as a standard ComfyUI CLIP.

ComfyUI's ``comfy.sd.CLIP`` tokenizes with the native Z-Image tokenizer (``comfy/text_encoders/z_image.py``:
chat template, Qwen tokenizer) and hands the token ids to its ``cond_stage_model``; ours runs them through our
encoder (the N−1 layers Z-Image reads) and answers as native ``Qwen3_4BModel`` does: features after the
second-to-last layer, no pooled output, an attention mask. So CLIPTextEncode, TextEncodeZImageOmni and prompt
scheduling nodes work with our encoder, its speed and its block streaming.
"""

from __future__ import annotations

import comfy.sd
import comfy.text_encoders.z_image
import torch
from torch import nn

from .memory import ZImagePatcher


class ZImageCLIPModel(nn.Module):
    """What ``comfy.sd.CLIP`` calls on its ``cond_stage_model``, answered by our encoder."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    @property
    def streamed(self) -> nn.Module:  # what our patcher streams
        return self.encoder

    @property
    def dtypes(self) -> set:
        return {self.encoder.compute_dtype}

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):  # layer choice and execution device: Z-Image reads one layer, we place it
        pass

    @torch.inference_mode()
    def encode_token_weights(self, token_weight_pairs):
        chunks = token_weight_pairs["qwen3_4b"] if isinstance(token_weight_pairs, dict) else token_weight_pairs
        ids = torch.tensor([[t[0] for t in chunk] for chunk in chunks], dtype=torch.long)
        h = self.encoder(ids).float().cpu()
        cond = h.reshape(1, -1, h.shape[-1])  # chunks one after another, as ComfyUI concatenates them
        return cond, None, {"attention_mask": torch.ones(cond.shape[:2], dtype=torch.long)}


def make_clip(patcher: ZImagePatcher) -> comfy.sd.CLIP:
    """A CLIP over the text encoder that ``patcher`` (ours, shared with the text-encoder socket) manages."""
    clip = comfy.sd.CLIP(no_init=True)
    clip.cond_stage_model = patcher.model
    clip.patcher = patcher
    clip.tokenizer = comfy.text_encoders.z_image.ZImageTokenizer()
    clip.layer_idx, clip.use_clip_schedule, clip.apply_hooks_to_conds, clip.tokenizer_options = None, False, None, {}
    patcher.is_clip = True
    return clip
