import pytest


@pytest.fixture(scope="session")
def tokenizer_dir():
    """The Qwen tokenizer files that ship inside the package."""
    from zimage_core.tokenizer import BUNDLED

    return BUNDLED


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


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
