"""Block streaming on a GPU: peak memory and seconds per step at several VRAM budgets, against diffusers' offloading.

    python benchmarks/bench_offload.py                       # full size, 1024×1024, 8 steps, bf16 and fp8
    python benchmarks/bench_offload.py --budgets full,12,8,6 --dtypes bf16,fp8 --skip-diffusers
    python benchmarks/bench_offload.py --tiny --device cpu   # smoke test of the script on any machine

Builds the full-size Z-Image transformer (6.15 B parameters) with random weights in host memory, then for
each budget plans and attaches our streamer, runs an 8-step Turbo loop (batch 1, 100 caption tokens),
and reports peak allocated memory, seconds per step (after one warm-up step) and the ratio to the fully
resident run measured in the same process. diffusers' ``enable_model_cpu_offload`` (accelerate
cpu_offload_with_hook), ``enable_sequential_cpu_offload`` (accelerate cpu_offload) and block-level group
offloading with streams run the same loop on the same weights.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import zimage_core as zc  # noqa: E402
from zimage_core.offload import GB, offload  # noqa: E402
from zimage_core.quant import quantize_fp8  # noqa: E402
from zimage_core.transformer import ZImageConfig, ZImageTransformer  # noqa: E402

TINY = ZImageConfig(dim=256, n_layers=6, n_noise_refiner=2, n_context_refiner=2, head_dim=64, ffn_hidden=682,
                    cap_feat_dim=128, axes_dims=(16, 24, 24))


def build(cfg: ZImageConfig, fp8: bool, seed: int = 0, device: torch.device | str = "cpu") -> ZImageTransformer:
    """The model with random weights made on ``device`` (bf16, or fp8 linears with per-tensor scales)."""
    with torch.device("meta"):
        model = ZImageTransformer(cfg, dtype=torch.bfloat16)
    g = torch.Generator(device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if "norm" in name or name.startswith("cap_embedder.0"):
            t = torch.ones(p.shape, dtype=torch.bfloat16, device=device)
        else:
            t = torch.randn(p.shape, generator=g, dtype=torch.float32, device=device)
            t = (t / math.sqrt(p.shape[-1]) if p.ndim == 2 else t * 0.02).to(torch.bfloat16)
        if fp8 and hasattr(owner, "weight_scale") and leaf == "weight" and p.ndim == 2:
            t, scale = quantize_fp8(t, torch.float8_e4m3fn)
            owner.weight_scale = scale
        setattr(owner, leaf, torch.nn.Parameter(t, requires_grad=False))
    return model.eval()


def loop(call, x, steps, sync, per_step: bool = False):
    """``steps`` Euler steps of the Turbo schedule; returns seconds per step after the first (warm-up) step
    (``per_step``: the list of every step's seconds, warm-up included)."""
    sig = zc.sigmas(steps)
    times = []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        t = zc.schedule.model_time(sig[i]).to(x.device).expand(x.shape[0])
        pred = call(x, t)
        x = x + (sig[i + 1] - sig[i]).to(x.device) * (-pred.float())
        sync()
        times.append(time.perf_counter() - t0)
    return times if per_step else sum(times[1:]) / max(len(times) - 1, 1)


def ours(model, budget, x, caps, steps, sync, dev, size):
    mode = "resident" if budget == "full" else "budget"
    st = offload(model, mode=mode, budget_gb=None if budget == "full" else float(budget), device=dev, width=size, height=size)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        sps = loop(lambda xx, t: model(xx.to(torch.bfloat16), t, caps), x, steps, sync)
    peak = torch.cuda.max_memory_allocated(dev) / GB if dev.type == "cuda" else st.ledger.peak / GB
    plan = st.plan.describe()
    st.detach()
    return sps, peak, plan


def diffusers_model(model: ZImageTransformer):
    """diffusers' ZImageTransformer2DModel holding the same weights (dequantised to bf16, q/k/v split)."""
    from diffusers import ZImageTransformer2DModel

    c = model.cfg
    with torch.device("meta"):
        ref = ZImageTransformer2DModel(dim=c.dim, n_layers=c.n_layers, n_refiner_layers=c.n_noise_refiner,
                                       n_heads=c.n_heads, n_kv_heads=c.n_heads, cap_feat_dim=c.cap_feat_dim,
                                       axes_dims=list(c.axes_dims), axes_lens=[1536, 512, 512])
    sd = {}
    for name, m in model.named_modules():
        if hasattr(m, "compute_weight"):
            w = m.compute_weight(torch.bfloat16)
            key = name
            key = key.replace("x_embedder", "all_x_embedder.2-1").replace("final_layer", "all_final_layer.2-1")
            key = key.replace("attention.out", "attention.to_out.0")
            if key.endswith("attention.qkv"):
                q, k, v = w.chunk(3)
                base = key[: -len("qkv")]
                sd[base + "to_q.weight"], sd[base + "to_k.weight"], sd[base + "to_v.weight"] = q, k, v
            else:
                sd[key + ".weight"] = w
            if m.bias is not None:
                sd[key + ".bias"] = m.bias.to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "norm" in name or "pad_token" in name or name.startswith("cap_embedder.0"):
            sd[name.replace("attention.q_norm", "attention.norm_q").replace("attention.k_norm", "attention.norm_k")] = p.to(torch.bfloat16)
    # tensors made under inference_mode (by a streamer, say) cannot become parameters outside it: copy those
    sd = {k: v.clone() if v.is_inference() else v for k, v in sd.items()}
    ref.load_state_dict(sd, assign=True, strict=True)
    return ref.eval()


def theirs(kind, model, x, caps, steps, sync, dev):
    ref = diffusers_model(model)
    if kind == "model_cpu_offload":
        from accelerate import cpu_offload_with_hook

        ref, _ = cpu_offload_with_hook(ref, dev)
    elif kind == "sequential_cpu_offload":
        from accelerate import cpu_offload

        cpu_offload(ref, execution_device=dev)
    elif kind == "group_offload_streams":
        ref.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level",
                                 num_blocks_per_group=1, use_stream=True)
    torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        sps = loop(lambda xx, t, ref=ref: torch.stack(ref(list(xx.to(torch.bfloat16).unsqueeze(2)), t, caps, return_dict=False)[0]).squeeze(2),
                   x, steps, sync)
    peak = torch.cuda.max_memory_allocated(dev) / GB
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    return sps, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budgets", default="full,12,8,6")
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a small config, to check the script itself")
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    cfg = TINY if a.tiny else ZImageConfig()
    budgets = a.budgets.split(",")
    if a.tiny:
        budgets = ["full"] + ["0.05", "0.03"]
        a.size = min(a.size, 256)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"device={name} torch={torch.__version__} size={a.size} steps={a.steps}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, a.size // 8, a.size // 8, generator=g).to(dev)
    caps = [torch.randn(100, cfg.cap_feat_dim, generator=g).to(dev, torch.bfloat16)]
    rows = []
    for dt in a.dtypes.split(","):
        model = build(cfg, fp8=(dt == "fp8"))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[{dt}] {n_params / 1e9:.3f} B parameters, {zc.offload.module_bytes(model) / GB:.2f} GB")
        base = None
        for b in budgets:
            sps, peak, plan = ours(model, b, x, caps, a.steps, sync, dev, a.size)
            base = base or sps
            rows.append((f"ours {dt}", b, peak, sps, sps / base))
            print(f"  ours budget={b:>5}: peak {peak:6.2f} GB  {sps:7.3f} s/step  ×{sps / base:.2f}  [{plan}]")
        if dt == "bf16" and not a.skip_diffusers and dev.type == "cuda":
            for kind in ("model_cpu_offload", "sequential_cpu_offload", "group_offload_streams"):
                try:
                    sps, peak = theirs(kind, model, x, caps, a.steps, sync, dev)
                    rows.append((f"diffusers {kind}", "-", peak, sps, sps / base))
                    print(f"  diffusers {kind:24s}: peak {peak:6.2f} GB  {sps:7.3f} s/step  ×{sps / base:.2f}")
                except Exception as e:  # report and go on: one failing baseline must not hide the others
                    print(f"  diffusers {kind}: failed: {type(e).__name__}: {e}")
        del model
        gc.collect()
    print("\nmethod,budget_gb,peak_gb,s_per_step,ratio_to_resident")
    for r in rows:
        print(f"{r[0]},{r[1]},{r[2]:.2f},{r[3]:.4f},{r[4]:.2f}")


if __name__ == "__main__":
    main()
