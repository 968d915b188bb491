"""GGUF weights: expansion throughput per quant type, and transformer forward time against bf16 on the same weights.

    python benchmarks/bench_gguf.py                                   # CPU: mid-size model, 256×256
    python benchmarks/bench_gguf.py --device cuda --full --budgets full,8   # GPU: full size, 1024×1024, 8 calls

Needs only torch, gguf and numpy. Part 1 expands one FFN-sized weight (3840×10240 with --full, else 1024×2816)
of random GGML blocks per type to bf16 and reports GB/s of output (median of repeats). Part 2 builds the
transformer with every block linear packed in one type (random blocks with sane scales), and the same model
with those weights expanded to bf16 parameters (built from the first type's weights; timing does not depend
on values), then times ``steps`` model calls at each budget ('full' = resident; a number = GB for our block
streamer, GPU only) and reports seconds per call and the ratio to the resident bf16 model in the same run.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import types

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
# The model modules without the package's __init__ (which loads the tokenizer and the rest of the pipeline):
# this script needs only torch, numpy and gguf.
sys.modules.setdefault("zimage_core", types.ModuleType("zimage_core")).__path__ = [os.path.join(ROOT, "zimage_core")]

from tiny_gguf import random_blocks  # noqa: E402

from zimage_core.ggml import EXPAND, QT, GGMLFormat  # noqa: E402
from zimage_core.layers import Linear  # noqa: E402
from zimage_core.offload import GB, module_bytes, offload  # noqa: E402
from zimage_core.packed import Packed  # noqa: E402
from zimage_core.transformer import ZImageConfig, ZImageTransformer  # noqa: E402

FULL = ZImageConfig()  # 6.15 B parameters
MID = ZImageConfig(dim=1024, n_layers=4, n_noise_refiner=1, n_context_refiner=1, head_dim=128, ffn_hidden=2816,
                   cap_feat_dim=2560)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def packed(qt, shape, rng, dev) -> Packed:
    raw = random_blocks(qt, shape[0], shape[1], rng)
    return Packed(GGMLFormat(int(qt)), tuple(shape), {"blocks": torch.from_numpy(raw).to(dev)})


def expansion(types, shape, dev, dtype, repeats, compile_=False):
    print(f"\n## expansion of one {shape[0]}×{shape[1]} weight to {dtype} on {dev}")
    print(f"{'type':8} {'bits/weight':>11} {'ms':>8} {'GB/s out':>9}")
    rng = np.random.default_rng(0)
    base = torch.randn(shape, device=dev).to(torch.bfloat16)
    out = base.numel() * dtype.itemsize
    s = timed(lambda: base.to(dtype, copy=True), dev, repeats)
    print(f"{'bf16 cast':8} {16:>11.2f} {s * 1e3:>8.2f} {out / s / 1e9:>9.3f}")
    for qt in types:
        p = packed(qt, shape, rng, dev)
        fn = torch.compile(p.fmt.dequantize, dynamic=False) if compile_ else p.fmt.dequantize
        s = timed(lambda: fn(p.tensors, p.shape, dtype), dev, repeats)
        print(f"{qt.name:8} {p.nbytes * 8 / base.numel():>11.2f} {s * 1e3:>8.2f} {out / s / 1e9:>9.3f}")


def build(cfg, qt, dtype, seed=0) -> ZImageTransformer:
    """Random model in host memory computing in ``dtype``; block linears packed as ``qt`` where their rows hold
    whole blocks, everything else bf16."""
    with torch.device("meta"):
        model = ZImageTransformer(cfg, dtype=dtype)
    g, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    inside = {id(m) for b in model.blocks() for m in b.modules()}
    for name, m in list(model.named_modules()):
        for leaf, p in list(m.named_parameters(recurse=False)):
            if isinstance(m, Linear) and leaf == "weight" and id(m) in inside and p.shape[1] % 256 == 0:
                m.weight = packed(qt, p.shape, rng, "cpu")
                continue
            t = torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5
            setattr(m, leaf, torch.nn.Parameter(t.to(torch.bfloat16 if isinstance(m, Linear) else dtype), requires_grad=False))
    return model.eval()


def expanded(model) -> ZImageTransformer:
    """The same weights as plain bf16 parameters."""
    for m in model.modules():
        if isinstance(m.__dict__.get("weight"), Packed):
            m.weight = torch.nn.Parameter(m.weight.dequantize(torch.bfloat16), requires_grad=False)
    return model


def forward_times(model, label, args, dev, inputs, ref=None):
    for budget in args.budgets.split(","):
        if budget != "full" and dev.type != "cuda":
            continue
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        st = offload(model, mode="resident" if budget == "full" else "budget", budget_gb=None if budget == "full" else float(budget),
                     device=dev, width=args.size, height=args.size)
        with torch.inference_mode():
            s = timed(lambda: model(*inputs), dev, args.steps)
        peak = torch.cuda.max_memory_allocated(dev) / GB if dev.type == "cuda" else float("nan")
        ratio = "" if ref is None else f"{s / ref:>7.2f}×"
        print(f"{label:8} {budget:>6} {module_bytes(model) / GB:>8.2f} {len(st.plan.streamed):>8} {s:>9.3f} {peak:>8.2f} {ratio}")
        st.detach()
        if budget == "full" and ref is None:
            ref = s
    return ref


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="full-size model (6.15 B) and an FFN-sized weight")
    ap.add_argument("--types", default=",".join(q.name for q in EXPAND))
    ap.add_argument("--forward-types", default="Q8_0,Q6_K,Q4_K,Q3_K,Q2_K,IQ4_XS", help="types for the forward comparison")
    ap.add_argument("--budgets", default="full", help="'full' and/or GB numbers (GPU), e.g. full,8")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024 with --full, else 256)")
    ap.add_argument("--steps", type=int, default=8, help="timed model calls per setting")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time the expansion under torch.compile")
    ap.add_argument("--compute", default=None, help="compute dtype (default bf16 on CUDA, float32 on CPU, as the nodes do)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = getattr(torch, args.compute or ("bfloat16" if dev.type == "cuda" else "float32"))
    args.size = args.size or (1024 if args.full else 256)
    print(f"torch {torch.__version__}, device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else
                                                         f", {torch.get_num_threads()} threads"))
    shape = (3840, 10240) if args.full else (1024, 2816)
    expansion([QT[t] for t in args.types.split(",")], shape, dev, dtype, args.repeats)
    if args.compile:
        print("\n(torch.compile)", end="")
        expansion([QT[t] for t in args.types.split(",")], shape, dev, dtype, args.repeats, compile_=True)

    cfg = FULL if args.full else MID
    g = torch.Generator().manual_seed(1)
    lat = args.size // 8
    inputs = (torch.randn(1, 16, lat, lat, generator=g).to(dev, dtype), torch.tensor([0.5], device=dev),
              [torch.randn(100, cfg.cap_feat_dim, generator=g).to(dev, dtype)])
    print(f"\n## forward, dim {cfg.dim}, {cfg.n_layers} layers, {args.size}×{args.size}, {dtype} compute, median of {args.steps} calls")
    print(f"{'weights':8} {'budget':>6} {'GB':>8} {'streamed':>8} {'s/call':>9} {'peak GB':>8} {'vs bf16':>8}")
    types = [QT[t] for t in args.forward_types.split(",")]
    ref = forward_times(expanded(build(cfg, types[0], dtype)), "bf16", args, dev, inputs)
    gc.collect()
    for qt in types:
        forward_times(build(cfg, qt, dtype), qt.name, args, dev, inputs, ref)
        gc.collect()


if __name__ == "__main__":
    main()
