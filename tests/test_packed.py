"""Packed weights (packed.py): expanded per call, streamed packed, counted packed, LoRA as run-time patches.

The format here is a plain row-wise int8 with a per-row scale, the simplest of the block formats that GGUF and
ComfyUI's quantised files use; the real formats have their own tests (test_gguf.py)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tiny import diffusers_transformer, rel_err, save_comfyui

import zimage_core as zc
from zimage_core.layers import Embedding, Linear
from zimage_core.lora import apply_lora_specs
from zimage_core.offload import BlockStreamer, Ledger, module_bytes, plan_offload
from zimage_core.packed import Packed, Stacked, stack_rows


@dataclass(frozen=True)
class RowInt8:
    name: str = "row_int8"
    rowwise: bool = True

    def dequantize(self, tensors, shape, dtype):
        return (tensors["q"].float() * tensors["scale"][:, None]).reshape(shape).to(dtype)


def pack(w: torch.Tensor) -> Packed:
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return Packed(RowInt8(), tuple(w.shape), {"q": (w / scale[:, None]).round().to(torch.int8), "scale": scale})


def pack_blocks(model) -> None:
    for b in model.blocks():
        for m in b.modules():
            if isinstance(m, Linear):
                m.weight = pack(m.weight.detach().float())


def test_linear_and_embedding_expand_on_call():
    g = torch.Generator().manual_seed(0)
    lin = Linear(48, 24, bias=True)
    lin.weight, lin.bias = torch.nn.Parameter(torch.randn(24, 48, generator=g)), torch.nn.Parameter(torch.randn(24, generator=g))
    p = pack(lin.weight.detach())
    lin.weight = p
    assert "weight" not in dict(lin.named_parameters()) and lin.patch_only and "row_int8" in repr(lin)
    x = torch.randn(3, 48, generator=g)
    assert torch.equal(lin(x), F.linear(x, p.dequantize(torch.float32), lin.bias))
    lin.weight = torch.nn.Parameter(p.dequantize(torch.float32))  # back to a plain parameter
    assert isinstance(lin.weight, torch.nn.Parameter) and not lin.patch_only

    emb = Embedding(100, 16)
    emb.weight = pack(torch.randn(100, 16, generator=g))
    ids = torch.tensor([[3, 99, 0], [7, 7, 50]])
    assert torch.equal(emb(ids, torch.float32), F.embedding(ids, emb.weight.dequantize(torch.float32)))


def test_stacking_keeps_parts_packed():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, 32, generator=g) for n in (16, 8, 8))
    same = stack_rows([pack(q), pack(k), pack(v)])
    assert same.fmt == RowInt8() and same.shape == (32, 32)
    assert torch.equal(same.dequantize(torch.float32), torch.cat([pack(t).dequantize(torch.float32) for t in (q, k, v)]))
    mixed = stack_rows([pack(q), k.half(), pack(v)])  # a part stored as a plain tensor
    assert isinstance(mixed.fmt, Stacked) and mixed.nbytes == pack(q).nbytes + k.half().nbytes + pack(v).nbytes
    want = torch.cat([pack(q).dequantize(torch.float32), k.half().float(), pack(v).dequantize(torch.float32)])
    assert torch.equal(mixed.dequantize(torch.float32), want)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.4]), [torch.randn(7, 32, generator=g)]


def test_streamed_blocks_travel_packed_and_the_plan_counts_packed_bytes(tmp_path):
    path = save_comfyui(diffusers_transformer(seed=2, n_layers=4), str(tmp_path / "z.safetensors"))
    model = zc.load_transformer(path, dtype=torch.float32)
    dense = [module_bytes(b) for b in model.blocks()]
    pack_blocks(model)
    packed = [module_bytes(b) for b in model.blocks()]
    assert all(p < 0.4 * d for p, d in zip(packed, dense))  # int8 + a scale per row instead of fp32
    resident = BlockStreamer(model, plan_offload(model, mode="resident", device="cpu")).attach()
    with torch.inference_mode():  # the reference also on copies: matmuls on mmap views may round differently
        want = model(*_inputs())
    resident.detach()
    plan = plan_offload(model, mode="min_vram", device="cpu")
    assert plan.streamed_bytes == sum(packed)
    ledger = Ledger()
    st = BlockStreamer(model, plan, ledger, cyclic=False).attach()
    with torch.inference_mode():
        got = model(*_inputs())
    assert torch.equal(got, want)
    assert st.copied_bytes == plan.streamed_bytes and ledger.peak <= plan.fixed_bytes + plan.buffer_bytes
    st.detach()
    assert all(isinstance(b.feed_forward.w1.weight, Packed) for b in model.blocks()) and ledger.now == 0


def test_lora_on_packed_weights_is_a_runtime_patch(tmp_path):
    from test_lora import DIALECTS, write

    ref = diffusers_transformer(seed=1)
    path = save_comfyui(ref, str(tmp_path / "z.safetensors"))
    g = torch.Generator().manual_seed(42)
    lin_names = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and "layers.0.feed_forward" in n]
    d = {n: (torch.randn(4, ref.get_submodule(n).in_features, generator=g) * 0.1,
             torch.randn(ref.get_submodule(n).out_features, 4, generator=g) * 0.1) for n in lin_names}
    lora = write(tmp_path, "l.safetensors", DIALECTS["diffusers"](d))
    model = zc.load_transformer(path, dtype=torch.float32)
    pack_blocks(model)
    truth = zc.load_transformer(path, dtype=torch.float32)  # the same expanded weights, plain, LoRA merged
    for a, b in zip(truth.blocks(), model.blocks()):
        for (_, ma), (_, mb) in zip(a.named_modules(), b.named_modules()):
            if isinstance(mb, Linear):
                ma.weight = torch.nn.Parameter(mb.weight.dequantize(torch.float32))
    blocks_before = [b.feed_forward.w1.weight for b in model.blocks()]
    apply_lora_specs(model, [lora])
    apply_lora_specs(truth, [lora])
    assert [b.feed_forward.w1.weight for b in model.blocks()] == blocks_before  # still the same packed objects
    assert model.layers[0].feed_forward.w1.patches and not truth.layers[0].feed_forward.w1.patches
    with torch.inference_mode():
        assert rel_err(model(*_inputs()), truth(*_inputs())) < 1e-5
