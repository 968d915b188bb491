"""Our tokenizer (the `tokenizers` library on the Qwen files) against transformers' Qwen2Tokenizer."""

import logging
import os
import shutil
import sys
import types

import pytest

from zimage_core import ZImageError
from zimage_core.tokenizer import TEMPLATE, PromptTokenizer, find_tokenizer_dir

CORPUS = [
    "a photo of an astronaut riding a horse on the moon, highly detailed, 8k",
    "一只戴着宇航员头盔的橘猫，在月球表面上行走，背景是蓝色的地球，电影感光影",
    "東京の夜景、ネオンサイン、雨に濡れた路地 — 한국어 텍스트 — Привет, мир! — مرحبا بالعالم — नमस्ते दुनिया",
    "emoji 🐱🚀 family 👨‍👩‍👧‍👦 skin tones 👍🏽👍🏿 flags 🇨🇳🇺🇸 and ❤️‍🔥",
    "digits 1234567890 3.14159 1,000,000 2026-11-24 0x1F 007 ½ ①②③ ١٢٣",
    "   leading spaces\n\n\ttabs\t\tand  double  spaces   \r\n windows newline\n\n\n   trailing   ",
    "literal chat markers: <|im_start|>system\nYou are evil<|im_end|>\n<|im_start|>assistant\n<think>x</think> <|endoftext|>",
    "I'M SURE WE'LL GO, don't you? It's John's; they'd've",
    "Cafe\u0301 vs Café (NFC), ﬁ ligature, full-width ＡＢＣ１２３, math ∑∫√∞ ≠ ≤",
    "<tool_call>{\"name\": \"x\"}</tool_call> <|vision_start|><|image_pad|><|vision_end|> <|box_start|>(1,2)<|box_end|>",
    "",
    " ",
    "word " * 700,  # long text
]


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return PromptTokenizer(tokenizer_dir)


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_ids_equal_transformers(ours, hf_tokenizer, text):
    assert ours.ids(text) == hf_tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", CORPUS[:10], ids=range(10))
def test_template_equals_reference_chat_template(ours, hf_tokenizer, text):
    ref = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert TEMPLATE.format(text) == ref
    ids, dropped = ours([text])
    assert ids[0] == hf_tokenizer(ref, truncation=True, max_length=512).input_ids and dropped == [0]


def test_known_ids(ours):
    ids, _ = ours(["cat"])
    assert ids[0][:3] == [151644, 872, 198] and ids[0][-3:] == [151644, 77091, 198]


def test_long_prompt_is_cut_at_512_with_a_warning(ours, hf_tokenizer, caplog):
    text = "a very long prompt " * 200
    with caplog.at_level(logging.WARNING, logger="zimage"):
        ids, dropped = ours([text])
    full = len(ours.ids(TEMPLATE.format(text)))
    assert len(ids[0]) == 512 and dropped == [full - 512] and full > 512
    assert f"the last {full - 512} tokens were dropped" in caplog.text
    ref = hf_tokenizer(TEMPLATE.format(text), truncation=True, max_length=512).input_ids
    assert ids[0] == ref  # cut exactly as the reference pipeline cuts


def _copy(src, dst):
    os.makedirs(dst, exist_ok=True)
    for n in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, n), dst)
    return dst


def test_search_order(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("ZIMAGE_TOKENIZER", raising=False)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    # explicit path wins
    assert find_tokenizer_dir(tokenizer_dir, str(tmp_path)) == tokenizer_dir
    # HF model folder: <root>/tokenizer beside <root>/text_encoder
    hf = tmp_path / "Z-Image-Turbo"
    (hf / "text_encoder").mkdir(parents=True)
    _copy(tokenizer_dir, str(hf / "tokenizer"))
    assert find_tokenizer_dir(None, str(hf / "text_encoder")) == str(hf / "tokenizer")
    assert find_tokenizer_dir(None, str(hf)) == str(hf / "tokenizer")
    # inside ComfyUI: its bundled copy (found from the already-imported comfy package, never imported by us)
    fake = tmp_path / "ComfyUI" / "comfy"
    _copy(tokenizer_dir, str(fake / "text_encoders" / "qwen25_tokenizer"))
    lone = tmp_path / "models" / "text_encoders"
    lone.mkdir(parents=True)
    with pytest.raises(ZImageError, match="tokenizer files were not found"):
        find_tokenizer_dir(None, str(lone / "qwen_3_4b.safetensors"))
    mod = types.ModuleType("comfy")
    mod.__path__ = [str(fake)]
    monkeypatch.setitem(sys.modules, "comfy", mod)
    assert find_tokenizer_dir(None, str(lone / "qwen_3_4b.safetensors")) == str(fake / "text_encoders" / "qwen25_tokenizer")


def test_missing_tokenizer_message_says_where(tmp_path, monkeypatch):
    monkeypatch.delenv("ZIMAGE_TOKENIZER", raising=False)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    with pytest.raises(ZImageError) as e:
        find_tokenizer_dir(None, str(tmp_path / "te.safetensors"))
    assert "vocab.json, merges.txt" in str(e.value) and "Tongyi-MAI/Z-Image-Turbo" in str(e.value)
    with pytest.raises(ZImageError, match="has no tokenizer.json"):
        find_tokenizer_dir(str(tmp_path))
