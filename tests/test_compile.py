"""torch.compile readiness: a block and the whole forward trace with no graph break at a fixed shape, and give the
eager result compiled (a block through CPU inductor; the whole forward through the eager backend, which checks
the one-graph trace in seconds where inductor would spend minutes generating C++ on a CI core)."""

import pytest
import torch
from tiny import diffusers_transformer, rel_err, save_comfyui

import zimage_core as zc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m = zc.load_transformer(save_comfyui(diffusers_transformer(seed=4), str(tmp_path_factory.mktemp("c") / "z.safetensors")),
                            dtype=torch.float32)
    torch._dynamo.reset()
    return m


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.4]), [torch.randn(7, 32, generator=g)]


def test_block_compiles_in_one_graph(model):
    x, t, caps = inputs()
    captured = {}

    def keep(call, h):
        if call.stage == "layers" and call.index == 0:
            captured.update(x=call.x, rope=call.rope, mask=call.mask, temb=call.temb)
        return h

    with torch.inference_mode():
        model(x, t, caps, run=zc.BlockRun(after=[keep]))
        blk = model.layers[0]
        args = (captured["x"], captured["rope"], captured["mask"], captured["temb"])
        explained = torch._dynamo.explain(blk)(*args)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(blk, fullgraph=True)
        assert rel_err(compiled(*args), blk(*args)) < 1e-5


def test_whole_forward_compiles_in_one_graph_at_a_fixed_shape(model):
    x, t, caps = inputs()
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(x, t, caps)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert rel_err(compiled(x, t, caps), model(x, t, caps)) < 1e-6


def test_compile_blocks_keeps_names_and_results(model, tmp_path):
    x, t, caps = inputs()
    other = zc.load_transformer(save_comfyui(diffusers_transformer(seed=4), str(tmp_path / "z.safetensors")), dtype=torch.float32)
    other.compile_blocks(backend="eager")
    assert other.state_dict().keys() == model.state_dict().keys()
    with torch.inference_mode():
        assert rel_err(other(x, t, caps), model(x, t, caps)) < 1e-6


def test_missing_compilers_are_named_before_loading(monkeypatch, tmp_path):
    """No Triton for a GPU or no C++ compiler for the CPU: a clear error before any weight is read, not inductor's
    traceback at the first step (the loader node and the CLI's --compile ask first)."""
    import torch._inductor.cpp_builder as cpp
    import torch.utils._triton as triton_probe

    from zimage_core.compiling import compile_problem, require_compile

    def no_compiler():
        raise RuntimeError("no working C++ compiler found in ('g++',)")

    monkeypatch.setattr(cpp, "get_cpp_compiler", no_compiler)
    monkeypatch.setattr(triton_probe, "has_triton", lambda: False)
    assert "C++ compiler" in compile_problem("cpu") and "CXX" in compile_problem("cpu")
    with pytest.raises(zc.ZImageError, match=r"cannot compile z\.safetensors: torch\.compile needs Triton.*triton-windows.*"
                                             r"Turn compile off"):
        require_compile("cuda", "z.safetensors")
    assert "does not generate code for mps" in compile_problem("mps")
    monkeypatch.setattr(cpp, "get_cpp_compiler", lambda: "g++")
    monkeypatch.setattr(triton_probe, "has_triton", lambda: True)
    assert compile_problem("cpu") is None and compile_problem("cuda") is None
    from zimage_core import cli

    monkeypatch.setattr(triton_probe, "has_triton", lambda: False)
    with pytest.raises(zc.ZImageError, match="cannot compile the transformer"):
        cli.generate(cli._parser().parse_args(["generate", "--prompt", "x", "--models", str(tmp_path), "--device", "cuda",
                                               "--compile"]))
