"""fp8 compute against weight-only fp8 (dequantize to bf16 per call) on the same fp8 weights, Z-Image at 1024².

    python benchmarks/bench_fp8.py [--layers N] [--repeats N] [--tiny]

Full-width random blocks (dim 3840, 30 heads, feed-forward 10240; a few main layers, one refiner of each kind),
weights quantized per tensor to e4m3 as an fp8 file stores them; latent 1×16×128×128 (4096 image tokens) and
a 128-token caption. Three forward passes, timed alternately, median of ``--repeats``:
  * dequant:  fp8 storage, each weight up-cast to bf16 per call (what runs without fp8 compute);
  * fp8mm:    fp8 storage, torch._scaled_mm with per-row activation scales (``zimage_core/scaled_mm.py``);
  * bf16:     the same dequantized weights held resident in bf16 (upper bound of what up-casting can reach).
Prints times, the ratio dequant / fp8mm (> 1: fp8 compute is faster) and each output's relative error against
an fp32 forward of the same dequantized weights. Needs CUDA with compute capability ≥ 8.9 for fp8mm; ``--tiny``
runs a small config on whatever device exists (CPU: checks the script, the times mean nothing).
Only torch and this repository are needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

import torch

# the model modules only, without zimage_core/__init__.py (which pulls in tokenizers, numpy, pillow for the
# pipeline): this script needs nothing but torch
_pkg = types.ModuleType("zimage_core")
_pkg.__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "zimage_core")]
sys.modules.setdefault("zimage_core", _pkg)

from timing import timed  # noqa: E402

from zimage_core.layers import Linear  # noqa: E402
from zimage_core.quant import quantize_fp8  # noqa: E402
from zimage_core.scaled_mm import device_supports_fp8, set_fp8_matmul  # noqa: E402
from zimage_core.transformer import ZImageConfig, ZImageTransformer  # noqa: E402


def build(cfg: ZImageConfig, device: str, seed: int = 0) -> ZImageTransformer:
    """Random weights of realistic scale (norms ≈ 1, linears 1/√fan-in), Linear weights stored as e4m3 + scale."""
    model = ZImageTransformer(cfg, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, device=device)
            p.copy_(1.0 + 0.1 * r if "norm" in name else r / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.1 * r)
    for m in model.modules():
        if isinstance(m, Linear):
            q, s = quantize_fp8(m.weight.data.float(), torch.float8_e4m3fn)
            m.weight = torch.nn.Parameter(q, requires_grad=False)
            m.weight_scale = s.to(device)
    return model.eval()


def as_dtype(model: ZImageTransformer, dtype: torch.dtype) -> ZImageTransformer:
    """A copy whose Linear weights are the dequantized fp8 weights held in ``dtype``."""
    import copy

    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, Linear):
            w = m.compute_weight(torch.float32).to(dtype)
            m.weight, m.weight_scale = torch.nn.Parameter(w, requires_grad=False), None
    for p in out.parameters():
        if p.dtype != dtype and p.dtype.is_floating_point and p.element_size() >= 2:
            p.data = p.data.to(dtype)
    out.compute_dtype = dtype
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="main layers (the real model has 30)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tiny", action="store_true", help="small config on any device (script check)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        cfg = ZImageConfig(dim=256, n_layers=2, n_noise_refiner=1, n_context_refiner=1, ffn_hidden=512, cap_feat_dim=64)
        side, cap_len = 32, 20
    else:
        if device != "cuda":
            sys.exit("bench_fp8.py needs a CUDA GPU (use --tiny to check the script on a CPU)")
        cfg = ZImageConfig(n_layers=args.layers, n_noise_refiner=1, n_context_refiner=1)
        side, cap_len = 128, 128
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fp8_ok = device_supports_fp8(device)

    fp8 = build(cfg, device)
    ref32 = as_dtype(fp8, torch.float32)
    bf16 = as_dtype(fp8, torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, cfg.in_channels, side, side, generator=g, device=device)
    t = torch.tensor([0.6], device=device)
    cap = [torch.randn(cap_len, cfg.cap_feat_dim, generator=g, device=device)]

    def run(model, fp8mm=False):
        set_fp8_matmul(model, fp8mm)
        return model(x, t, cap)

    with torch.inference_mode():
        truth = ref32(x, t, cap)
        del ref32
        outs = {"dequant": run(fp8), "bf16": bf16(x, t, cap)}
        fns = {"dequant": lambda: run(fp8), "bf16": lambda: bf16(x, t, cap)}
        if fp8_ok or args.tiny:
            try:
                outs["fp8mm"] = run(fp8, True)
                fns["fp8mm"] = lambda: run(fp8, True)
            except RuntimeError as e:  # a CPU build without fp8 _scaled_mm
                print(f"fp8mm unavailable here: {e}".splitlines()[0])
        times = timed(fns, args.repeats, sync)
    n_lin = sum(isinstance(m, Linear) for m in fp8.modules())
    switched = set_fp8_matmul(fp8, True) if fp8_ok or args.tiny else 0
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": {"dim": cfg.dim, "layers": cfg.n_layers, "refiners": "1+1", "ffn": cfg.ffn_hidden,
                   "latent": f"{side}x{side}", "caption_tokens": cap_len, "fp8_linears": f"{switched}/{n_lin}"},
        "seconds": {k: round(v, 5) for k, v in times.items()},
        "rel_err_vs_fp32": {k: round(rel(v.float(), truth), 6) for k, v in outs.items()},
    }
    if "fp8mm" in times:
        report["speedup_fp8mm_vs_dequant"] = round(times["dequant"] / times["fp8mm"], 3)
        report["speedup_fp8mm_vs_bf16"] = round(times["bf16"] / times["fp8mm"], 3)
        report["rel_err_fp8mm_vs_dequant_bf16"] = round(rel(outs["fp8mm"].float(), outs["dequant"].float()), 6)
    if device == "cuda":
        report["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
