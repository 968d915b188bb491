"""CUDA graphs of the transformer forward (zimage_core/cuda_graphs.py): replays equal the eager forward on new inputs,
a change of weights or patches recaptures, and anything a graph cannot serve runs eagerly. The graph tests need an
NVIDIA GPU; the fingerprint and the CPU fallbacks run everywhere."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import gpu_test_transformer, rel_err

from zimage_core import qk_norm_rope
from zimage_core.blocks import BlockRun
from zimage_core.cuda_graphs import Fingerprint
from zimage_core.layers import Linear
from zimage_core.offload import offload
from zimage_core.transformer import ZImageConfig, ZImageTransformer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA graphs)")
SMALL = dict(dim=256, n_layers=2, n_noise_refiner=1, n_context_refiner=1, ffn_hidden=512, cap_feat_dim=64)


def inputs(seed: int, device, lengths=(20,), size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), 16, size, size, generator=g).to(device, torch.bfloat16)
    t = torch.rand(len(lengths), generator=g).to(device)
    return x, t, [torch.randn(n, 64, generator=g).to(device, torch.bfloat16) for n in lengths]


def tiny_cpu() -> ZImageTransformer:
    model = ZImageTransformer(ZImageConfig(dim=64, n_layers=1, n_noise_refiner=1, n_context_refiner=1, head_dim=32,
                                           ffn_hidden=128, cap_feat_dim=64, axes_dims=(8, 12, 12)), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def test_fingerprint_follows_what_a_graph_bakes_in():
    """A graph reads weights by address, and patch factors and flags as captured: each of those changes the
    fingerprint (one built walk, as a model keeps it), a change of weight *values* in place does not (the graph reads
    them where they are)."""
    from zimage_core.packed import Dense, Packed

    model = tiny_cpu()
    fp = Fingerprint(model)
    lin = model.layers[0].feed_forward.w2
    seen = [fp()]

    def changed(why):
        now = fp()
        assert now != seen[-1], why
        assert now == Fingerprint(model)(), "the kept walk sees what a fresh one sees"
        seen.append(now)

    assert fp() == seen[0]
    with torch.no_grad():
        lin.weight.mul_(2)
    assert fp() == seen[0], "in-place values are read at replay; no recapture needed"
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
    changed("a replaced weight (ComfyUI's set_attr_param)")
    lin.weight.data = lin.weight.data.clone()
    changed("new .data under the same Parameter")
    lin.weight.data = lin.weight.data.view(torch.int32)
    changed("the same storage read as another dtype")
    lin.weight.data = lin.weight.data.view(torch.float32)
    seen.append(fp())
    model.cap_pad_token.data = model.cap_pad_token.data.clone()
    changed("a Parameter outside any Linear")
    down, up = torch.randn(4, lin.in_features), torch.randn(lin.out_features, 4)
    lin.patches.append((down, up, 0.5))
    changed("a run-time patch")
    lin.patches[0] = (down, up, 0.75)
    changed("a patch factor is a Python number baked into the graph")
    model.set_attention_backend("flash")
    changed("the attention backend")
    lin.weight = Packed(Dense(), tuple(lin.weight.shape), {"w": lin.weight.data.reshape(-1).clone()})
    changed("a weight now held packed (the module's attributes changed)")
    lin.weight = lin.weight.map(torch.clone)
    changed("a packed weight moved")
    model.layers[0].feed_forward.w1 = Linear(lin.out_features, lin.in_features)
    changed("a submodule replaced (ComfyUI's object patches)")
    qk_norm_rope.ENABLED = not qk_norm_rope.ENABLED
    try:
        changed("the fused q/k kernel switch")
    finally:
        qk_norm_rope.ENABLED = not qk_norm_rope.ENABLED


def test_off_the_gpu_the_forward_is_the_eager_one():
    """On the CPU (and with blocks streamed) nothing is captured: the output is the eager forward's, bit for bit."""
    model = tiny_cpu()
    model.use_cuda_graphs()
    g = torch.Generator().manual_seed(0)
    x, t, caps = torch.randn(1, 16, 16, 16, generator=g), torch.tensor([0.3]), [torch.randn(7, 64, generator=g)]
    with torch.inference_mode():
        outs = [model(x, t, caps) for _ in range(3)]
        ref = model.forward_eager(x, t, caps)
    assert all(torch.equal(o, ref) for o in outs)
    assert model.cuda_graphs.captures == 0 and not model.cuda_graphs.graphs
    st = offload(model, mode="min_vram", device="cpu")
    assert not st.static and model.executor is st
    st.detach()
    assert model.executor.static


def test_cuda_graphs_refuse_a_cpu_device_in_the_cli(tmp_path, capsys):
    """Asked for on a CPU, the CLI says why before loading anything (exit 2, no traceback)."""
    from zimage_core.cli import main

    assert main(["generate", "--prompt", "x", "--hf", str(tmp_path), "--device", "cpu", "--cuda-graphs",
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "--cuda-graphs needs an NVIDIA GPU (--device cuda), not cpu" in capsys.readouterr().err


@cuda
def test_replays_equal_the_eager_forward_on_new_inputs():
    """First call eager, second captures, later ones replay: every output equals the eager forward of its own
    inputs bit for bit (same kernels, same order), and outputs are copies (a CFG pair can keep the first)."""
    model = gpu_test_transformer(**SMALL).cuda()
    model.use_cuda_graphs()
    g = model.cuda_graphs
    with torch.inference_mode():
        outs = []
        for seed in range(4):
            x, t, caps = inputs(seed, "cuda")
            outs.append((model(x, t, caps), model.forward_eager(x, t, caps)))
        for got, ref in outs:
            assert torch.equal(got, ref), rel_err(got.float(), ref.float())
    assert (g.captures, g.replays) == (1, 3)
    assert len({o.data_ptr() for o, _ in outs}) == 4


@cuda
def test_a_cfg_pair_of_layouts_and_a_python_time():
    """Two caption lengths (a CFG pair called one after the other) keep two graphs; a Python float time, a batch
    of two with unequal captions (the padding mask) and plain ``no_grad`` all replay correctly."""
    model = gpu_test_transformer(**SMALL).cuda()
    model.use_cuda_graphs()
    with torch.no_grad():
        for step in range(3):
            for lengths in ((20,), (45,), (20, 45)):
                x, _, caps = inputs(10 * step + len(lengths), "cuda", lengths)
                t = 0.25 + 0.2 * step
                got, ref = model(x, t, caps), model.forward_eager(x, t, caps)
                assert torch.equal(got, ref), (step, lengths, rel_err(got.float(), ref.float()))
    assert model.cuda_graphs.captures == 3 and len(model.cuda_graphs.graphs) == 3


@cuda
def test_new_weights_and_patches_recapture():
    """Replaced weights (ComfyUI patching a LoRA into the device copy) and added run-time patches change what the
    forward reads: the next call recaptures and matches eager; values changed in place need no recapture."""
    model = gpu_test_transformer(**SMALL).cuda()
    model.use_cuda_graphs()
    g = model.cuda_graphs
    lin = model.layers[0].feed_forward.w2
    x, t, caps = inputs(0, "cuda")

    def check():
        got, ref = model(x, t, caps), model.forward_eager(x, t, caps)
        assert torch.equal(got, ref), rel_err(got.float(), ref.float())
        return got

    with torch.inference_mode():
        model(x, t, caps)
        first = check()
        with torch.no_grad():
            lin.weight.mul_(1.5)
        assert not torch.equal(check(), first)
        assert g.captures == 1
        lin.weight = torch.nn.Parameter(lin.weight.detach().clone() * 0.5, requires_grad=False)
        check()
        assert g.captures == 2
        gen = torch.Generator().manual_seed(1)
        lin.patches.append((torch.randn(4, lin.in_features, generator=gen).cuda().bfloat16(),
                            torch.randn(lin.out_features, 4, generator=gen).cuda().bfloat16() * 0.1, 0.8))
        check()
        assert g.captures == 3
        assert len(g.graphs) == 1


@cuda
def test_hooks_streaming_and_interrupts_run_eagerly():
    """Per-block hooks and streamed blocks are outside a graph's reach: those calls run eagerly; the interrupt is
    still honoured (checked once before a replay)."""
    from zimage_core.errors import ZImageInterrupted

    model = gpu_test_transformer(**SMALL).cuda()
    model.use_cuda_graphs()
    g = model.cuda_graphs
    x, t, caps = inputs(0, "cuda")
    seen = []
    hooked = BlockRun(after=[lambda call, h: seen.append(call.stage) or h])
    with torch.inference_mode():
        for _ in range(3):
            model(x, t, caps, run=hooked)
        assert g.captures == 0 and len(seen) == 3 * 4
        model(x, t, caps)
        model(x, t, caps)
        assert g.captures == 1
        with pytest.raises(ZImageInterrupted):
            model(x, t, caps, run=BlockRun(cancel=lambda: True))
        model(x, t, caps, run=BlockRun(cuda_graphs=False))  # a call may opt out (ComfyUI: a MODEL without the option)
        assert g.replays == 1
        model.use_cuda_graphs(False)  # drops the graph
        for _ in range(2):
            model(x, t, caps, run=BlockRun(cuda_graphs=True))  # or opt in on a model whose default is off
        assert (g.captures, g.replays) == (2, 2)
        model.use_cuda_graphs()
        st = offload(model, mode="min_vram", device="cuda", width=256, height=256)
        try:
            got = model(x, t, caps)
            assert not g.graphs, "streamed: graphs dropped, their memory released"
        finally:
            st.detach()
        model.cuda()
        assert torch.equal(got, model.forward_eager(x, t, caps))


@cuda
def test_compiled_blocks_replay_as_graphs():
    """The loader's compile and cuda_graphs together: the graph captures the compiled blocks' kernels, and replays
    equal the compiled eager forward of the same inputs."""
    from zimage_core.compiling import compile_problem

    if compile_problem("cuda"):
        pytest.skip(compile_problem("cuda"))
    model = gpu_test_transformer(**SMALL).cuda()
    model.compile_blocks(dynamic=False)
    model.use_cuda_graphs()
    with torch.inference_mode():
        for seed in range(3):
            x, t, caps = inputs(seed, "cuda")
            got, ref = model(x, t, caps), model.forward_eager(x, t, caps)
            assert torch.equal(got, ref), rel_err(got.float(), ref.float())
    assert (model.cuda_graphs.captures, model.cuda_graphs.replays) == (1, 2)


@cuda
def test_a_capture_that_fails_falls_back_to_eager(caplog):
    """A run-time patch left in host memory needs a host copy inside the forward, which capture refuses: that
    layout runs eagerly from then on, with a warning, and gives the eager result. (Last in this file: it makes a
    capture fail on purpose.)"""
    model = gpu_test_transformer(**SMALL).cuda()
    model.use_cuda_graphs()
    lin = model.layers[0].feed_forward.w2
    gen = torch.Generator().manual_seed(1)
    lin.patches.append((torch.randn(4, lin.in_features, generator=gen).bfloat16(),
                        torch.randn(lin.out_features, 4, generator=gen).bfloat16() * 0.1, 0.8))
    x, t, caps = inputs(0, "cuda")
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        outs = [model(x, t, caps) for _ in range(3)]
        ref = model.forward_eager(x, t, caps)
    assert "runs without CUDA graphs" in caplog.text
    assert model.cuda_graphs.captures == 0
    assert all(torch.equal(o, ref) for o in outs)


@cuda
def test_a_capture_cuda_abandons_turns_graphs_off_and_leaves_the_allocator_sound(caplog):
    """A sync the warm-up cannot see (here only while capturing) makes CUDA abandon the capture: the model runs
    eagerly from then on (same results), the caller's stream is current again, the allocator still empties its cache
    (ComfyUI calls that after every prompt) and another model captures normally."""
    model = gpu_test_transformer(**SMALL).cuda()
    model.use_cuda_graphs()
    block = model.layers[0]
    plain = block.forward

    def syncing(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        return plain(*args, **kwargs)

    block.forward = syncing
    x, t, caps = inputs(0, "cuda")
    stream = torch.cuda.current_stream()
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        outs = [model(x, t, caps) for _ in range(3)]
        ref = model.forward_eager(x, t, caps)
    assert "CUDA graphs are off for this model" in caplog.text
    assert model.cuda_graphs.broken and model.cuda_graphs.captures == 0
    assert all(torch.equal(o, ref) for o in outs)
    assert torch.cuda.current_stream() == stream
    torch.cuda.empty_cache()
    other = gpu_test_transformer(**SMALL).cuda()
    other.use_cuda_graphs()
    with torch.inference_mode():
        for seed in range(3):
            x, t, caps = inputs(seed, "cuda")
            assert torch.equal(other(x, t, caps), other.forward_eager(x, t, caps))
    assert other.cuda_graphs.captures == 1
