import pytest


@pytest.fixture(scope="session")
def tokenizer_dir():
    """The Qwen tokenizer files that ship inside the package."""
    from zimage_core.tokenizer import BUNDLED

    return BUNDLED


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tokenizer_dir, tmp_path_factory):
    """The package's tokenizer as transformers reads it (vocab.json + merges.txt + tokenizer_config.json): the
    vocabulary derived from the merges, which test_tokenizer checks against the published vocab.json."""
    import json
    import shutil

    from zimage_core.tokenizer import byte_level_vocab, read_merges

    folder = tmp_path_factory.mktemp("hf_tokenizer")
    merges = read_merges(tokenizer_dir)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(merges), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    shutil.copy(f"{tokenizer_dir}/tokenizer_config.json", folder)
    return str(folder)


@pytest.fixture(scope="session")
def hf_tokenizer(hf_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_tokenizer_dir)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server for the session (integration and browser tests), with tiny weights."""
    from comfy_harness import ComfyServer, comfyui_commit, comfyui_path, comfyui_python, populate

    path = comfyui_path()
    if path is None:
        pytest.skip("no ComfyUI found (set COMFYUI_PATH or put one in ~/ComfyUI)")
    base = str(tmp_path_factory.mktemp("comfy_base"))
    populate(base)
    srv = ComfyServer(path, comfyui_python(path), base)
    print(f"ComfyUI {comfyui_commit(path)} on {srv.url}")
    yield srv
    srv.stop()
