"""Transformer forward time against diffusers on the same weights, and peak memory while loading.

    python benchmarks/bench_transformer.py [--device cpu|cuda] [--repeats N] [--skip-load]

Forward: a moderate config (dim 512, 4 layers, 2+2 refiners, 64×64 latent = 1024 image tokens,
100 caption tokens), fp32 and bf16, batch 1; reports median seconds and the ratio ours / diffusers.
Loading: writes a ≈1 GB bf16 checkpoint (ComfyUI layout and diffusers folder), loads it in a fresh
process and reports peak RSS growth over the weights' bytes (load only, and after touching every
weight with a forward pass).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tiny import diffusers_transformer, save_comfyui, save_diffusers_folder  # noqa: E402

import zimage_core as zc  # noqa: E402

MODERATE = dict(dim=512, n_layers=4, n_refiner_layers=2, n_heads=4, n_kv_heads=4, cap_feat_dim=2560, axes_dims=[32, 48, 48])
LARGE = dict(dim=1536, n_layers=14, n_refiner_layers=2, n_heads=12, n_kv_heads=12, cap_feat_dim=2560, axes_dims=[32, 48, 48])


def timed_pair(fa, fb, repeats, sync):
    """Median seconds of two functions run alternately (so drift in machine load hits both alike)."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for f, ts in ((fa, ta), (fb, tb)):
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t0)
    return sorted(ta)[repeats // 2], sorted(tb)[repeats // 2]


def bench_forward(device: str, repeats: int) -> list[dict]:
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ref32 = diffusers_transformer(seed=0, **MODERATE)
    with tempfile.TemporaryDirectory() as d:
        path = save_comfyui(ref32, os.path.join(d, "m.safetensors"))
        for dtype in (torch.float32, torch.bfloat16):
            ref = diffusers_transformer(seed=0, dtype=dtype, **MODERATE).to(device)
            ours = zc.load_transformer(path, dtype=dtype, storage_dtype=dtype, device=device)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 16, 64, 64, generator=g).to(device, dtype)
            t = torch.tensor([0.5], device=device)
            caps = [torch.randn(100, 2560, generator=g).to(device, dtype)]
            with torch.inference_mode():
                t_ref, t_ours = timed_pair(
                    lambda: ref(list(x.unsqueeze(2)), t, caps, return_dict=False), lambda: ours(x, t, caps), repeats, sync
                )
            rows.append({"dtype": str(dtype).split(".")[-1], "diffusers_s": t_ref, "ours_s": t_ours, "ratio": t_ours / t_ref})
    return rows


_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import zimage_core as zc
def rss():  # peak resident set of this process image (VmHWM; ru_maxrss would inherit the parent's peak)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
base = rss()
m = zc.load_transformer(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
after_load = rss()
with torch.inference_mode():
    m(torch.randn(1, 16, 16, 16), torch.tensor([0.5]), [torch.randn(8, m.cfg.cap_feat_dim)])
after_forward = rss()
print(json.dumps({"base": base, "after_load": after_load, "after_forward": after_forward}))
"""


def bench_load() -> list[dict]:
    rows = []
    root = os.path.join(os.path.dirname(__file__), "..")
    with tempfile.TemporaryDirectory() as d:
        ref = diffusers_transformer(seed=0, dtype=torch.bfloat16, **LARGE)
        weights = sum(p.numel() * p.element_size() for p in ref.parameters())
        single = save_comfyui(ref, os.path.join(d, "large.safetensors"))
        folder = save_diffusers_folder(ref, os.path.join(d, "hf"), n_shards=3)
        del ref
        for label, path, dtype in [
            ("comfyui bf16 → bf16", single, "bfloat16"),
            ("comfyui bf16 → fp32 compute (bf16 storage)", single, "float32"),
            ("diffusers folder bf16 → bf16 (qkv fused on load)", folder, "bfloat16"),
        ]:
            out = subprocess.run([sys.executable, "-c", _CHILD, root, path, dtype], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({
                "case": label, "weights_GB": weights / 1e9,
                "load_peak_ratio": (r["after_load"] - r["base"]) / weights,
                "after_forward_ratio": (r["after_forward"] - r["base"]) / weights,
            })
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-load", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    for r in bench_forward(args.device, args.repeats):
        print(f"forward {r['dtype']:9s} diffusers {r['diffusers_s'] * 1e3:8.1f} ms  ours {r['ours_s'] * 1e3:8.1f} ms  ratio {r['ratio']:.3f}")
    if not args.skip_load:
        for r in bench_load():
            print(f"load {r['case']:50s} weights {r['weights_GB']:.2f} GB  peak/weights while loading {r['load_peak_ratio']:.3f}  after a forward {r['after_forward_ratio']:.3f}")


if __name__ == "__main__":
    main()
