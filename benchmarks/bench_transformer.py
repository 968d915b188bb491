"""Transformer forward time against diffusers and ComfyUI's native NextDiT on the same weights, and peak memory
while loading.

    python benchmarks/bench_transformer.py [--device cpu|cuda] [--repeats N] [--skip-load] [--compile] [--dtype float32]

Forward: dim 1024, 8 heads of 128, 4 layers, 2+2 refiners, 64×64 latent (1024 image tokens), 100 caption
tokens, fp32 and bf16, batch 1; interleaved medians and the ratios ours / diffusers and ours / native, then the
same ratios (and compiled / eager) taken round by round, with a 95% interval (``timing.paired_ratio``): on a shared
machine whose speed drifts by 20% a ratio of medians cannot tell 0.98 from 1.0, the paired one can say whether it may.
Native NextDiT is imported from ``COMFYUI_PATH`` (else ~/ComfyUI) and skipped with a message when that does
not import (run with ComfyUI's own Python to include it); diffusers likewise. ``--compile`` adds ours with
``compile_blocks()`` (inductor; the first call compiles and is not timed).
Loading: writes a ≈1 GB bf16 checkpoint (ComfyUI layout and diffusers folder), loads it in a fresh
process and reports peak RSS growth over the weights' bytes (load only, and after touching every
weight with a forward pass).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from timing import medians, paired_ratio, rounds  # noqa: E402
from tiny import diffusers_transformer, save_comfyui, save_diffusers_folder  # noqa: E402

import zimage_core as zc  # noqa: E402

MODERATE = dict(dim=1024, n_layers=4, n_refiner_layers=2, n_heads=8, n_kv_heads=8, cap_feat_dim=2560, axes_dims=[32, 48, 48])
LARGE = dict(dim=1536, n_layers=14, n_refiner_layers=2, n_heads=12, n_kv_heads=12, cap_feat_dim=2560, axes_dims=[32, 48, 48])


def native_nextdit(ours, dtype, device):
    """ComfyUI's NextDiT with Z-Image's settings and our weights (same names), or None with the reason printed."""
    comfy = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI")
    try:
        if comfy not in sys.path:
            sys.path.append(comfy)
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = torch.device(device).type == "cpu"  # before comfy.model_management probes for a GPU
        import comfy.ops
        from comfy.ldm.lumina.model import NextDiT
    except Exception as e:  # not ComfyUI's environment
        print(f"native NextDiT skipped: ComfyUI at {comfy} does not import here ({type(e).__name__}: {e})")
        return None
    c = ours.cfg
    m = NextDiT(patch_size=c.patch_size, in_channels=c.in_channels, dim=c.dim, n_layers=c.n_layers,
                n_refiner_layers=c.n_noise_refiner, n_heads=c.n_heads, n_kv_heads=c.n_heads, multiple_of=1,
                ffn_dim_multiplier=c.ffn_hidden / c.dim, norm_eps=c.norm_eps, qk_norm=True, cap_feat_dim=c.cap_feat_dim,
                axes_dims=list(c.axes_dims), axes_lens=[1536, 512, 512], rope_theta=c.rope_theta, z_image_modulation=True,
                time_scale=c.t_scale, pad_tokens_multiple=32, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    m.load_state_dict({k: v.to(dtype) for k, v in ours.state_dict().items()})
    return m.eval()


def bench_forward(device: str, repeats: int, compile_: bool, dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        ref32 = diffusers_transformer(seed=0, **MODERATE)
    except ImportError as e:
        print(f"diffusers skipped: {e}")
        ref32 = None
    with tempfile.TemporaryDirectory() as d:
        path = save_comfyui(ref32, os.path.join(d, "m.safetensors")) if ref32 is not None else None
        for dtype in dtypes:
            if path is not None:
                ours = zc.load_transformer(path, dtype=dtype, storage_dtype=dtype, device=device)
            else:
                with torch.device("meta"):
                    ours = zc.ZImageTransformer(zc.ZImageConfig(dim=1024, n_layers=4, head_dim=128, ffn_hidden=2730,
                                                                axes_dims=(32, 48, 48)), dtype=dtype)
                ours = ours.to_empty(device=device)
                torch.manual_seed(0)
                for p in ours.parameters():
                    p.data.normal_(0, 0.02).add_(1.0 if p.ndim == 1 else 0.0)
                ours = ours.to(dtype)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 16, 64, 64, generator=g).to(device, dtype)
            t = torch.tensor([0.5], device=device)
            caps = [torch.randn(100, 2560, generator=g).to(device, dtype)]
            fns = {"ours": lambda: ours(x, t, caps)}
            if ref32 is not None:
                ref = diffusers_transformer(seed=0, dtype=dtype, **MODERATE).to(device)
                fns["diffusers"] = lambda: ref(list(x.unsqueeze(2)), t, caps, return_dict=False)
            native = native_nextdit(ours, dtype, device)
            if native is not None:  # native takes σ (= 1 − t) and returns noise − x0
                fns["native"] = lambda: native(x, 1 - t, caps[0][None], 100)
            if compile_:
                fast = zc.load_transformer(path, dtype=dtype, storage_dtype=dtype, device=device) if path else copy.deepcopy(ours)
                fast.compile_blocks()
                fns["ours_compiled"] = lambda: fast(x, t, caps)
            with torch.inference_mode():
                if native is not None and dtype == torch.float32:  # same weights, same math: a sanity check
                    a, b = ours(x, t, caps), -native(x, 1 - t, caps[0][None], 100)
                    print(f"native vs ours fp32 relative difference {float((a - b).norm() / b.norm()):.2e}")
                ts = rounds(fns, repeats, sync)
            med = medians(ts)
            row = {"dtype": str(dtype).split(".")[-1], **{f"{k}_s": v for k, v in med.items()}}
            for k in ("diffusers", "native"):
                if k in med:
                    row[f"ours/{k}"] = med["ours"] / med[k]
                    if "ours_compiled" in med:
                        row[f"compiled/{k}"] = med["ours_compiled"] / med[k]
            for a, b in (("ours", "diffusers"), ("ours", "native"), ("ours_compiled", "ours")):
                if a in ts and b in ts:  # per-round ratios: what load drift cannot fake (timing.paired_ratio)
                    row[f"paired {a}/{b} [95% CI]"] = "{:.3f} [{:.3f}, {:.3f}]".format(*paired_ratio(ts[a], ts[b]))
            rows.append(row)
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
    ap.add_argument("--compile", action="store_true", help="also time ours with compile_blocks() (inductor)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], action="append",
                    help="only this dtype (repeatable; default both)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    for r in bench_forward(args.device, args.repeats, args.compile, [getattr(torch, d) for d in args.dtype or ("float32", "bfloat16")]):
        print("forward " + "  ".join(f"{k} {v * 1e3:.1f} ms" if k.endswith("_s") else f"{k} {v:.3f}" if isinstance(v, float)
                                     else f"{k} {v}" for k, v in r.items()))
    if not args.skip_load:
        for r in bench_load():
            print(f"load {r['case']:50s} weights {r['weights_GB']:.2f} GB  peak/weights while loading {r['load_peak_ratio']:.3f}  after a forward {r['after_forward_ratio']:.3f}")


if __name__ == "__main__":
    main()
