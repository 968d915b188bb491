"""Time to apply and remove a rank-32 LoRA on the full-size Z-Image transformer (random weights) on the CPU.

    python benchmarks/bench_lora.py [--rank 32] [--tiny] [--workdir DIR]

Writes a full-size bf16 checkpoint (12.3 GB, ComfyUI layout) with random weights tensor by tensor, loads it
memory-mapped, writes a rank-32 LoRA on every attention (split q/k/v, out), feed-forward and modulation
linear of all 34 blocks (kohya names with alpha), then times: parsing the LoRA, merging it into the bf16
weights, restoring the originals bit for bit, and attaching it as run-time patches instead.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import zimage_core as zc  # noqa: E402
from zimage_core.lora import LoraPatcher, read_lora  # noqa: E402
from zimage_core.safetensors_io import DTYPE_NAMES  # noqa: E402
from zimage_core.transformer import ZImageConfig, ZImageTransformer  # noqa: E402


def stream_safetensors(path: str, shapes: dict[str, tuple], make) -> None:
    """Write a safetensors file without holding all tensors: header from shapes, then one tensor at a time."""
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2
        for s in shape:
            n *= s
        header[k] = {"dtype": DTYPE_NAMES[torch.bfloat16], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k, shape in shapes.items():
            f.write(make(k, shape).to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    cfg = ZImageConfig(dim=256, n_layers=4, head_dim=64, ffn_hidden=682, cap_feat_dim=128, axes_dims=(16, 24, 24)) if a.tiny else ZImageConfig()
    with torch.device("meta"):
        meta = ZImageTransformer(cfg)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    g = torch.Generator().manual_seed(0)

    def make(k, shape):
        if "norm" in k:
            return torch.ones(shape)
        t = torch.randn(shape, generator=g)
        return t / shape[-1] ** 0.5 if len(shape) == 2 else t * 0.02

    with tempfile.TemporaryDirectory(dir=a.workdir) as d:
        ckpt = os.path.join(d, "z_image_random_bf16.safetensors")
        t0 = time.perf_counter()
        stream_safetensors(ckpt, shapes, make)
        print(f"wrote {os.path.getsize(ckpt) / 1e9:.2f} GB checkpoint in {time.perf_counter() - t0:.0f} s")
        model = zc.load_transformer(ckpt, dtype=torch.bfloat16)
        dim, r = cfg.dim, a.rank
        lora = {}
        for blk, prefix in [(b, f"layers.{i}") for i, b in enumerate(model.layers)] + \
                           [(b, f"noise_refiner.{i}") for i, b in enumerate(model.noise_refiner)] + \
                           [(b, f"context_refiner.{i}") for i, b in enumerate(model.context_refiner)]:
            mods = {"attention_to_q": (dim, dim), "attention_to_k": (dim, dim), "attention_to_v": (dim, dim),
                    "attention_to_out_0": (dim, dim), "feed_forward_w1": (cfg.ffn_hidden, dim),
                    "feed_forward_w2": (dim, cfg.ffn_hidden), "feed_forward_w3": (cfg.ffn_hidden, dim)}
            if blk.modulated:
                mods["adaLN_modulation_0"] = (4 * dim, cfg.adaln_dim)
            for m, (o, i) in mods.items():
                k = f"lora_unet_{prefix.replace('.', '_')}_{m}"
                lora[k + ".lora_down.weight"] = (torch.randn(r, i, generator=g) * 0.01).to(torch.bfloat16)
                lora[k + ".lora_up.weight"] = (torch.randn(o, r, generator=g) * 0.01).to(torch.bfloat16)
                lora[k + ".alpha"] = torch.tensor(float(r))
        lora_path = os.path.join(d, "lora_rank32.safetensors")
        from safetensors.torch import save_file

        save_file(lora, lora_path)
        del lora
        print(f"LoRA: {os.path.getsize(lora_path) / 1e6:.0f} MB, rank {r}, threads={torch.get_num_threads()}")
        probe = model.layers[3].feed_forward.w1
        original = probe.weight.clone()
        t0 = time.perf_counter()
        lf = read_lora(lora_path, model)
        t_parse = time.perf_counter() - t0
        patcher = LoraPatcher.of(model)
        t0 = time.perf_counter()
        patcher.apply([(lf, 1.0)])
        t_merge = time.perf_counter() - t0
        assert not torch.equal(probe.weight, original)
        t0 = time.perf_counter()
        patcher.apply([])
        t_restore = time.perf_counter() - t0
        assert torch.equal(probe.weight, original)
        t0 = time.perf_counter()
        patcher.apply([(lf, 1.0)], runtime=True)
        t_runtime = time.perf_counter() - t0
        patcher.apply([])
        print(f"parse {t_parse:.2f} s | merge into bf16 {t_merge:.2f} s | restore (bit-exact) {t_restore:.3f} s | "
              f"attach as run-time patches {t_runtime:.2f} s | {len(lf.deltas)} module deltas")


if __name__ == "__main__":
    main()
