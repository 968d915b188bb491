"""Our tokenizer (the `tokenizers` library on the Qwen files) against transformers' Qwen2Tokenizer."""

import glob
import json
import logging
import os
import shutil

import pytest

from zimage_core import ZImageError
from zimage_core.tokenizer import BUNDLED, TEMPLATE, PromptTokenizer, find_tokenizer_dir

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


def test_search_order(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("ZIMAGE_TOKENIZER", raising=False)
    # explicit path wins
    assert find_tokenizer_dir(tokenizer_dir, str(tmp_path)) == tokenizer_dir
    # HF model folder: <root>/tokenizer beside <root>/text_encoder
    hf = tmp_path / "Z-Image-Turbo"
    (hf / "text_encoder").mkdir(parents=True)
    shutil.copytree(tokenizer_dir, hf / "tokenizer")
    assert find_tokenizer_dir(None, str(hf / "text_encoder")) == str(hf / "tokenizer")
    assert find_tokenizer_dir(None, str(hf)) == str(hf / "tokenizer")
    # a lone split file (ComfyUI's text_encoders/qwen_3_4b.safetensors): the environment, then the package's copy
    lone = tmp_path / "models" / "text_encoders"
    lone.mkdir(parents=True)
    assert find_tokenizer_dir(None, str(lone / "qwen_3_4b.safetensors")) == BUNDLED
    monkeypatch.setenv("ZIMAGE_TOKENIZER", str(hf / "tokenizer"))
    assert find_tokenizer_dir(None, str(lone / "qwen_3_4b.safetensors")) == str(hf / "tokenizer")
    monkeypatch.setenv("ZIMAGE_TOKENIZER", str(tmp_path))
    with pytest.raises(ZImageError, match="ZIMAGE_TOKENIZER=.*fix or unset it"):
        find_tokenizer_dir(None, str(lone / "qwen_3_4b.safetensors"))
    with pytest.raises(ZImageError, match="has no tokenizer.json"):
        find_tokenizer_dir(str(tmp_path))


def test_bundled_merges_give_the_published_vocabulary():
    """The package ships the merges alone; the vocabulary derived from them is Qwen's published vocab.json, token for
    token (Qwen/Qwen3-4B tokenizer/, in ../shared/qwen_tokenizer)."""
    from zimage_core.tokenizer import byte_level_vocab, read_merges

    published = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "qwen_tokenizer")
    if not os.path.isfile(os.path.join(published, "vocab.json")):
        pytest.skip(f"the published Qwen tokenizer is not at {published}")
    merges = read_merges(BUNDLED)
    with open(os.path.join(published, "vocab.json"), encoding="utf-8") as f:
        assert byte_level_vocab(merges) == json.load(f)
    assert merges == read_merges(published)


def test_bundled_files_are_package_data():
    """An installed (non-editable) package carries the vocabulary: pyproject lists it as package data."""
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["zimage_core"]
    assert os.path.dirname(BUNDLED) == os.path.join(root, "zimage_core")
    names = {os.path.basename(p) for pat in data for p in glob.glob(os.path.join(root, "zimage_core", pat))}
    assert {"merges.txt.xz", "tokenizer_config.json"} <= names


def test_padded_tokenizer_json_encodes_like_diffusers(hf_tokenizer_dir, tmp_path):
    """save_pretrained after a padded call writes padding/truncation into tokenizer.json (fine-tuned diffusers
    folders have it); diffusers' encode_prompt pads to 512 and keeps the attended tokens, and so must we."""
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    hf_tokenizer._tokenizer.enable_padding(length=512, pad_id=151643, pad_token="<|endoftext|>")
    hf_tokenizer._tokenizer.enable_truncation(max_length=300)
    folder = tmp_path / "tokenizer"
    hf_tokenizer.save_pretrained(str(folder))
    saved = json.load(open(folder / "tokenizer.json"))
    assert saved["padding"] is not None and saved["truncation"] is not None  # the trap is really in the file
    ours = PromptTokenizer(str(folder))
    for text in (CORPUS[0], CORPUS[3], "a very long prompt " * 200):
        prompt = TEMPLATE.format(text)
        # diffusers ZImagePipeline._encode_prompt: padding="max_length", max_length=512, truncation=True,
        # then prompt_embeds[i][prompt_masks[i]]
        ref = hf_tokenizer(prompt, padding="max_length", max_length=512, truncation=True)
        kept = [t for t, m in zip(ref.input_ids, ref.attention_mask) if m]
        assert ours([text])[0][0] == kept
