"""The chat templates Z-Image's prompts are wrapped in, for plain prompts and for Omni's caption segments.

Z-Image encodes ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`` (cut at 512 tokens). We
build that string ourselves: a tokenizer's own chat template may add a default system prompt (ComfyUI's
Qwen2.5-style config does), which would change every embedding. With reference images (Omni/Edit) the
prompt is split into segments around ``<|vision_start|>…<|vision_end|>`` markers, one per image, each
encoded on its own, as diffusers' ZImageOmniPipeline does.
"""

TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
TEMPLATE_HEAD = "<|im_start|>user\n<|vision_start|>"
TEMPLATE_BETWEEN = "<|vision_end|><|vision_start|>"
TEMPLATE_PROMPT = "<|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"
TEMPLATE_TAIL = "<|vision_end|><|im_end|>"


def reference_segments(n_images: int) -> list[str]:
    """The caption segments around ``n_images`` reference images that do not depend on the prompt: head, between…, tail."""
    return [TEMPLATE_HEAD] + [TEMPLATE_BETWEEN] * (n_images - 1) + [TEMPLATE_TAIL]


def assemble_segments(others: list, prompt_segment) -> list:
    """The reference's order: head, between…, the prompt's segment, tail (strings or their encodings alike)."""
    return [*others[:-1], prompt_segment, others[-1]]
