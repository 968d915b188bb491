"""Quantized compute (fp8 or int8 matmuls) against expanding the same stored weights to bf16 per call, Z-Image at 1024².

    python benchmarks/bench_quant_matmul.py [--format fp8|int8|int8_convrot] [--layers N] [--repeats N] [--tiny]

Full-width random blocks (dim 3840, 30 heads, feed-forward 10240; a few main layers, one refiner of each kind),
every Linear weight stored as a file stores it: ``fp8`` per-tensor e4m3 + scale; ``int8`` ComfyUI's
int8_tensorwise (per-tensor scale); ``int8_convrot`` int8 with per-row scales after ConvRot's grouped Hadamard
rotation (group 256). Latent 1×16×128×128 (4096 image tokens), a 128-token caption. Three forward passes,
timed alternately, median of ``--repeats``:
  * dequant:  the stored weights expanded to bf16 per call (what runs without quantized compute);
  * quantmm:  the block matmuls on the tensor cores in the stored format (``layers.set_quant_matmul``: fp8 via
              torch._scaled_mm with per-row activation scales, int8 via torch._int_mm as ComfyUI does);
  * bf16:     the same dequantized weights held resident in bf16 (upper bound of what up-casting can reach).
Prints times, the ratio dequant / quantmm (> 1: quantized compute is faster) and each output's relative error
against an fp32 forward of the same dequantized weights. fp8 needs compute capability ≥ 8.9, int8 ≥ 7.5;
``--tiny`` runs a small config on whatever device exists (CPU: checks the script, the times mean nothing).
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

from zimage_core.int8_mm import device_supports_int8  # noqa: E402
from zimage_core.layers import Linear, set_quant_matmul  # noqa: E402
from zimage_core.packed import Packed  # noqa: E402
from zimage_core.quant import ComfyFormat, quantize_fp8  # noqa: E402
from zimage_core.quant_formats import hadamard  # noqa: E402
from zimage_core.scaled_mm import device_supports_fp8  # noqa: E402
from zimage_core.transformer import ZImageConfig, ZImageTransformer  # noqa: E402


def store_int8(w: torch.Tensor, convrot: bool) -> Packed:
    """ComfyUI's int8_tensorwise storage of ``w`` (comfy-kitchen ``tensor/int8.py`` TensorWiseINT8Layout.quantize):
    a per-tensor scale amax/127, or with ConvRot per-row scales of the grouped-Hadamard-rotated rows."""
    conf = {"format": "int8_tensorwise"}
    if convrot and w.shape[1] % 256 == 0:
        h = hadamard(256, w.device, w.dtype)
        w = torch.matmul(w.reshape(w.shape[0], -1, 256), h.T).reshape(w.shape)
        scale = w.abs().amax(dim=1, keepdim=True) / 127.0
        q = (w / scale).round().clamp(-128, 127).to(torch.int8)
        conf.update(convrot=True, convrot_groupsize=256)
    else:
        scale = w.abs().amax() / 127.0
        q = (w / scale).round().clamp(-128, 127).to(torch.int8)
    return Packed(ComfyFormat("int8_tensorwise", json.dumps(conf)), tuple(w.shape), {"": q, "_scale": scale.float()})


def build(cfg: ZImageConfig, device: str, fmt: str = "fp8", seed: int = 0) -> ZImageTransformer:
    """Random weights of realistic scale (norms ≈ 1, linears 1/√fan-in), Linear weights stored in ``fmt``."""
    model = ZImageTransformer(cfg, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, device=device)
            p.copy_(1.0 + 0.1 * r if "norm" in name else r / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.1 * r)
    for m in model.modules():
        if isinstance(m, Linear) and fmt == "fp8":
            q, s = quantize_fp8(m.weight.data.float(), torch.float8_e4m3fn)
            m.weight = torch.nn.Parameter(q, requires_grad=False)
            m.weight_scale = s.to(device)
        elif isinstance(m, Linear):
            m.weight = store_int8(m.weight.data.float(), convrot=fmt == "int8_convrot")
    return model.eval()


def as_dtype(model: ZImageTransformer, dtype: torch.dtype) -> ZImageTransformer:
    """A copy whose Linear weights are the dequantized stored weights held in ``dtype``."""
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
    ap.add_argument("--format", default="fp8", choices=["fp8", "int8", "int8_convrot"])
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
            sys.exit("bench_quant_matmul.py needs a CUDA GPU (use --tiny to check the script on a CPU)")
        cfg = ZImageConfig(n_layers=args.layers, n_noise_refiner=1, n_context_refiner=1)
        side, cap_len = 128, 128
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    quant_ok = (device_supports_fp8 if args.format == "fp8" else device_supports_int8)(device)

    stored = build(cfg, device, args.format)
    ref32 = as_dtype(stored, torch.float32)
    bf16 = as_dtype(stored, torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, cfg.in_channels, side, side, generator=g, device=device)
    t = torch.tensor([0.6], device=device)
    cap = [torch.randn(cap_len, cfg.cap_feat_dim, generator=g, device=device)]

    def run(model, quantmm=False):
        set_quant_matmul(model, quantmm)
        return model(x, t, cap)

    with torch.inference_mode():
        truth = ref32(x, t, cap)
        del ref32
        outs = {"dequant": run(stored), "bf16": bf16(x, t, cap)}
        fns = {"dequant": lambda: run(stored), "bf16": lambda: bf16(x, t, cap)}
        if quant_ok or args.tiny:
            try:
                outs["quantmm"] = run(stored, True)
                fns["quantmm"] = lambda: run(stored, True)
            except RuntimeError as e:  # a CPU build without fp8 _scaled_mm
                print(f"quantmm unavailable here: {e}".splitlines()[0])
        times = timed(fns, args.repeats, sync)
    n_lin = sum(isinstance(m, Linear) for m in stored.modules())
    switched = set_quant_matmul(stored, True) if quant_ok or args.tiny else 0
    report = {
        "format": args.format,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": {"dim": cfg.dim, "layers": cfg.n_layers, "refiners": "1+1", "ffn": cfg.ffn_hidden,
                   "latent": f"{side}x{side}", "caption_tokens": cap_len, "quantized_matmuls": f"{switched}/{n_lin}"},
        "seconds": {k: round(v, 5) for k, v in times.items()},
        "rel_err_vs_fp32": {k: round(rel(v.float(), truth), 6) for k, v in outs.items()},
    }
    if "quantmm" in times:
        report["speedup_quantmm_vs_dequant"] = round(times["dequant"] / times["quantmm"], 3)
        report["speedup_quantmm_vs_bf16"] = round(times["bf16"] / times["quantmm"], 3)
        report["rel_err_quantmm_vs_dequant_bf16"] = round(rel(outs["quantmm"].float(), outs["dequant"].float()), 6)
    if device == "cuda":
        report["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
