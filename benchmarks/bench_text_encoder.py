"""Prompt-encoding time against transformers' Qwen3Model on the same weights, and peak memory while loading.

    python benchmarks/bench_text_encoder.py [--device cpu|cuda] [--repeats N] [--tokenizer DIR]

A moderate Qwen3 (hidden 1024, 8 layers, 16/8 heads, MLP 3072, the real 151,936-token vocabulary) in
fp32 and bf16, a batch of 4 prompts of different lengths. transformers is timed as diffusers'
ZImagePipeline uses it (padding to 512 tokens) and with padding to the longest prompt; the ratio is
ours / transformers. Loading: a ≈1 GB bf16 text-encoder file in a fresh process (peak RSS growth over
the bytes of the weights we read).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

from safetensors.torch import save_file  # noqa: E402
from timing import timed_pair  # noqa: E402
from tiny import randomize_  # noqa: E402

import zimage_core as zc  # noqa: E402
from zimage_core.tokenizer import TEMPLATE  # noqa: E402

PROMPTS = [
    "a cat",
    "a photo of an astronaut riding a horse on the moon, cinematic lighting, highly detailed",
    "一只橘猫坐在窗台上，窗外是下雨的东京街道，霓虹灯倒影，胶片质感，35mm 镜头",
    "A bustling medieval market at dawn: merchants arranging baskets of apples, pears and bread; "
    "a blacksmith's forge glowing in the background; children chasing a dog between stalls; "
    "soft mist over cobblestones; painterly style with warm golden light and long shadows.",
]


def qwen(hidden, layers, heads, kv, mlp, dtype):
    from transformers import Qwen3Config, Qwen3Model

    c = Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, rope_theta=1e6)
    return randomize_(Qwen3Model(c)).to(dtype).eval()


def bench_encode(device, repeats, tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for dtype in (torch.float32, torch.bfloat16):
            ref = qwen(1024, 8, 16, 8, 3072, dtype).to(device)
            path = os.path.join(d, f"te_{dtype}.safetensors")
            save_file({"model." + k: v.contiguous().cpu() for k, v in ref.state_dict().items()}, path)
            ours = zc.load_text_encoder(path, dtype=dtype, device=device, tokenizer=tokenizer)
            texts = [TEMPLATE.format(p) for p in PROMPTS]

            def hf(padding):
                enc = tok(texts, padding=padding, max_length=512, truncation=True, return_tensors="pt").to(device)
                with torch.inference_mode():
                    hs = ref(input_ids=enc.input_ids, attention_mask=enc.attention_mask.bool(), output_hidden_states=True).hidden_states[-2]
                return [hs[i][enc.attention_mask[i].bool()] for i in range(len(texts))]

            t512, t_ours = timed_pair(lambda: hf("max_length"), lambda: ours.encode(PROMPTS), repeats, sync)
            tlong, _ = timed_pair(lambda: hf("longest"), lambda: None, repeats, sync)
            rows.append(dict(dtype=str(dtype).split(".")[-1], ours=t_ours, hf512=t512, hflong=tlong))
    return rows


_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import zimage_core as zc
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
base = hwm()
te = zc.load_text_encoder(sys.argv[2], tokenizer=sys.argv[3])
after_load = hwm()
te.encode(["touch every weight once"])
print(json.dumps({"base": base, "after_load": after_load, "after_encode": hwm(),
                  "read_bytes": sum(p.numel() * p.element_size() for p in te.parameters())}))
"""


def bench_load(tokenizer):
    with tempfile.TemporaryDirectory() as d:
        ref = qwen(1536, 17, 12, 4, 4608, torch.bfloat16)  # ≈1 GB in bf16; the last layer is in the file but skipped
        path = os.path.join(d, "qwen_big.safetensors")
        save_file({"model." + k: v.contiguous() for k, v in ref.state_dict().items()}, path)
        file_bytes = os.path.getsize(path)
        del ref
        out = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(HERE, ".."), path, tokenizer],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        return dict(file_GB=file_bytes / 1e9, read_GB=r["read_bytes"] / 1e9,
                    load_ratio=(r["after_load"] - r["base"]) / r["read_bytes"],
                    encode_ratio=(r["after_encode"] - r["base"]) / r["read_bytes"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "qwen_tokenizer"),
                    help="an HF tokenizer folder (vocab.json + merges.txt) for transformers' side")
    ap.add_argument("--skip-load", action="store_true")
    a = ap.parse_args()
    print(f"device={a.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    for r in bench_encode(a.device, a.repeats, a.tokenizer):
        print(f"encode 4 prompts {r['dtype']:9s} ours {r['ours'] * 1e3:7.1f} ms | transformers pad-512 {r['hf512'] * 1e3:7.1f} ms "
              f"(ratio {r['ours'] / r['hf512']:.3f}) | pad-longest {r['hflong'] * 1e3:7.1f} ms (ratio {r['ours'] / r['hflong']:.3f})")
    if not a.skip_load:
        r = bench_load(a.tokenizer)
        print(f"load: file {r['file_GB']:.2f} GB, weights read {r['read_GB']:.2f} GB; peak RSS growth / weights read: "
              f"while loading {r['load_ratio']:.3f}, after an encode {r['encode_ratio']:.3f}")


if __name__ == "__main__":
    main()
