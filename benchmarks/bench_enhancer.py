"""Prompt-enhancer generation speed against transformers' Qwen3ForCausalLM.generate on the same weights.

    python benchmarks/bench_enhancer.py [--device cpu|cuda] [--size moderate|4b] [--tokens N] [--repeats N]

Both run greedy with a KV cache from the same prompt (our system prompt + a short user prompt, ≈250
tokens) for exactly ``--tokens`` new tokens; the figures are new tokens per second including the prefill,
and the ratio ours / transformers. ``moderate`` is a Qwen3 with hidden 1024, 8 layers, 16/8 heads, MLP
3072 and the real 151,936-token vocabulary (fits a CPU); ``4b`` is Qwen3-4B's own shape (36 layers,
hidden 2560) with random weights, for a GPU. On CUDA a third row streams the layers under a VRAM budget
(``--budget-gb``, default: half the weights) through our block streamer.
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

from bench_transformer import timed_pair  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import zimage_core as zc  # noqa: E402
from zimage_core import enhancer  # noqa: E402
from zimage_core.offload import GB, module_bytes, offload  # noqa: E402

SIZES = {
    "moderate": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                     intermediate_size=3072),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=9728),
}


def causal_lm(size: str, dtype, device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = Qwen3Config(vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, **SIZES[size])
    torch.manual_seed(0)
    with torch.device(device):
        m = Qwen3ForCausalLM(c).to(dtype)
    return m.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=list(SIZES), default="moderate")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-gb", type=float, default=None)
    ap.add_argument("--tokenizer", default=None, help="default: the Qwen tokenizer bundled with zimage_core")
    a = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    print(f"device={a.device} {torch.cuda.get_device_name() if a.device == 'cuda' else ''} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} size={a.size} dtype={dtype} new tokens={a.tokens}")
    ref = causal_lm(a.size, dtype, a.device)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "qwen_3_4b.safetensors")
        save_file({k: v.contiguous().cpu() for k, v in ref.state_dict().items() if k != "lm_head.weight"}, path)
        chat = enhancer.load_chat(zc.load_text_encoder(path, dtype=dtype, device=a.device, tokenizer=a.tokenizer))
        ids = chat.tokenizer.ids(enhancer.chat_text("a red fox asleep on a mossy stone at dawn"))
        inp = torch.tensor([ids], device=a.device)

        def hf():
            with torch.inference_mode():
                return ref.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=a.tokens, min_new_tokens=a.tokens,
                                    do_sample=False, pad_token_id=151643)[0, len(ids):].tolist()

        def ours():
            return enhancer.generate(chat, ids, max_tokens=a.tokens, stop=())

        t_hf, t_ours = timed_pair(hf, ours, a.repeats, sync)
        same = sum(x == y for x, y in zip(hf(), ours()))
        print(f"prompt {len(ids)} tokens; greedy tokens equal to transformers: {same}/{a.tokens}")
        print(f"transformers generate  {a.tokens / t_hf:8.1f} tokens/s ({t_hf * 1e3 / a.tokens:6.2f} ms/token)")
        print(f"ours, resident         {a.tokens / t_ours:8.1f} tokens/s ({t_ours * 1e3 / a.tokens:6.2f} ms/token)  "
              f"ratio ours/transformers speed {t_hf / t_ours:.2f}")
        if a.device == "cuda":
            del ref
            chat = enhancer.load_chat(zc.load_text_encoder(path, dtype=dtype, device="cpu", tokenizer=a.tokenizer))
            budget = a.budget_gb or module_bytes(chat) / 2 / GB
            st = offload(chat, mode="budget", budget_gb=budget, device="cuda")
            try:
                t_st, _ = timed_pair(ours, lambda: None, a.repeats, sync)
                print(f"ours, {budget:.1f} GB budget  {a.tokens / t_st:8.1f} tokens/s ({t_st * 1e3 / a.tokens:6.2f} ms/token)  "
                      f"[{st.plan.describe()}]")
            finally:
                st.detach()


if __name__ == "__main__":
    main()
