"""End-to-end pipeline time (prompt encode + sampling + VAE decode) against diffusers' ZImagePipeline.

    python benchmarks/bench_pipeline.py [--device cpu|cuda] [--repeats N] [--size 256]

Same random weights for both: a moderate transformer (dim 512, 4 layers, 2+2 refiners), a moderate
Qwen3 (hidden 1024, 8 layers), a small FLUX-shaped VAE ([64,128,128,128] channels); Turbo (8 steps)
and Base with CFG (8 steps, negative prompt). Reports median seconds and ours / diffusers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

from bench_transformer import MODERATE  # noqa: E402
from timing import timed_pair  # noqa: E402
from tiny import TINY_VAE, diffusers_transformer, randomize_, save_bfl_vae, save_comfyui, save_qwen_comfyui  # noqa: E402

import zimage_core as zc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--tokenizer", default=os.path.join(HERE, "..", "..", "shared", "qwen_tokenizer"))
    a = ap.parse_args()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    dev = a.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    dit = diffusers_transformer(seed=0, **{**MODERATE, "cap_feat_dim": 1024})
    te = randomize_(Qwen3Model(Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                                           num_attention_heads=16, num_key_value_heads=8, head_dim=64, rope_theta=1e6))).eval()
    vae = AutoencoderKL(**{**TINY_VAE, "block_out_channels": [64, 128, 128, 128]}).eval()
    with tempfile.TemporaryDirectory() as d:
        paths = zc.find_weights(transformer=save_comfyui(dit, f"{d}/dit.safetensors"),
                                text_encoder=save_qwen_comfyui(te, f"{d}/te.safetensors"),
                                vae=save_bfl_vae(vae, f"{d}/ae.safetensors"), tokenizer=a.tokenizer)
        ours = zc.ZImagePipeline.from_paths(paths, dtype=torch.float32, device=dev)
        ref = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.to(dev), text_encoder=te.to(dev),
                             tokenizer=AutoTokenizer.from_pretrained(a.tokenizer), transformer=dit.to(dev))
        ref.set_progress_bar_config(disable=True)
        print(f"device={dev} torch={torch.__version__} size={a.size} threads={torch.get_num_threads()}")
        for label, steps, cfg in (("turbo 8 steps", 8, 1.0), ("base 8 steps, CFG", 8, 5.0)):
            s = zc.GenerationSettings(prompt="a lighthouse on a cliff at dusk, oil painting", negative_prompt="blurry",
                                      width=a.size, height=a.size, steps=steps, cfg=cfg, seed=1, preset="base")
            noise = zc.comfy_noise((1, 16, a.size // 8, a.size // 8), 1).to(dev)
            with torch.inference_mode():
                t_ref, t_ours = timed_pair(
                    lambda: ref(prompt=s.prompt, negative_prompt=s.negative_prompt, height=a.size, width=a.size,
                                num_inference_steps=steps, guidance_scale=cfg - 1.0, latents=noise.clone(), output_type="pt"),
                    lambda: ours(s), a.repeats, sync)
            print(f"{label:20s} diffusers {t_ref:7.2f} s  ours {t_ours:7.2f} s  ratio {t_ours / t_ref:.3f}")


if __name__ == "__main__":
    main()
