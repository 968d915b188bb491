"""Loader nodes: the Z-Image transformer and the Qwen3 text encoder, from ComfyUI's model folders."""

from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io

import zimage_core as zc
from zimage_core.attention import BACKENDS
from zimage_core.loader import COMPUTE_DTYPES, STORAGE_DTYPES
from zimage_core.offload import MODES

from .clip import ZImageCLIPModel, make_clip
from .memory import Handle, cached_load, compute_dtype, storage_dtype
from .model import GRAPHS, ZImageBase, ZImageDiffusionModel
from .types import ZImageTextEncoder

WEIGHT_DTYPES = ["auto", *COMPUTE_DTYPES, *STORAGE_DTYPES]
FP8_COMPUTE = ["auto", "dequantize", "fp8 matmul", "int8 matmul"]
# .gguf files of the same folders (diffusion_models + unet, text_encoders + clip), under the names
# city96/ComfyUI-GGUF registers for them (nodes.py update_folder_names_and_paths), so both packs agree.
GGUF_FOLDERS = {"diffusion_models": "unet_gguf", "text_encoders": "clip_gguf"}
for _folder, _key in GGUF_FOLDERS.items():
    if _key not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[_key] = (folder_paths.folder_names_and_paths[_folder][0], {".gguf"})


def model_choices(folder: str, marker: str) -> list[str]:
    """Files ComfyUI lists (and .gguf files), plus diffusers-layout folders (containing ``marker``/ or a shard
    index) as 'name/'."""
    names = list(folder_paths.get_filename_list(folder)) + list(folder_paths.get_filename_list(GGUF_FOLDERS[folder]))
    for root in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(root):
            continue
        for d in sorted(os.listdir(root)):
            p = os.path.join(root, d)
            if os.path.isdir(p) and (os.path.isdir(os.path.join(p, marker)) or any(f.endswith(".safetensors.index.json") for f in os.listdir(p))):
                names.append(d + "/")
    return names


def resolve(folder: str, name: str) -> str:
    if name.endswith("/"):
        for root in folder_paths.get_folder_paths(folder):
            p = os.path.join(root, name[:-1])
            if os.path.isdir(p):
                return p
        raise zc.ZImageError(f"model folder {name} not found in models/{folder}.")
    path = folder_paths.get_full_path(GGUF_FOLDERS[folder] if name.lower().endswith(".gguf") else folder, name)
    if path is None:
        raise zc.ZImageError(f"{name} is not in models/{folder}; put the file there (or refresh the node list).")
    return path


def file_identity(path_of, *names: str) -> tuple | None:
    """What changes when a chosen file (``path_of(*names)``, or each file of a chosen folder) is replaced or edited
    on disk, so ComfyUI re-runs the loader instead of reusing a model read from the old bytes."""
    try:
        path = path_of(*names)
        paths = [os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
        return tuple((os.stat(p).st_ino, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)
    except (OSError, zc.ZImageError):
        return None  # execute() reports the problem


def _split_dtype(choice: str, device, fp16: bool = True):
    """One widget, two meanings: fp8 choices set the storage (compute stays bf16); the others set compute."""
    st = storage_dtype(choice)
    return compute_dtype("auto" if st else choice, device, fp16), st


class ZImageModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageModelLoader",
            display_name="Load Z-Image Model",
            category="Z-Image",
            description="Loads a Z-Image / Z-Image-Turbo transformer (ComfyUI single file or diffusers folder) with "
                        "VRAM-aware block streaming. Use 'auto' offload unless you need to leave VRAM for other models: "
                        "then set a budget in GB.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices("diffusion_models", "transformer"),
                               tooltip="A file from models/diffusion_models or models/unet (e.g. z_image_turbo_bf16.safetensors, "
                                       "fp8 variants, GGUF files such as z_image_turbo-Q4_K_M.gguf, kept quantised) or a "
                                       "diffusers folder (name/). Downloads: huggingface.co/Comfy-Org/z_image_turbo "
                                       "(base: Comfy-Org/z_image), or `python -m zimage_core download` in the pack's folder."),
                io.Combo.Input("weight_dtype", options=WEIGHT_DTYPES, default="auto",
                               tooltip="auto: bf16 compute (fp32 on CPU), weights kept as stored. fp8_*: store weights in fp8 "
                                       "(half the memory, small quality loss), compute in bf16. fp16 for GPUs without bf16 (auto picks it there)."),
                io.Combo.Input("attention", options=["auto", *BACKENDS], default="auto",
                               tooltip="Attention kernel: sdpa (PyTorch, always available), flash (flash-attn) or sage "
                                       "(SageAttention) when installed; auto picks the fastest installed."),
                io.Combo.Input("offload", options=list(MODES), default="auto",
                               tooltip="auto: keep as many blocks on the GPU as ComfyUI's free VRAM allows, stream the rest. "
                                       "budget: use at most vram_budget_gb. resident: everything on the GPU. "
                                       "min_vram: stream every block (slowest, smallest)."),
                io.Float.Input("vram_budget_gb", default=0.0, min=0.0, max=256.0, step=0.25, round=0.01,
                               tooltip="With offload=budget: GB of VRAM for weights and activations (e.g. 8 on a 12 GB card "
                                       "to leave room). 0 = use what ComfyUI offers."),
                io.Int.Input("prefetch", default=2, min=1, max=8, advanced=True,
                             tooltip="Streamed blocks copied ahead of use. 2 hides copies behind compute on most GPUs."),
                io.Combo.Input("fp8_compute", options=FP8_COMPUTE, default="auto", optional=True, advanced=True,
                               tooltip="Quantized files: 'fp8 matmul' runs e4m3 weights on the fp8 tensor cores (RTX 40xx / "
                                       "H100 and later), 'int8 matmul' ComfyUI's int8 files on the int8 tensor cores (RTX 20xx "
                                       "and later), both for the blocks' big matmuls only; 'dequantize' (auto) expands each weight "
                                       "to bf16 first. On an H100 fp8 matmul measured 1.03× and int8 0.84× (ConvRot int8 1.14×) "
                                       "the speed of dequantize, with about 2–3× its error."),
                io.Boolean.Input("compile", default=False, optional=True, advanced=True,
                                 tooltip="torch.compile each transformer block (inductor). The first run at a new image "
                                         "size compiles (about 10 s on an H100), later steps run a little faster (H100: 0.97–1.0× "
                                         "the eager time at 1024², 0.95× at 512²). Works with offloading, LoRAs and ControlNets, for this node's "
                                         "sampler and KSampler alike. Needs Triton on NVIDIA GPUs (Windows: triton-windows)."),
                io.Boolean.Input("cuda_graphs", default=False, optional=True, advanced=True,
                                 tooltip="Replay each step's transformer forward as one CUDA graph: the first step at a new "
                                         "image size runs normally, the second captures it, later steps skip the launch "
                                         "overhead of ~2000 kernels (H100, 512²: 0.71–0.95× the step, host-dependent; no "
                                         "change at 1024² where the GPU never waits). NVIDIA GPUs, with the transformer fully "
                                         "resident and no ControlNet or block patches (otherwise steps simply run without). "
                                         "Holds one step's activations per image size in use (up to 4; 0.74 GB at 1024²), "
                                         "which ComfyUI does not count until it unloads the model: leave it off when VRAM "
                                         "is tight."),
            ],
            outputs=[io.Model.Output(tooltip="A standard MODEL: KSampler, SamplerCustomAdvanced, LoRA loaders, model "
                                             "patches and the Z-Image Sampler all take it.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name, **_):
        return file_identity(resolve, "diffusion_models", model_name)

    @classmethod
    def execute(cls, model_name, weight_dtype, attention, offload, vram_budget_gb, prefetch=2,
                fp8_compute="auto", compile=False, cuda_graphs=False) -> io.NodeOutput:  # noqa: A002 (the widget's name)
        import comfy.model_management as mm

        from zimage_core.compiling import require_compile
        from zimage_core.int8_mm import device_supports_int8
        from zimage_core.layers import set_quant_matmul
        from zimage_core.scaled_mm import device_supports_fp8

        device = mm.get_torch_device()
        if cuda_graphs and device.type != "cuda":  # a setting this machine cannot honour: said before any loading
            raise zc.ZImageError(f"CUDA graphs need an NVIDIA GPU and ComfyUI runs on {device}; turn cuda_graphs off.")
        path = resolve("diffusion_models", model_name)
        dtype, storage = _split_dtype(weight_dtype, device)
        backend = zc.attention.resolve_backend(attention)
        # auto = dequantize: on an H100 (4 full-width blocks, 1024²) fp8 matmul was 1.03× dequantize with 3.9e-2 error vs
        # fp32 (dequantize 1.25e-2), int8 0.84× (ConvRot 1.14×) with 2.6e-2 (1.8e-2); benchmarks/RESULTS.md
        kinds = tuple(k for k, ok in (("fp8", device_supports_fp8(device)), ("int8", device_supports_int8(device)))
                      if ok and fp8_compute == f"{k} matmul")
        if compile:
            require_compile(device, model_name)

        def load():
            model = zc.load_transformer(path, dtype=dtype, storage_dtype=storage, attention_backend=backend,
                                       cls=ZImageDiffusionModel)
            set_quant_matmul(model, bool(kinds), kinds)
            if compile:
                model.compile_blocks()
            return ZImageBase(model)

        patcher = cached_load(
            "transformer", path, load,
            {"dtype": dtype, "storage": storage, "attention": backend, "quant_matmul": kinds, "compile": compile},
            {"mode": offload, "budget_gb": vram_budget_gb, "prefetch": prefetch},
        )
        if cuda_graphs:  # per MODEL: a clone, so another loader of the same file keeps its own choice
            patcher = patcher.clone()
            patcher.model_options.setdefault("transformer_options", {})[GRAPHS] = True
        return io.NodeOutput(patcher)


class ZImageTextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageTextEncoderLoader",
            display_name="Load Z-Image Text Encoder",
            category="Z-Image",
            description="Loads the Qwen3-4B text encoder Z-Image reads prompts with (only the layers it needs). It moves "
                        "to the GPU to encode and leaves right after, so it never competes with the transformer.",
            inputs=[
                io.Combo.Input("text_encoder_name", options=model_choices("text_encoders", "text_encoder"),
                               tooltip="qwen_3_4b.safetensors (or its fp8 variant, or a Qwen3-4B GGUF such as Qwen3-4B-Q4_K_M.gguf) "
                                       "from models/text_encoders or models/clip, or an HF folder (name/). "
                                       "Download: huggingface.co/Comfy-Org/z_image_turbo (split_files/text_encoders)."),
                io.Combo.Input("weight_dtype", options=WEIGHT_DTYPES[:-1], default="auto",
                               tooltip="auto: bf16 compute, weights as stored. fp8_e4m3fn stores weights in fp8 (4 GB instead of 8)."),
                io.Combo.Input("device", options=["auto", "cpu"], default="auto",
                               tooltip="cpu: encode on the CPU (slow, no VRAM at all)."),
            ],
            outputs=[ZImageTextEncoder.Output(tooltip="The prompt encoder, for Z-Image Text Encode and Edit Encode."),
                     io.Clip.Output(tooltip="The same encoder as a standard CLIP: CLIPTextEncode, TextEncodeZImageOmni and "
                                            "prompt-scheduling nodes use it (ComfyUI's Z-Image tokenizer and template).")],
        )

    @classmethod
    def fingerprint_inputs(cls, text_encoder_name, **_):
        return file_identity(resolve, "text_encoders", text_encoder_name)

    @classmethod
    def execute(cls, text_encoder_name, weight_dtype, device) -> io.NodeOutput:
        import comfy.model_management as mm

        path = resolve("text_encoders", text_encoder_name)
        dev = mm.get_torch_device() if device == "auto" else torch.device("cpu")
        dtype, storage = _split_dtype(weight_dtype, dev, fp16=False)
        patcher = cached_load(
            "text_encoder", path,
            lambda: ZImageCLIPModel(zc.load_text_encoder(path, dtype=dtype, storage_dtype=storage)),
            {"dtype": dtype, "storage": storage},
            {"mode": "auto", "budget_gb": 0.0, "prefetch": 2},
        )
        if device == "cpu":
            patcher.load_device = dev
        return io.NodeOutput(Handle(patcher.model.encoder, patcher, path, {"dtype": dtype, "storage": storage}), make_clip(patcher))
