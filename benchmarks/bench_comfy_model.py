"""Our MODEL against ComfyUI's native Z-Image, inside ComfyUI: one forward (``apply_model``) and one KSampler step,
side by side on the same random weights.

    <ComfyUI's python> benchmarks/bench_comfy_model.py [--comfyui ~/ComfyUI] [--cpu] [--layers 1] [--size 512]
                                                       [--steps 4] [--repeats 3]

Full width (ComfyUI recognises Z-Image only at dim 3840, 30 heads) with ``--layers`` main layers and the 2 + 2
refiners, bf16 weights written to a temp file; each model computes in what its loader picks for the device
(fp32 on a CPU, bf16 on a GPU). Prints JSON: median seconds per forward and per euler step, and ours / native.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.expanduser("~/ComfyUI")))
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    sys.argv = ["main.py"] + (["--cpu"] if a.cpu else [])
    sys.path.insert(0, a.comfyui)
    os.chdir(a.comfyui)
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    import torch

    spec = importlib.util.spec_from_file_location("zimage_pack", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["zimage_pack"] = pack
    spec.loader.exec_module(pack)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from comfy_harness import full_width_checkpoint
    from zimage_pack.nodes.memory import cached_load, compute_dtype
    from zimage_pack.nodes.model import ZImageBase, ZImageDiffusionModel

    import zimage_core as zc

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "z.safetensors")
        full_width_checkpoint(path, n_layers=a.layers)
        native = comfy.sd.load_diffusion_model(path)
        dtype = compute_dtype("auto", mm.get_torch_device())
        ours = cached_load("transformer", path, lambda: ZImageBase(zc.load_transformer(path, dtype=dtype, cls=ZImageDiffusionModel)),
                           {"dtype": dtype}, {"mode": "auto", "budget_gb": 0.0, "prefetch": 2})
        g = torch.Generator().manual_seed(0)
        lat = torch.zeros(1, 16, a.size // 8, a.size // 8)
        ctx = torch.randn(1, 100, 2560, generator=g)
        cond = [[ctx, {"pooled_output": None}]]
        noise = comfy.sample.prepare_noise(lat, 0)
        dev = mm.get_torch_device()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def forward(m):
            mm.load_models_gpu([m])
            x = torch.randn(lat.shape, generator=g).to(dev)
            with torch.inference_mode():
                m.model.apply_model(x, torch.tensor([0.6], device=dev), c_crossattn=ctx.to(dev), num_tokens=100)

        def sample(m):
            comfy.sample.sample(m, noise, a.steps, 1.0, "euler", "simple", cond, cond, lat, seed=0, disable_pbar=True)

        out = {"device": str(dev), "layers": a.layers, "size": a.size, "weights_gb": {"native": native.model_size() / 1e9,
                                                                                     "ours": ours.model_size() / 1e9}}
        for name, fn, per in (("forward_s", forward, 1), ("ksampler_step_s", sample, a.steps)):
            times = {"native": [], "ours": []}
            for m in (native, ours):
                fn(m)  # warm-up
            for _ in range(a.repeats):
                for m, k in ((native, "native"), (ours, "ours")):
                    sync()
                    t0 = time.perf_counter()
                    fn(m)
                    sync()
                    times[k].append((time.perf_counter() - t0) / per)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            out[name] = {**med, "ours_over_native": med["ours"] / med["native"]}
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
