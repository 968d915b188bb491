"""Prompt-enhancer generation speed against transformers' Qwen3ForCausalLM.generate on the same weights.

    python benchmarks/bench_enhancer.py [--device cpu|cuda] [--size moderate|4b] [--tokens N] [--repeats N]

Both run greedy with a KV cache from the same prompt (our system prompt + a short user prompt, ≈250
tokens) for exactly ``--tokens`` new tokens; the figures are new tokens per second including the prefill,
and the ratio ours / transformers. ``moderate`` is a Qwen3 with hidden 1024, 8 layers, 16/8 heads, MLP
3072 and the real 151,936-token vocabulary (fits a CPU); ``4b`` is Qwen3-4B's own shape (36 layers,
hidden 2560) with random weights, for a GPU. On CUDA a third row streams the layers under a VRAM budget
(``--budget-gb``, default: half the weights) through our block streamer. ``--gguf Q8_0`` adds a row for
the same weights quantised by gguf-py into a GGUF with llama.cpp's names (kept packed, expanded per call).
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

from safetensors.torch import save_file  # noqa: E402
from timing import timed_pair  # noqa: E402

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


def save_gguf(model, path: str, qtype: str) -> str:
    """The model's weights as llama.cpp's convert_hf_to_gguf.py + llama-quantize lay them out (tests/tiny_gguf.py):
    2-D weights in ``qtype`` (quantised by gguf-py), norms in F32, no output.weight (tied)."""
    import gguf
    from tiny_gguf import write_gguf

    qt, n = gguf.GGMLQuantizationType[qtype], model.config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, n)
    tensors = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        v = v.float().cpu().numpy()
        tensors[names.get_name(k, try_suffixes=(".weight",))] = (gguf.quants.quantize(v, qt), qt) if v.ndim == 2 else (v, gguf.GGMLQuantizationType.F32)
    return write_gguf(path, "qwen3", tensors, {"add_rope_freq_base": (1e6,), "add_layer_norm_rms_eps": (1e-6,), "add_block_count": (n,)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=list(SIZES), default="moderate")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-gb", type=float, default=None)
    ap.add_argument("--tokenizer", default=None, help="default: the Qwen tokenizer bundled with zimage_core")
    ap.add_argument("--gguf", default=None, help="also time a GGUF of the same weights in this type (e.g. Q8_0, Q4_0)")
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
        if a.gguf:
            gpath = save_gguf(ref, os.path.join(d, f"Qwen3-{a.gguf}.gguf"), a.gguf)
            chat_g = enhancer.load_chat(zc.load_text_encoder(gpath, dtype=dtype, device=a.device, tokenizer=a.tokenizer))
            t_g, _ = timed_pair(lambda: enhancer.generate(chat_g, ids, max_tokens=a.tokens, stop=()), lambda: None, a.repeats, sync)
            same = sum(x == y for x, y in zip(ours(), enhancer.generate(chat_g, ids, max_tokens=a.tokens, stop=())))
            print(f"ours, GGUF {a.gguf:<10s}  {a.tokens / t_g:8.1f} tokens/s ({t_g * 1e3 / a.tokens:6.2f} ms/token)  "
                  f"ratio to transformers {t_hf / t_g:.2f}; greedy tokens equal to ours dense: {same}/{a.tokens}")
            del chat_g
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
