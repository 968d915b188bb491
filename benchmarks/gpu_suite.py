"""One device run: speed and VRAM of full-size Z-Image-Turbo on a GPU, against ComfyUI's native NextDiT and diffusers.

    python benchmarks/gpu_suite.py --out DIR                     # full size, 1024², 8 steps, batch 1, 100 tokens
    python benchmarks/gpu_suite.py --tiny --device cpu --out DIR  # the whole script end to end on a small config

Random weights (bf16, and fp8 storage), shared by the three implementations (ComfyUI's names are ours; diffusers
gets q/k/v as views of our fused qkv), so no run pays for a second copy. Sections, each reported on its own (one
failing section does not hide the others): resident 8-step loops (ours, native, diffusers; per step, per image,
peak VRAM, and the outputs' agreement), our sampler end to end, attention backends, VRAM budgets 12/8/6 GB
(time vs resident, peak vs budget, bytes streamed per step, step-to-step evenness) with diffusers' offloading as
the baseline, weight-only fp8, the text encoder for one prompt, and VAE decodes at 1024² and 2048² (tiled and not).

ComfyUI's ``comfy`` package is imported from ``--comfy`` (or $COMFYUI_PATH), diffusers and transformers from the
environment; a missing one skips its rows with a note. Writes ``gpu_suite.json`` and ``gpu_suite.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from bench_offload import build, diffusers_model, loop, theirs  # noqa: E402

import zimage_core as zc  # noqa: E402
from zimage_core.offload import GB, offload  # noqa: E402
from zimage_core.transformer import ZImageConfig  # noqa: E402

R: dict = {}  # every figure, written as JSON after each section
# small, but with the sizes native NextDiT derives from dim (FFN 8/3·dim rounded up to 256, time MLP min(dim, 1024))
TINY = ZImageConfig(dim=256, n_layers=3, n_noise_refiner=2, n_context_refiner=2, head_dim=64, ffn_hidden=768, t_hidden=256,
                    axes_dims=(16, 24, 24))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def timed(ctx, f, repeats: int = 5) -> float:
    """Median seconds of ``f()`` after one warm-up call, synchronised around each call."""
    with torch.inference_mode():
        f()
        ts = []
        for _ in range(repeats):
            ctx.sync()
            t0 = time.perf_counter()
            f()
            ctx.sync()
            ts.append(time.perf_counter() - t0)
    return median(ts)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def unevenness(steps: list[float]) -> float:
    """Largest ratio of a step to the median of its neighbours (after the warm-up step); 1.0 = perfectly even."""
    s = steps[1:]
    worst = 1.0
    for i, v in enumerate(s):
        nb = s[max(0, i - 1) : i] + s[i + 1 : i + 2]
        if nb:
            worst = max(worst, v / median(nb))
    return worst


class Ctx:
    def __init__(self, a):
        self.dev = torch.device(a.device)
        self.cuda = self.dev.type == "cuda"
        self.size, self.steps, self.tokens = a.size, a.steps, a.tokens
        self.cfg = TINY if a.tiny else ZImageConfig()
        self.tiny = a.tiny
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(1, 16, a.size // 8, a.size // 8, generator=g).to(self.dev)
        self.cap = torch.randn(a.tokens, self.cfg.cap_feat_dim, generator=g).to(self.dev, torch.bfloat16)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def reset_peak(self):
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.dev) / GB if self.cuda else None


# ---- the three implementations on one set of weights ---------------------------------------------------

def native_model(model):
    """ComfyUI's NextDiT with Z-Image's settings (as comfy/model_detection.py sets them for dim 3840), our tensors."""
    import comfy.ldm.lumina.model as lumina
    import comfy.ops

    c = model.cfg
    with torch.device("meta"):
        net = lumina.NextDiT(patch_size=c.patch_size, in_channels=c.in_channels, dim=c.dim, n_layers=c.n_layers,
                             n_refiner_layers=c.n_noise_refiner, n_heads=c.n_heads, n_kv_heads=c.n_heads, multiple_of=256,
                             ffn_dim_multiplier=8.0 / 3.0, norm_eps=c.norm_eps, qk_norm=True, cap_feat_dim=c.cap_feat_dim,
                             axes_dims=list(c.axes_dims), axes_lens=[1536, 512, 512], rope_theta=c.rope_theta,
                             z_image_modulation=True, time_scale=c.t_scale, pad_tokens_multiple=32,
                             dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
    missing, unexpected = net.load_state_dict(model.state_dict(), strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"native NextDiT names differ: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return net.eval()


def callers(ctx, model, native, ref):
    """(name, call(x, model_time)) in our convention: the raw prediction x0 − noise."""
    caps, ctxt = [ctx.cap], ctx.cap[None]
    out = [("ours", lambda x, t: model(x.to(torch.bfloat16), t, caps))]
    if native is not None:  # native takes σ = 1 − t and returns the velocity noise − x0
        out.append(("comfyui_native", lambda x, t: -native(x.to(torch.bfloat16), 1.0 - t, ctxt, ctxt.shape[1])))
    if ref is not None:
        out.append(("diffusers", lambda x, t: torch.stack(ref(list(x.to(torch.bfloat16).unsqueeze(2)), t, caps,
                                                              return_dict=False)[0]).squeeze(2)))
    return out


def interleaved(ctx, impls, x, repeats, peaks: dict | None = None) -> dict[str, list[float]]:
    """Per implementation, each step's median seconds over ``repeats`` rounds of the 8-step loop, the
    implementations interleaved, after a warm-up round; ``peaks`` (if given) gets each one's peak GB."""
    runs = {n: [] for n, _ in impls}
    with torch.inference_mode():
        for _ in range(repeats + 1):
            for n, f in impls:
                if peaks is not None:
                    ctx.reset_peak()
                runs[n].append(loop(f, x, ctx.steps, ctx.sync, per_step=True))
                if peaks is not None:
                    peaks[n] = ctx.peak_gb()
    return {n: [median([r[i] for r in rs[1:]]) for i in range(ctx.steps)] for n, rs in runs.items()}


def section_resident(ctx, model, a):
    notes = []
    native = ref = None
    if not a.skip_native:
        try:
            native = native_model(model)
        except Exception as e:  # noqa: BLE001 — report and go on
            notes.append(f"native skipped: {type(e).__name__}: {e}")
    try:
        ref = diffusers_model(model)
    except Exception as e:  # noqa: BLE001
        notes.append(f"diffusers skipped: {type(e).__name__}: {e}")
    impls = callers(ctx, model, native, ref)
    # agreement on one forward (bf16; the three implementations' rounding differs, not their math)
    t = torch.tensor([0.5], device=ctx.dev)
    with torch.inference_mode():
        outs = {n: f(ctx.x, t).float() for n, f in impls}
    agree = {n: rel(o, outs["ours"]) for n, o in outs.items() if n != "ours"}
    peaks = {}
    rows = {n: {"per_step_s": per_step, "image_s": sum(per_step), "step_s": median(per_step[1:]),
                "unevenness": unevenness(per_step)}
            for n, per_step in interleaved(ctx, impls, ctx.x, a.repeats, peaks).items()}
    for n, r in rows.items():
        r["peak_gb"] = peaks[n]
    base = rows["ours"]["image_s"]
    for r in rows.values():
        r["ours_over_this"] = base / r["image_s"]
    R["resident"] = {"rows": rows, "agreement_rel_to_ours": agree, "notes": notes}
    if ctx.cuda:
        try:
            R["profile"] = {n: kernel_table(ctx, f) for n, f in impls[:2]}
        except Exception as e:  # noqa: BLE001 — the profile is a bonus
            notes.append(f"profile failed: {type(e).__name__}: {e}")
    section_backends(ctx, model)
    section_sampler(ctx, model)
    del native, ref, impls
    gc.collect()


def kernel_table(ctx, f, top: int = 12) -> list[dict]:
    """The GPU kernels of one forward, by total device time (where the time goes, and what native does differently)."""
    from torch.profiler import ProfilerActivity, profile

    t = torch.tensor([0.5], device=ctx.dev)
    with torch.inference_mode():
        f(ctx.x, t)
        ctx.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            f(ctx.x, t)
            ctx.sync()
    rows = [(e.key, e.device_time_total, e.count) for e in prof.key_averages()]
    total = sum(r[1] for r in rows) or 1
    rows.sort(key=lambda r: -r[1])
    return [{"kernel": k[:90], "ms": us / 1e3, "share": us / total, "calls": c} for k, us, c in rows[:top]] + [
        {"kernel": "TOTAL", "ms": total / 1e3, "share": 1.0, "calls": sum(r[2] for r in rows)}]


def sampler_times(ctx, model, noise) -> list[float]:
    """Our sampler end to end (schedule, Euler in fp32, callbacks), seconds per image, three images of 8 Turbo steps."""
    times = []
    for _ in range(3):
        ctx.sync()
        t0 = time.perf_counter()
        zc.sample(model, noise, [ctx.cap], sigmas=zc.sigmas(ctx.steps))
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return times


def section_sampler(ctx, model):
    times = sampler_times(ctx, model, ctx.x.float())
    R["sampler"] = {"image_s": median(times[1:]), "all_s": times}


def section_backends(ctx, model):
    """One forward per attention backend we offer, and per SDPA kernel PyTorch has on this device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zimage_core.attention import available_backends

    t = torch.tensor([0.5], device=ctx.dev)
    f = lambda: model(ctx.x.to(torch.bfloat16), t, [ctx.cap])  # noqa: E731
    out = {"available": available_backends()}

    for name in out["available"]:
        model.set_attention_backend(name)
        try:
            out[name] = timed(ctx, f)
        except Exception as e:  # noqa: BLE001
            out[name] = f"failed: {type(e).__name__}: {e}"
    model.set_attention_backend("sdpa")
    for k in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, k)):
                out[f"sdpa[{k.lower()}]"] = timed(ctx, f)
        except Exception as e:  # noqa: BLE001
            out[f"sdpa[{k.lower()}]"] = f"unavailable: {type(e).__name__}"
    R["attention_forward_s"] = out


def section_offload(ctx, model, label, budgets, resident_image_s):
    rows = []
    for b in budgets:
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
        st = offload(model, mode="budget", budget_gb=float(b), device=ctx.dev, width=ctx.size, height=ctx.size)
        ctx.reset_peak()  # after attaching: a model that was resident before is not part of this budget's peak
        # what else the process still holds on the device (earlier sections' leftovers) is not this plan's: the
        # H100 run's first budget read 0.9 GB over its plan this way, while a fresh process peaked 0.15 GB under it
        other = (torch.cuda.memory_allocated(ctx.dev) - st.ledger.now) / GB if ctx.cuda else 0.0
        st.copied_bytes = 0
        with torch.inference_mode():
            steps = loop(lambda x, t: model(x.to(torch.bfloat16), t, [ctx.cap]), ctx.x, ctx.steps, ctx.sync, per_step=True)
        rows.append({"budget_gb": b, "plan": st.plan.describe(), "peak_gb": ctx.peak_gb() - other if ctx.cuda else ctx.peak_gb(),
                     "other_allocated_gb": other,
                     "per_step_s": steps, "image_s": sum(steps), "ratio_to_resident": sum(steps) / resident_image_s,
                     "streamed_gb_per_step": st.copied_bytes / ctx.steps / GB, "unevenness": unevenness(steps),
                     "ledger_peak_gb": st.ledger.peak / GB, "planned_peak_gb": st.plan.peak_bytes / GB})
        st.detach()
        R.setdefault("offload", {})[label] = rows
        write(ctx)


def section_diffusers_offload(ctx, model, resident_image_s):
    rows = {}
    for kind in ("model_cpu_offload", "group_offload_streams", "sequential_cpu_offload"):
        steps = 3 if kind == "sequential_cpu_offload" else ctx.steps
        try:
            sps, peak = theirs(kind, model, ctx.x, [ctx.cap], steps, ctx.sync, ctx.dev)
            rows[kind] = {"step_s": sps, "peak_gb": peak, "steps_run": steps,
                          "image_s_equiv": sps * ctx.steps, "ratio_to_our_resident": sps * ctx.steps / resident_image_s}
        except Exception as e:  # noqa: BLE001
            rows[kind] = {"error": f"{type(e).__name__}: {e}"}
        gc.collect()
        torch.cuda.empty_cache()
    R["diffusers_offload"] = rows


def eager_blocks(model) -> None:
    """Undo ``compile_blocks``: every block back to its eager forward (the compiled code is dropped)."""
    for b in model.blocks():
        b._compiled_call_impl = None


def section_compile(ctx, model, a, eager_image_s):
    """Regional compilation (each block compiled once per shape, as ComfyUI's TorchCompileModel does it)."""
    model.to(ctx.dev)
    model.compile_blocks(dynamic=False)
    f = lambda x, t: model(x.to(torch.bfloat16), t, [ctx.cap])  # noqa: E731
    t0 = time.perf_counter()
    with torch.inference_mode():
        first = loop(f, ctx.x, ctx.steps, ctx.sync, per_step=True)  # includes compiling
        compile_s = time.perf_counter() - t0
        runs = [loop(f, ctx.x, ctx.steps, ctx.sync, per_step=True) for _ in range(a.repeats)]
        t = torch.tensor([0.5], device=ctx.dev)
        out = f(ctx.x, t).float()
    per_step = [median([r[i] for r in runs]) for i in range(ctx.steps)]
    eager_blocks(model)
    with torch.inference_mode():
        ref = f(ctx.x, t).float()
    R["compile"] = {"first_image_s_incl_compile": sum(first), "compile_wall_s": compile_s, "image_s": sum(per_step),
                    "ratio_to_eager": sum(per_step) / eager_image_s, "rel_to_eager": rel(out, ref)}
    native = R.get("resident", {}).get("rows", {}).get("comfyui_native")
    if native:
        R["compile"]["ratio_to_native_eager"] = sum(per_step) / native["image_s"]


def section_graphs(ctx, model, a):
    """CUDA graphs of the whole forward (cuda_graphs.py) against our eager forward and native eager, interleaved,
    at the run's size, 768² and 512²: per step, the capture's cost, the memory its pool holds, and the agreement."""
    from zimage_core.cuda_graphs import Fingerprint

    model.to(ctx.dev)
    native = None
    if not a.skip_native:
        try:
            native = native_model(model)
        except Exception as e:  # noqa: BLE001 — report and go on
            R.setdefault("graphs_notes", []).append(f"native skipped: {type(e).__name__}: {e}")
    out = {}
    for size in dict.fromkeys((a.size, 768, 512)):
        x = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(1)).to(ctx.dev)
        eager = lambda x, t: model.forward_eager(x.to(torch.bfloat16), t, [ctx.cap])  # noqa: E731
        impls = [("eager", eager)]
        if native is not None:
            impls.append(("native", dict(callers(ctx, model, native, None))["comfyui_native"]))
        model.use_cuda_graphs()
        g = model.cuda_graphs
        graphed = lambda x, t: model(x.to(torch.bfloat16), t, [ctx.cap])  # noqa: E731
        impls.append(("graphs", graphed))
        ctx.reset_peak()  # empties the cache: what stays reserved after the capture is the graph's pool
        reserved0 = torch.cuda.memory_reserved(ctx.dev) if ctx.cuda else 0
        t = torch.tensor([0.5], device=ctx.dev)
        with torch.inference_mode():
            capture_s = timed(ctx, lambda: graphed(x, t), repeats=1)  # an eager call, then the capturing one
            ref = eager(x, t).float()
            got = graphed(x, t).float()
        if ctx.cuda:
            torch.cuda.empty_cache()
        pool_gb = ((torch.cuda.memory_reserved(ctx.dev) if ctx.cuda else 0) - reserved0) / GB
        res = {n: {"image_s": sum(per_step), "step_s": median(per_step[1:])}
               for n, per_step in interleaved(ctx, impls, x, a.repeats).items()}
        fingerprint = Fingerprint(model)
        res["graphs"].update(ratio_to_eager=res["graphs"]["image_s"] / res["eager"]["image_s"],
                             rel_to_eager=rel(got, ref), captures=g.captures, replays=g.replays,
                             capture_call_s=capture_s, pool_gb=pool_gb,
                             fingerprint_ms=1e3 * min(timed(ctx, fingerprint, 1) for _ in range(5)))
        if size == a.size:  # our sampler end to end with graphs on (schedule, Euler, callbacks), as in section_sampler
            res["graphs"]["sampler_image_s"] = median(sampler_times(ctx, model, x.float())[1:])
        if "native" in res:
            res["graphs"]["ratio_to_native_eager"] = res["graphs"]["image_s"] / res["native"]["image_s"]
            res["eager"]["ratio_to_native_eager"] = res["eager"]["image_s"] / res["native"]["image_s"]
        out[str(size)] = res
        model.use_cuda_graphs(False)
        R["graphs"] = out
    native = None  # noqa: F841 (its tensors are ours; only the module goes)
    gc.collect()


def section_graphs_compiled(ctx, model, a):
    """The loader's compile and cuda_graphs together: compiled blocks, eager and replayed as one graph, interleaved,
    at the run's size and 512² (each size compiles once, untimed)."""
    model.to(ctx.dev)
    model.compile_blocks(dynamic=False)
    out = {}
    try:
        for size in dict.fromkeys((a.size, 512)):
            x = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(1)).to(ctx.dev)
            model.use_cuda_graphs()
            impls = [("compiled", lambda x, t: model.forward_eager(x.to(torch.bfloat16), t, [ctx.cap])),
                     ("compiled_graphs", lambda x, t: model(x.to(torch.bfloat16), t, [ctx.cap]))]
            t = torch.tensor([0.5], device=ctx.dev)
            with torch.inference_mode():
                t0 = time.perf_counter()
                for _ in range(3):  # compile, then the graph's eager call and capture
                    ref, got = impls[0][1](x, t).float(), impls[1][1](x, t).float()
                warm_s = time.perf_counter() - t0
            res = {n: {"image_s": sum(per_step)} for n, per_step in interleaved(ctx, impls, x, a.repeats).items()}
            res["compiled_graphs"].update(ratio_to_compiled=res["compiled_graphs"]["image_s"] / res["compiled"]["image_s"],
                                          rel_to_compiled=rel(got, ref), captures=model.cuda_graphs.captures, warm_s=warm_s)
            eager = R.get("graphs", {}).get(str(size), {}).get("eager")
            if eager:
                for r in res.values():
                    r["ratio_to_our_eager"] = r["image_s"] / eager["image_s"]
            out[str(size)] = res
            R["graphs_compiled"] = out
    finally:
        model.use_cuda_graphs(False)
        eager_blocks(model)


def section_fp8(ctx, a, bf16_image_s):
    model = build(ctx.cfg, fp8=True, device=ctx.dev)
    ctx.reset_peak()
    with torch.inference_mode():
        loop(lambda x, t: model(x.to(torch.bfloat16), t, [ctx.cap]), ctx.x, ctx.steps, ctx.sync)  # warm-up
        runs = [loop(lambda x, t: model(x.to(torch.bfloat16), t, [ctx.cap]), ctx.x, ctx.steps, ctx.sync, per_step=True)
                for _ in range(a.repeats)]
    per_step = [median([r[i] for r in runs]) for i in range(ctx.steps)]
    R["fp8"] = {"weights_gb": zc.offload.module_bytes(model) / GB, "image_s": sum(per_step), "peak_gb": ctx.peak_gb(),
                "ratio_to_bf16": sum(per_step) / bf16_image_s}
    write(ctx)
    model.to("cpu")
    gc.collect()
    section_offload(ctx, model, "fp8", a.fp8_budgets.split(","), sum(per_step))
    model = None  # noqa: F841 (frees the weights before the next section)
    gc.collect()


def section_text_encoder(ctx, a):
    from zimage_core.text_encoder import Qwen3Config, Qwen3PromptEncoder

    if ctx.tiny:
        cfg = Qwen3Config(hidden=256, n_layers_file=3, n_heads=4, n_kv_heads=2, head_dim=64, intermediate=512, vocab=1000)
    else:
        cfg = Qwen3Config(hidden=2560, n_layers_file=36, n_heads=32, n_kv_heads=8, head_dim=128, intermediate=9728, vocab=151936)
    with torch.device(ctx.dev):
        te = Qwen3PromptEncoder(cfg, dtype=torch.bfloat16)
    for n, p in te.named_parameters():
        p.data = (torch.ones_like(p) if "norm" in n else torch.randn_like(p, dtype=torch.float32) * 0.02).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab, (1, a.tokens), device=ctx.dev)

    ctx.reset_peak()
    out = {"ours_s": timed(ctx, lambda: te(ids)), "ours_peak_gb": ctx.peak_gb(), "tokens": a.tokens}
    te = None  # noqa: F841
    gc.collect()
    try:
        from transformers import Qwen3Config as HFConfig
        from transformers import Qwen3Model

        hf = HFConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                      num_hidden_layers=cfg.n_layers_file, num_attention_heads=cfg.n_heads,
                      num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rope_theta=1e6, rms_norm_eps=1e-6)
        with torch.device(ctx.dev):
            ref = Qwen3Model(hf).to(torch.bfloat16).eval()
        ctx.reset_peak()
        # as diffusers' ZImagePipeline.encode_prompt: every layer, hidden_states[-2]
        out["transformers_s"] = timed(ctx, lambda: ref(input_ids=ids, output_hidden_states=True).hidden_states[-2])
        out["transformers_peak_gb"] = ctx.peak_gb()
        out["ours_over_transformers"] = out["ours_s"] / out["transformers_s"]
        ref = None  # noqa: F841
    except Exception as e:  # noqa: BLE001
        out["transformers"] = f"skipped: {type(e).__name__}: {e}"
    gc.collect()
    R["text_encoder"] = out


def section_vae(ctx):
    from zimage_core.autoencoder import AutoEncoder

    chs, groups = ([32, 64], 8) if ctx.tiny else ([128, 256, 512, 512], 32)
    with torch.device(ctx.dev):
        vae = AutoEncoder(chs, 2, 16, groups, dtype=torch.bfloat16)
    for n, p in vae.named_parameters():
        p.data = (torch.ones_like(p) if "norm" in n and n.endswith("weight") else torch.randn_like(p) * 0.02).to(torch.bfloat16)
    rows = []
    f = vae.factor
    for size in ((128, 256) if ctx.tiny else (1024, 2048)):
        z = torch.randn(1, 16, size // f, size // f, device=ctx.dev)
        for tile in (None, 512) if not ctx.tiny else (None, 64):
            try:
                vae.decode(z, tile=tile)  # warm-up
                ctx.reset_peak()
                ctx.sync()
                t0 = time.perf_counter()
                vae.decode(z, tile=tile)
                ctx.sync()
                rows.append({"size": size, "tile": tile, "s": time.perf_counter() - t0, "peak_gb": ctx.peak_gb()})
            except Exception as e:  # noqa: BLE001
                rows.append({"size": size, "tile": tile, "error": f"{type(e).__name__}: {e}"})
    R["vae_decode"] = rows
    del vae
    gc.collect()


# ---- report ------------------------------------------------------------------------------------------------

def markdown() -> str:
    L = [f"# GPU suite — {R['env']['device']}", "", "| | |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in R["env"].items()]
    f = lambda v, d=3: f"{v:.{d}f}" if isinstance(v, (int, float)) else ("–" if v is None else str(v))  # noqa: E731
    if "resident" in R:
        L += ["", "## Resident, 8 steps (DiT only)", "", "| implementation | s/image | s/step | peak GB | ours ÷ this | step unevenness |",
              "|---|---|---|---|---|---|"]
        for n, r in R["resident"]["rows"].items():
            L.append(f"| {n} | {f(r['image_s'])} | {f(r['step_s'])} | {f(r['peak_gb'], 2)} | {f(r['ours_over_this'])} | {f(r['unevenness'])} |")
        L += ["", f"Agreement with ours (relative L2, bf16): {R['resident']['agreement_rel_to_ours']}"]
        L += [f"Note: {n}" for n in R["resident"]["notes"]]
    for n, rows in R.get("profile", {}).items():
        L += ["", f"### Kernels of one forward: {n}", "", "| kernel | ms | share | calls |", "|---|---|---|---|"]
        L += [f"| `{r['kernel']}` | {f(r['ms'])} | {f(r['share'])} | {r['calls']} |" for r in rows]
    if "sampler" in R:
        L += ["", f"Our sampler end to end (zc.sample, 8 steps): {f(R['sampler']['image_s'])} s/image"]
    if "attention_forward_s" in R:
        L += ["", "## One forward per attention backend (s)", ""] + [f"- {k}: {f(v, 4)}" for k, v in R["attention_forward_s"].items()]
    for label, rows in R.get("offload", {}).items():
        L += ["", f"## Ours under a VRAM budget ({label})", "",
              "| budget GB | s/image | × resident | peak GB | planned peak GB | streamed GB/step | unevenness | plan |",
              "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            L.append(f"| {r['budget_gb']} | {f(r['image_s'])} | {f(r['ratio_to_resident'], 2)} | {f(r['peak_gb'], 2)} | "
                     f"{f(r.get('planned_peak_gb'), 2)} | "
                     f"{f(r['streamed_gb_per_step'], 2)} | {f(r['unevenness'])} | {r['plan']} |")
    if "diffusers_offload" in R:
        L += ["", "## diffusers offloading, same weights", "", "| method | s/step | peak GB | 8-step image ÷ our resident |", "|---|---|---|---|"]
        for k, r in R["diffusers_offload"].items():
            L.append(f"| {k} | {f(r.get('step_s'))} | {f(r.get('peak_gb'), 2)} | {f(r.get('ratio_to_our_resident'), 2)} |"
                     if "error" not in r else f"| {k} | {r['error']} | | |")
    if "compile" in R:
        L += ["", "## Ours compiled (torch.compile per block)", ""] + [f"- {k}: {f(v)}" for k, v in R["compile"].items()]
    for size, res in R.get("graphs", {}).items():
        L += ["", f"## CUDA graphs of the forward, {size}², 8 steps", "", "| | s/image | s/step |", "|---|---|---|"]
        L += [f"| {n} | {f(r['image_s'])} | {f(r['step_s'], 4)} |" for n, r in res.items()]
        L += [""] + [f"- {k}: {f(v, 4)}" for k, v in res["graphs"].items() if k not in ("image_s", "step_s")]
    L += [f"Note: {n}" for n in R.get("graphs_notes", [])]
    for size, res in R.get("graphs_compiled", {}).items():
        L += ["", f"## Compiled blocks, eager and as CUDA graphs, {size}²", ""]
        L += [f"- {n}: " + ", ".join(f"{k} {f(v, 4)}" for k, v in r.items()) for n, r in res.items()]
    if "fp8" in R:
        r = R["fp8"]
        L += ["", f"## Weight-only fp8: {f(r['weights_gb'], 2)} GB of weights, {f(r['image_s'])} s/image, "
                  f"×{f(r['ratio_to_bf16'])} of bf16, peak {f(r['peak_gb'], 2)} GB"]
    if "text_encoder" in R:
        L += ["", "## Text encoder, one prompt", ""] + [f"- {k}: {f(v, 4)}" for k, v in R["text_encoder"].items()]
    if "vae_decode" in R:
        L += ["", "## VAE decode", "", "| size | tile | s | peak GB |", "|---|---|---|---|"]
        L += [f"| {r['size']} | {r['tile']} | {f(r.get('s'))} | {f(r.get('peak_gb'), 2)} |" if "error" not in r
              else f"| {r['size']} | {r['tile']} | {r['error']} | |" for r in R["vae_decode"]]
    if R.get("errors"):
        L += ["", "## Sections that failed", ""] + [f"- {e}" for e in R["errors"]]
    return "\n".join(L) + "\n"


def write(ctx):
    os.makedirs(ctx.out, exist_ok=True)
    with open(os.path.join(ctx.out, "gpu_suite.json"), "w") as fh:
        json.dump(R, fh, indent=1, default=str)
    with open(os.path.join(ctx.out, "gpu_suite.md"), "w") as fh:
        fh.write(markdown())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_suite_out"))
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), help="folder holding ComfyUI's comfy/ package")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budgets", default="12,8,6")
    ap.add_argument("--fp8-budgets", default="6")
    ap.add_argument("--sections", default="resident,offload,diffusers_offload,graphs,graphs_compiled,compile,fp8,text_encoder,vae")
    ap.add_argument("--skip-native", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="small config, to check the script on any machine")
    a = ap.parse_args()
    if a.tiny:
        a.size, a.budgets, a.fp8_budgets = min(a.size, 256), "0.05,0.03", "0.02"
    if a.comfy:
        sys.path.insert(0, a.comfy)
        if a.device == "cpu":  # ComfyUI's memory manager assumes CUDA unless told otherwise (its --cpu flag)
            try:
                from comfy.cli_args import args as comfy_args

                comfy_args.cpu = True
            except ImportError:
                pass
    ctx = Ctx(a)
    ctx.out = a.out
    name = torch.cuda.get_device_name(ctx.dev) if ctx.cuda else "CPU"
    R["env"] = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.date.today().isoformat(),
                "config": "tiny" if a.tiny else "full Z-Image-Turbo (6.15 B)", "size": a.size, "steps": a.steps,
                "caption_tokens": a.tokens, "batch": 1}
    R["errors"] = []
    sections = a.sections.split(",")
    t_start = time.perf_counter()
    model = build(ctx.cfg, fp8=False, device=ctx.dev)
    R["env"]["weights_gb"] = zc.offload.module_bytes(model) / GB
    resident_s = None

    def run(name, fn):
        if name not in sections:
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 — one failing section must not hide the others
            R["errors"].append(f"{name}: {type(e).__name__}: {e}")
            traceback.print_exc()
        R.setdefault("section_s", {})[name] = time.perf_counter() - t0
        write(ctx)
        print(f"[{time.perf_counter() - t_start:7.1f} s] {name} done", flush=True)

    run("resident", lambda: section_resident(ctx, model, a))
    resident_s = R.get("resident", {}).get("rows", {}).get("ours", {}).get("image_s")
    if resident_s is None:  # offload ratios need a resident time: measure ours alone
        with torch.inference_mode():
            resident_s = sum(loop(lambda x, t: model(x.to(torch.bfloat16), t, [ctx.cap]), ctx.x, ctx.steps, ctx.sync, per_step=True))
    run("offload", lambda: section_offload(ctx, model, "bf16", a.budgets.split(","), resident_s))
    if ctx.cuda:
        run("diffusers_offload", lambda: section_diffusers_offload(ctx, model, resident_s))
    run("graphs", lambda: section_graphs(ctx, model, a))
    run("graphs_compiled", lambda: section_graphs_compiled(ctx, model, a))
    run("compile", lambda: section_compile(ctx, model, a, resident_s))
    model = None  # noqa: F841 (frees the weights before the next section)
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    run("fp8", lambda: section_fp8(ctx, a, resident_s))
    run("text_encoder", lambda: section_text_encoder(ctx, a))
    run("vae", lambda: section_vae(ctx))
    R["env"]["total_s"] = time.perf_counter() - t_start
    write(ctx)
    print(markdown())


if __name__ == "__main__":
    main()
