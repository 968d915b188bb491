"""Transformer forward time with one Fun ControlNet Union model relative to none, for each published layout; then
the 2.1 model streamed (offload.py ``plan_with_sides``) relative to resident.

    python benchmarks/bench_controlnet.py [--dim 3840 --heads 30] [--size 1024] [--device cuda] [--dtype bf16] [--budget 12]

Random weights, built in memory at the given width with Z-Image's 30 main layers, 2 noise-refiner and 2
context-refiner blocks; each control model in its published layout (v1: 6 layers + 2 plain refiner blocks;
2.1: 15 + 2 control refiner blocks; 2.0: 15, its layers also run as the refiner; lite: 3 + 2). One forward at
--size² pixels with a 128-token caption; the median of --repeat runs after a warm-up. The defaults are sized for a
CPU (width 512); the full model is --dim 3840 --heads 30 on a GPU.

Streamed rows: the budget leaves the transformer whole and room for three control blocks in flight (every control
block is copied in each forward), and with --budget GB one budget for both as a user would give it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from zimage_core.blocks import BlockRun  # noqa: E402
from zimage_core.controlnet import Control, ControlNetConfig, ZImageControlNet, control_hooks  # noqa: E402
from zimage_core.offload import GB, activation_bytes, module_bytes, offload  # noqa: E402
from zimage_core.transformer import ZImageConfig, ZImageTransformer  # noqa: E402

LAYOUTS = {"v1": (6, 16, "plain"), "2.1": (15, 33, "control"), "2.0": (15, 33, "layers"), "lite": (3, 33, "control")}


def randomize(m: torch.nn.Module) -> torch.nn.Module:
    """Random weights of realistic scale, drawn where the module lives (a full-width model in seconds on a GPU)."""
    g = None
    with torch.no_grad():
        for name, p in m.named_parameters():
            g = g or torch.Generator(device=p.device).manual_seed(0)
            r = torch.randn(p.shape, generator=g, device=p.device)
            p.copy_(1 + 0.1 * r if "norm" in name else r / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.1 * r)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", type=float, help="also time the 2.1 model and the transformer under this budget (GB)")
    a = ap.parse_args()
    dtype, dev = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype], torch.device(a.device)
    hd = a.dim // a.heads
    cfg = ZImageConfig(dim=a.dim, head_dim=hd, ffn_hidden=a.dim * 8 // 3, cap_feat_dim=2560,
                       axes_dims=ZImageConfig.axes_for_head_dim(hd))
    model = randomize(ZImageTransformer(cfg, dtype=dtype, device=dev)).eval()
    h = w = a.size // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, h, w, generator=g).to(dev, dtype)
    cap = [torch.randn(128, 2560, generator=g).to(dev, dtype)]
    t = torch.tensor([0.5], device=dev)

    def timed(controls) -> float:
        def once():
            run = BlockRun(after=control_hooks(controls, model, t, (h, w)))
            with torch.inference_mode():
                model(x, t, cap, run=run)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        once()
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    base = timed([])
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), {a.dtype}, width {a.dim}, "
          f"{a.size}×{a.size} px: plain forward {base * 1000:.0f} ms")
    for name, (layers, ch, refiner) in LAYOUTS.items():
        ccfg = ControlNetConfig(block=cfg, in_channels=ch, n_layers=layers, refiner=refiner)
        cn = randomize(ZImageControlNet(ccfg, device=dev)).to(dtype).eval()
        lat = torch.randn(1, ch, h, w, generator=g).to(dev, dtype)
        s = timed([Control(cn, lat, 0.75)])
        blocks = layers + (2 if refiner != "layers" else 0)
        print(f"  {name:5s} ({blocks:2d} control blocks): {s * 1000:.0f} ms = {s / base:.2f}× the plain forward")
        if name == "2.1":
            streamed(a, model, cn, Control(cn, lat, 0.75), timed, s)
        del cn


def streamed(a, model, cn, control, timed, resident: float) -> None:
    """The 2.1 control model streamed beside the transformer, relative to both resident."""
    sizes = [module_bytes(b) for b in cn.blocks()]
    acts = activation_bytes(model, a.size, a.size, controls=1)
    budgets = {"control streamed": module_bytes(model) + acts + module_bytes(cn) - sum(sizes) + 3 * max(sizes)}
    if a.budget:
        budgets[f"{a.budget:g} GB budget"] = int(a.budget * GB)
    model.cpu(), cn.cpu()
    for name, budget in budgets.items():
        st = offload(model, mode="budget", budget_gb=budget / GB, device=a.device, width=a.size, height=a.size, sides=[cn])
        s = timed([control])
        side = st.sides[0].plan
        print(f"  2.1 {name} ({budget / GB:.2f} GB): control {len(side.streamed)} blocks streamed, transformer "
              f"{len(st.plan.streamed)}; {s * 1000:.0f} ms = {s / resident:.2f}× resident with control")
        st.detach()
    model.to(a.device)  # resident again for the next layouts


if __name__ == "__main__":
    main()
