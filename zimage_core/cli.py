"""``python -m zimage_core generate …`` — the standalone pipeline; ``download`` fetches the weights; ``enhance``
rewrites a prompt with the text encoder's Qwen3-4B; ``info FILE`` tells what a weight file is."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict

import torch

from . import precision
from .errors import ZImageError
from .images import crop_box, prepare_reference_image
from .loader import COMPUTE_DTYPES
from .offload import MODES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zimage_core", description="Z-Image-Turbo / Z-Image in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text-to-image, image-to-image and inpainting to PNG files")
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--negative-prompt", "-n", default="")
    g.add_argument("--preset", choices=["turbo", "base"], default="turbo",
                   help="turbo: 8 steps, no CFG; base: 28 steps, CFG 4 (ComfyUI convention, 1 = off)")
    g.add_argument("--width", type=int, default=None, help="multiple of 16 (default 1024, or the init image's width)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--cfg", type=float, default=None, help="guidance, ComfyUI convention: 1 = off; diffusers' guidance_scale g = cfg − 1")
    g.add_argument("--cfg-normalization", type=float, default=0.0, help="cap ‖guided‖ at k·‖conditional‖ (0 = off)")
    g.add_argument("--cfg-truncation", type=float, default=1.0, help="no guidance once model time exceeds this (1 = never)")
    g.add_argument("--shift", type=float, default=3.0)
    g.add_argument("--seed", type=int, default=0, help="same seed → same noise as ComfyUI's samplers")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--init-image", help="image for image-to-image / inpainting")
    g.add_argument("--strength", type=float, default=0.6, help="image-to-image strength (with --init-image)")
    g.add_argument("--mask", help="inpainting mask, white = regenerate (with --init-image)")
    g.add_argument("--reference", action="append", default=[], metavar="IMAGE",
                   help="reference image for instruction editing (Omni/Edit scheme; up to 3; target size = the last one's)")
    g.add_argument("--control", action="append", default=[], metavar="IMAGE[:STRENGTH]",
                   help="a preprocessed control image (canny, depth, pose, HED, gray, tile…) for --control-model; strength "
                        "default 0.75 (repeatable: one per --control-model, or all for one model)")
    g.add_argument("--control-model", action="append", default=[], metavar="FILE",
                   help="a Fun ControlNet Union file (v1, 2.0, 2.1, lite, tile; from alibaba-pai). With a 2.x model, "
                        "--init-image and --mask also feed its inpainting input")
    g.add_argument("--output", "-o", default="zimage.png", help="PNG path; a batch gets _00001… suffixes")
    g.add_argument("--models", help="a ComfyUI models/ folder (diffusion_models, text_encoders, vae); default: "
                                    "$COMFYUI_PATH/models, ~/ComfyUI/models, else ~/.cache/zimage/models")
    g.add_argument("--download", nargs="?", const="bf16", metavar="FORMAT",
                   help="first fetch the --preset's weights into --models (what `download` does; bf16 unless FORMAT)")
    g.add_argument("--hf", help="an HF-layout Z-Image folder (transformer/, text_encoder/, tokenizer/, vae/)")
    g.add_argument("--transformer")
    g.add_argument("--text-encoder")
    g.add_argument("--vae")
    g.add_argument("--tokenizer", help="folder with the Qwen tokenizer files (vocab.json, merges.txt)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE:STRENGTH", help="apply a LoRA (repeatable)")
    g.add_argument("--dtype", choices=["auto", *COMPUTE_DTYPES], default="auto",
                   help="compute dtype; auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU")
    g.add_argument("--fp8", action="store_true", help="store the transformer's weights in fp8 (half the memory)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer's blocks (the first step compiles, later steps run faster)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay each step's transformer forward as one CUDA graph (NVIDIA GPU, transformer resident)")
    g.add_argument("--offload", choices=MODES, default="auto",
                   help="GPU memory plan: auto fits free VRAM, budget uses --vram-budget, resident keeps all, min_vram streams all")
    g.add_argument("--vram-budget", type=float, default=None, help="GB of VRAM to use with --offload budget")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--vae-tile", type=int, default=None, help="exact tiled VAE encode/decode with tiles of this many pixels (low memory, no seams)")
    g.add_argument("--enhance", action="store_true", help="rewrite the prompt into a detailed caption first (see 'enhance')")
    g.add_argument("--variety", type=float, default=0.0,
                   help="seed variety: noise on the prompt for the first steps, relative to each token (0 = off; 0.3-0.6 for Turbo)")
    g.add_argument("--variety-fraction", type=float, default=0.3, help="part of the schedule that sees the varied prompt")
    e = sub.add_parser("enhance", help="rewrite a short prompt into a detailed Z-Image caption with the Qwen3-4B text encoder")
    e.add_argument("--prompt", "-p", required=True)
    e.add_argument("--text-encoder", help="qwen_3_4b*.safetensors or an HF folder (default: from --models/--hf)")
    e.add_argument("--models", help="a ComfyUI models/ folder")
    e.add_argument("--hf", help="an HF-layout Z-Image folder")
    e.add_argument("--tokenizer", help="folder with the Qwen tokenizer files")
    e.add_argument("--dtype", choices=list(COMPUTE_DTYPES), default="bf16")
    e.add_argument("--fp8", action="store_true", help="store the weights in fp8")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--offload", choices=MODES, default="auto")
    e.add_argument("--vram-budget", type=float, default=None)
    for p_ in (g, e):
        p_.add_argument("--temperature", type=float, default=0.7, help="enhancer sampling temperature (0 = greedy)")
        p_.add_argument("--top-p", type=float, default=0.8)
        p_.add_argument("--top-k", type=int, default=20)
        p_.add_argument("--max-tokens", type=int, default=400, help="longest enhanced caption in tokens")
        p_.add_argument("--system-prompt", default=None, help="enhancer instructions (default: ours for Z-Image; '' = none)")
        p_.add_argument("--enhance-seed", type=int, default=None, help="seed of the enhancer's sampling (default: --seed)")
    e.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("download", help="fetch the weights from Hugging Face into a ComfyUI models folder")
    d.add_argument("model", nargs="?", choices=["turbo", "base"], default="turbo")
    d.add_argument("--format", default="bf16",
                   help="bf16 (default; about 21 GB), int8 (Turbo only: ComfyUI's int8 ConvRot DiT and fp8-mixed Qwen3-4B), "
                        "or gguf-<quant> such as gguf-q8_0, gguf-q4_k_m (community GGUF files of the DiT and Qwen3-4B)")
    d.add_argument("--hf", action="store_true",
                   help="the Tongyi-MAI diffusers folder instead, into MODELS_DIR/diffusion_models/Z-Image(-Turbo)/")
    d.add_argument("--to", metavar="MODELS_DIR", help="default: $COMFYUI_PATH/models, ~/ComfyUI/models, else ~/.cache/zimage/models")
    i = sub.add_parser("info", help="describe a weight file or folder")
    i.add_argument("path")
    return p


def _png_info(settings, extra: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    s = settings
    info.add_text("parameters", f"{s.prompt}\nNegative prompt: {s.negative_prompt}\nSteps: {s.steps}, CFG: {s.cfg}, "
                                f"Shift: {s.shift}, Seed: {s.seed}, Size: {s.width}x{s.height}, Model: Z-Image ({s.preset})")
    info.add_text("zimage", json.dumps({**asdict(s), **extra}))
    return info


def parse_control(spec: str) -> tuple[str, float]:
    """'IMAGE[:STRENGTH]' → (path, strength); a path may itself hold colons (C:\\…)."""
    path, _, tail = spec.rpartition(":")
    try:
        return (path, float(tail)) if path else (spec, 0.75)
    except ValueError:
        return spec, 0.75


def _controls(a, pipe, init, mask) -> list:
    from PIL import Image

    from .controlnet import ControlImage, load_controlnet

    if not a.control_model:
        if a.control:
            raise ZImageError("--control needs --control-model (a Fun ControlNet Union file).")
        return []
    specs = [parse_control(c) for c in a.control]
    if len(a.control_model) not in (1, len(specs)) and specs:
        raise ZImageError(f"{len(specs)} --control images for {len(a.control_model)} --control-model files; give one "
                          "model for all, or one per image.")
    models = [load_controlnet(p, dtype=pipe.transformer.compute_dtype) for p in a.control_model]
    if len(models) == 1:
        models = models * max(len(specs), 1)
    out = []
    for m, (img, strength) in zip(models, specs or [(None, 1.0)] * len(models)):
        inpaint = m.cfg.inpaint and init is not None
        out.append(ControlImage(m, Image.open(img).convert("RGB") if img else None, strength,
                                init if inpaint else None, mask if inpaint else None))
    return out


def generate(a) -> list[str]:
    from PIL import Image
    from tqdm import tqdm

    from .compiling import require_compile
    from .pipeline import GenerationSettings, ZImagePipeline

    if a.compile:
        require_compile(a.device, "the transformer (--compile)")  # before minutes of loading
    if a.cuda_graphs and torch.device(a.device).type != "cuda":
        raise ZImageError(f"--cuda-graphs needs an NVIDIA GPU (--device cuda), not {a.device}")
    paths = _weights(a)
    init = Image.open(a.init_image).convert("RGB") if a.init_image else None
    refs = [Image.open(p).convert("RGB") for p in a.reference]
    if refs and a.width is None and a.height is None:
        a.width, a.height = prepare_reference_image(refs[-1]).size
    mask = Image.open(a.mask) if a.mask else None
    width, height = a.width, a.height
    if init is not None and width is None and height is None:
        width, height = init.size
        if width % 16 or height % 16:
            box = crop_box(width, height)
            logging.warning("init image %dx%d is not a multiple of 16; center-cropping it to %dx%d", width, height,
                            box[2] - box[0], box[3] - box[1])
            init = init.crop(box)
            mask = mask.crop(box) if mask is not None and mask.size == (width, height) else mask
            width, height = init.size
    settings = GenerationSettings(
        prompt=a.prompt, negative_prompt=a.negative_prompt, width=width or 1024, height=height or 1024, steps=a.steps,
        cfg=a.cfg, shift=a.shift, seed=a.seed, batch_size=a.batch_size, preset=a.preset,
        strength=a.strength if init is not None else 1.0, cfg_normalization=a.cfg_normalization, cfg_truncation=a.cfg_truncation,
        variety=a.variety, variety_fraction=a.variety_fraction,
    )
    t0 = time.perf_counter()
    with tqdm(total=3, desc="loading", unit="model", disable=None) as bar:
        auto = a.dtype == "auto"
        pipe = ZImagePipeline.from_paths(paths, dtype=precision.auto_dtype(a.device) if auto else COMPUTE_DTYPES[a.dtype],
                                         device=a.device, offload=a.offload, vram_budget_gb=a.vram_budget,
                                         vae_dtype=precision.vae_dtype(a.device) if auto else None,
                                         storage_dtype=torch.float8_e4m3fn if a.fp8 else None)
        bar.update(3)
    if a.lora:
        from .lora import apply_lora_specs

        apply_lora_specs(pipe.transformer, a.lora)
    if a.compile:
        pipe.transformer.compile_blocks()
    if a.cuda_graphs:
        pipe.transformer.use_cuda_graphs()
    load_s = time.perf_counter() - t0
    if a.enhance:
        from .enhancer import load_chat

        chat = load_chat(pipe.text_encoder)
        with pipe.on_device(chat):
            settings.prompt = _enhance(chat, a)
        print(settings.prompt, file=sys.stderr)
    bar = tqdm(desc="sampling", unit="step", disable=None)

    def on_step(st):
        bar.total = st.total
        bar.update(1)

    controls = _controls(a, pipe, init, mask)
    images, _ = pipe(settings, init_image=init, mask=mask, callback=on_step, vae_tile=a.vae_tile, reference_images=refs or None,
                     controls=controls)
    bar.close()
    resolved = settings.resolved()
    out = []
    stem, ext = os.path.splitext(a.output)
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    for k, im in enumerate(images):
        path = a.output if len(images) == 1 else f"{stem}_{k + 1:05d}{ext or '.png'}"
        extra = {"batch_index": k, "transformer": paths.transformer, "text_encoder": paths.text_encoder, "vae": paths.vae,
                 "init_image": a.init_image, "mask": a.mask, "references": a.reference, "lora": a.lora, "dtype": a.dtype,
                 "control": a.control, "control_model": a.control_model}
        im.save(path, pnginfo=_png_info(resolved, extra))
        out.append(path)
    print(f"wrote {', '.join(out)} ({time.perf_counter() - t0 - load_s:.1f} s sampling, {load_s:.1f} s loading)")
    return out


def _weights(a):
    """--download fetches the preset's files first; without it a missing file names the command that gets it."""
    from .download import command, default_models_dir, ensure, files_for
    from .pipeline import find_weights

    models = a.models or (None if (a.hf or a.transformer) else default_models_dir())
    if a.download:
        if models is None:
            raise ZImageError("--download fills a models folder: use it with --models (or none), not with --hf/--transformer.")
        a.transformer, a.text_encoder, a.vae = ensure(files_for(a.preset, a.download), models)
        return find_weights(None, None, a.transformer, a.text_encoder, a.vae, a.tokenizer)
    try:
        return find_weights(models, a.hf, a.transformer, a.text_encoder, a.vae, a.tokenizer)
    except ZImageError as e:
        if models is None:
            raise
        raise ZImageError(f"{e}\nTo fetch them (about 21 GB) run\n  {command(a.preset, models)}\nor add --download to "
                          "this command.") from None


def _enhance(chat, a) -> str:
    from tqdm import tqdm

    from .enhancer import SYSTEM_PROMPT, enhance

    bar = tqdm(total=a.max_tokens, desc="enhancing", unit="token", disable=None)
    text = enhance(chat, a.prompt, system=SYSTEM_PROMPT if a.system_prompt is None else a.system_prompt or None,
                   max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                   seed=a.seed if a.enhance_seed is None else a.enhance_seed, callback=lambda n, _total, _text: bar.update(n - bar.n))
    bar.close()
    return text


def enhance_command(a) -> str:
    """Load only the text encoder (+ its last layer and head), run it on --device under the offload plan, print the caption."""
    from .download import command, default_models_dir
    from .enhancer import load_chat
    from .offload import offload
    from .pipeline import find_text_encoder
    from .text_encoder import load_text_encoder

    models = a.models or (None if (a.hf or a.text_encoder) else default_models_dir())
    path = a.text_encoder or a.hf or (find_text_encoder(models) if models else None)
    if not path:
        raise ZImageError(f"Could not find the Qwen3-4B text encoder in {models}. To fetch it (with the rest of Z-Image) run\n"
                          f"  {command('turbo', models)}\nor pass --text-encoder FILE.")
    te = load_text_encoder(path, dtype=COMPUTE_DTYPES[a.dtype], tokenizer=a.tokenizer, storage_dtype=torch.float8_e4m3fn if a.fp8 else None)
    chat = load_chat(te)
    streamer = None if a.device == "cpu" else offload(chat, mode=a.offload, budget_gb=a.vram_budget, device=a.device)
    try:
        text = _enhance(chat, a)
    finally:
        if streamer is not None:
            streamer.detach()
    print(text)
    return text


def info(path: str) -> None:
    from .detect import describe
    from .safetensors_io import open_weights

    files = open_weights(path)
    kind = describe(files.keys(), files.shape)
    from .packed import Packed

    dtypes = sorted({v.fmt.name if isinstance(v := files.meta(k), Packed) else str(v.dtype).replace("torch.", "")
                     for k in files.keys()})  # meta tensors: nothing is read
    params = sum(int(torch.Size(files.shape(k)).numel()) for k in files.keys())
    print(f"{files.path}: {kind}; {len(files.keys())} tensors, {params:,} values, stored as {', '.join(dtypes)}")
    if kind.startswith("Z-Image"):
        from .transformer import ZImageConfig
        from .transformer_files import internal_shape_fn, transformer_plan

        plan, _, layout = transformer_plan(files)
        print(f"layout: {layout}; config: {ZImageConfig.from_weights(internal_shape_fn(files, plan), list(plan))}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("zimage").setLevel(logging.INFO)  # ours, not every HTTP request of the download
    a = _parser().parse_args(argv)
    try:
        if a.command == "generate":
            generate(a)
        elif a.command == "download":
            from .download import download

            paths = download(a.model, a.format, a.to, a.hf)
            print("\n".join(["ready:", *paths] + ([f"use it with: --hf {os.path.commonpath(paths)}"]
                                                   if a.hf else [])))
        elif a.command == "enhance":
            enhance_command(a)
        else:
            info(a.path)
    except ZImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted" + (": run the same command again to continue the download" if a.command == "download"
                               or getattr(a, "download", None) else ""), file=sys.stderr)
        return 130
    return 0
