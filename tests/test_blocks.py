"""The one way blocks run (blocks.py): per-call wraps and after-hooks, inside the executor's weight placement."""

import pytest
import torch
from tiny import diffusers_transformer, save_comfyui

import zimage_core as zc
from zimage_core.blocks import BlockRun
from zimage_core.offload import BlockStreamer, plan_offload


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_comfyui(diffusers_transformer(seed=2), str(tmp_path_factory.mktemp("blk") / "z.safetensors"))


def inputs():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 8, 8, generator=g), torch.randn(16, 6, 10, generator=g)]
    return x, torch.tensor([0.3, 0.8]), [torch.randn(9, 32, generator=g), torch.randn(40, 32, generator=g)]


def last_layer_capture(model, out, calls):
    """A hook that keeps the last layer's output; the target's span of it must give the model's output exactly."""
    def hook(call, x):
        calls.append((call.stage, call.index))
        if call.stage == "layers" and call.index == len(model.layers) - 1:
            out.update(x=x, temb=call.temb, spans=call.spans)
        return x
    return hook


def test_hooks_run_in_order_inside_the_streamed_placement_and_spans_locate_the_image(path):
    model = zc.load_transformer(path, dtype=torch.float32)
    x, t, caps = inputs()
    with torch.inference_mode():
        ref = model(x, t, caps)
    st = BlockStreamer(model, plan_offload(model, mode="min_vram", device="cpu")).attach()
    placed, calls, last = [], [], {}

    def wrap(call, h, inner):  # as ComfyUI's patches_replace: the original block is called from inside
        w = call.block.feed_forward.w1.weight
        i = model.blocks().index(call.block)
        placed.append(all(w.data_ptr() != v.data_ptr() for v in st.host.get(i, [])))
        return inner(h)

    with torch.inference_mode():
        out = model(x, t, caps, run=BlockRun(wraps=[wrap], after=[last_layer_capture(model, last, calls)]))
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert placed and all(placed)  # wraps see the block's weights where compute runs
    cfg = model.cfg
    assert calls == ([("noise_refiner", i) for i in range(cfg.n_noise_refiner)] + [("context_refiner", i) for i in range(cfg.n_context_refiner)]
                     + [("layers", i) for i in range(cfg.n_layers)])
    with torch.inference_mode():
        u = model.final_layer(last["x"], last["temb"])
    for i, (xi, o) in enumerate(zip(x, out)):
        span = last["spans"][i]
        assert span["image"].stop - span["image"].start == xi.shape[1] * xi.shape[2] // 4
        assert span["caption"].stop - span["caption"].start == 32 * -(-len(caps[i]) // 32)
        assert torch.equal(model.unpatchify(u[i, span["image"]], *xi.shape[1:]), o)
    st.detach()


def test_wraps_nest_and_after_hooks_change_the_output(path):
    model = zc.load_transformer(path, dtype=torch.float32)
    x, t, caps = inputs()
    order = []

    def tag(name):
        def wrap(_call, h, inner):
            order.append(name)
            return inner(h)
        return wrap

    def hint(call, h):  # a ControlNet-like hint on the image tokens after the first main layer
        if call.stage == "layers" and call.index == 0:
            h = h.clone()
            for i, s in enumerate(call.spans):
                h[i, s["image"]] += 0.5
        return h

    def skip(call, h, inner):  # a replacement that never calls the original block
        return h if call.stage == "layers" else inner(h)

    with torch.inference_mode():
        ref = model(x, t, caps)
        nested = model(x, t, caps, run=BlockRun(wraps=[tag("outer"), tag("inner")]))
        hinted = model(x, t, caps, run=BlockRun(after=[hint]))
        skipped = model(x, t, caps, run=BlockRun(wraps=[skip]))
    assert order[:2] == ["outer", "inner"] and len(order) == 2 * len(model.blocks())
    assert all(torch.equal(a, b) for a, b in zip(nested, ref))
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(hinted, ref))
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(skipped, ref))


def test_omni_is_an_explicit_path_with_the_same_hooks(path):
    model = zc.load_transformer(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x = [[torch.randn(16, 6, 8, generator=g), torch.randn(16, 8, 8, generator=g)]]
    caps = [[torch.randn(n, 32, generator=g) for n in (5, 9, 3)]]
    with pytest.raises(ValueError, match="forward_omni"):
        model(x, torch.tensor([0.4]), caps)
    last, calls = {}, []
    with torch.inference_mode():
        out = model.forward_omni(x, torch.tensor([0.4]), caps, run=BlockRun(after=[last_layer_capture(model, last, calls)]))
        u = model.final_layer(last["x"], last["temb"])
    span = last["spans"][0]
    assert torch.equal(model.unpatchify(u[0, span["image"]], 8, 8), out[0])
    assert span["caption"] == slice(0, 32 * 3)  # captions first in the Omni sequence, each segment padded to 32
    assert span["image"].start == 96 + 32  # after the captions and the 12-token reference (padded to 32)
