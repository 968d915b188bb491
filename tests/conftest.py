import os

import pytest

SHARED = os.environ.get("ZIMAGE_SHARED_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


@pytest.fixture(scope="session")
def tokenizer_dir():
    d = os.path.join(SHARED, "qwen_tokenizer")
    if not os.path.isfile(os.path.join(d, "vocab.json")):
        pytest.skip(f"Qwen tokenizer files not found at {d} (set ZIMAGE_SHARED_DIR to the folder holding qwen_tokenizer/)")
    return os.path.abspath(d)


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)
