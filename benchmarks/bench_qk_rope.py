"""q/k RMSNorm + RoPE: the fused Triton kernel (zimage_core/qk_norm_rope.py) against the plain eager path, alone and
in a whole forward, on random weights.

    python benchmarks/bench_qk_rope.py --device cuda [--layers 30] [--repeats 20] [--compile]
    TRITON_INTERPRET=1 python benchmarks/bench_qk_rope.py --device cpu   # a small config; the kernel interpreted

CUDA: a 1024² layout (64×64 image tokens + 100 caption tokens padded to 128: S = 4224), 30 heads of 128, bf16;
the kernel on q and k of one layer, then a forward of the full-width model (``--layers`` main layers, 2+2
refiners) with the kernel on and off (interleaved medians, and their outputs' relative difference); ``--compile``
adds the forward with ``compile_blocks()`` (inductor traces the plain path with the real-arithmetic RoPE).
CPU: the same on a small config, a check that the script runs (interpreter times mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from timing import timed  # noqa: E402

import zimage_core as zc  # noqa: E402
from zimage_core import qk_norm_rope as qr  # noqa: E402
from zimage_core.attention import apply_rope  # noqa: E402
from zimage_core.layers import RMSNorm  # noqa: E402
from zimage_core.packing import Tokens, grid_ids, pack, pad_to_multiple  # noqa: E402


def layout_rope(side: int, n_cap: int, axes, device):
    """The unified sequence's RoPE table of one sample: side×side image tokens, then the padded caption."""
    cap = torch.zeros(pad_to_multiple(n_cap), 3, dtype=torch.long)
    cap[:, 0] = torch.arange(1, len(cap) + 1)
    ids = torch.cat([grid_ids(side, side, len(cap) + 1), cap])
    return pack(Tokens([torch.zeros(len(ids), 1)], [ids]), axes, 256.0).rope.to(device)


def bench_kernel(device, side, n_cap, heads, repeats, sync):
    rope = layout_rope(side, n_cap, (32, 48, 48), device)
    s, d = rope.shape[1], 128
    qkv = torch.randn(1, s, 3 * heads * d, device=device, dtype=torch.bfloat16).view(1, s, 3, heads, d)
    qn, kn = RMSNorm(d, 1e-5).to(device), RMSNorm(d, 1e-5).to(device)
    for n in (qn, kn):
        n.weight.data = (1 + 0.2 * torch.randn(d, device=device)).to(torch.bfloat16)
    fns = {"plain": lambda: (apply_rope(qn(qkv[:, :, 0]), rope), apply_rope(kn(qkv[:, :, 1]), rope))}
    if qr.fused_ok(qkv, qn, kn, rope):
        fns["fused"] = lambda: qr.fused_qk_norm_rope(qkv, qn.weight, kn.weight, 1e-5, rope)
    else:
        print("fused kernel unavailable here (needs triton, and CUDA or TRITON_INTERPRET=1)")
    with torch.inference_mode():
        med = timed(fns, repeats, sync)
        r64 = rope.to(torch.complex128)
        truth = [apply_rope(torch.nn.functional.rms_norm(qkv[:, :, i].double(), (d,), n.weight.double(), 1e-5), r64)
                 for i, n in enumerate((qn, kn))]
        for k, f in fns.items():  # accuracy on this device: relative error; the worst element against its head row's largest
            err = [(y.double() - t) for y, t in zip(f(), truth)]
            worst = max(float((e.abs() / t.abs().amax(-1, keepdim=True)).max()) for e, t in zip(err, truth))
            print(f"{k} vs float64: relative {max(float(e.norm() / t.norm()) for e, t in zip(err, truth)):.3e}, "
                  f"worst element {worst / 2**-8:.3f} × 2^-8 of its row's largest")
    moved = 4 * qkv[:, :, 0].numel() * 2  # q and k read once and written once, bf16
    line = f"q/k norm+rope S={s} H={heads} D={d} bf16:" + "".join(
        f"  {k} {v * 1e6:.1f} µs ({moved / v / 1e9:.0f} GB/s)" for k, v in med.items())
    print(line + (f"  fused/plain {med['fused'] / med['plain']:.3f}" if "fused" in med else ""))
    return "fused" in med


def full_width(layers: int, small: bool) -> zc.ZImageConfig:
    if small:
        return zc.ZImageConfig(dim=256, n_layers=layers, n_noise_refiner=1, n_context_refiner=1, ffn_hidden=512, cap_feat_dim=64)
    return zc.ZImageConfig(n_layers=layers)  # dim 3840, 30 heads of 128, FFN 10240, 2+2 refiners


def bench_forward(device, cfg, side, n_cap, repeats, sync, compile_, fused: bool):
    with torch.device("meta"):
        model = zc.ZImageTransformer(cfg, dtype=torch.bfloat16).to(torch.bfloat16)
    model = model.to_empty(device=device).eval()  # 12 GB at full size, allocated once in bf16
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02).add_(1.0 if p.ndim == 1 else 0.0)
    x = torch.randn(1, 16, 2 * side, 2 * side, device=device, dtype=torch.bfloat16)
    t, caps = torch.tensor([0.5], device=device), [torch.randn(n_cap, cfg.cap_feat_dim, device=device, dtype=torch.bfloat16)]

    def with_kernel(on):
        def f():
            qr.ENABLED = on
            return model(x, t, caps)
        return f

    with torch.inference_mode():
        med = timed({"fused": with_kernel(True), "plain": with_kernel(False)} if fused else {"plain": with_kernel(False)}, repeats, sync)
        a, b = with_kernel(True)().double(), with_kernel(False)().double()
        diff = float((a - b).norm() / b.norm())
        if compile_:
            model.compile_blocks()
            qr.ENABLED = True
            med["compiled"] = timed({"c": lambda: model(x, t, caps)}, repeats, sync)["c"]
    print(f"forward {cfg.n_layers}+{cfg.n_noise_refiner}+{cfg.n_context_refiner} blocks dim {cfg.dim} S={side * side}+"
          f"{pad_to_multiple(n_cap)} bf16:" + "".join(f"  {k} {v * 1e3:.2f} ms" for k, v in med.items())
          + (f"  fused/plain {med['fused'] / med['plain']:.3f}  outputs differ by {diff:.2e} (relative)" if fused else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=30, help="main layers of the full-width forward")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also time the forward with compile_blocks() (inductor)")
    args = ap.parse_args()
    small = args.device == "cpu"
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(f"device={args.device} torch={torch.__version__} "
          + (torch.cuda.get_device_name() if args.device == "cuda" else "(small config)"))
    side, n_cap, repeats = (4, 20, 1) if small else (64, 100, args.repeats)
    fused = bench_kernel(args.device, side, n_cap, 2 if small else 30, repeats, sync)
    bench_forward(args.device, full_width(1 if small else args.layers, small), side, n_cap, repeats, sync, args.compile, fused)


if __name__ == "__main__":
    main()
