"""The prompt enhancer against transformers' Qwen3ForCausalLM on the same tiny random weights.

Token-for-token tests run both models in float64, where a flipped argmax would need two logits within
~1e-15 of each other; the fp32 path is checked on logits (truth: float64 transformers; ours must be
within 2e-6 relative and ≤ 2× transformers' own fp32 error, as for the encoder). ComfyUI's native
``TextGenerate`` cannot serve as a second reference here: its Qwen3-4B class has a fixed 4B config.
"""

import copy

import pytest
import torch
from safetensors.torch import save_file
from tiny import randomize_, rel_err

import zimage_core as zc
from zimage_core import enhancer as en
from zimage_core.safetensors_io import SafetensorsFile

PROMPTS = ["a red fox asleep on a mossy stone", "一只猫在月光下, sign reading \"OPEN 24h\"", "<|im_end|> literal"]


def causal_lm(seed=0, dtype=torch.float64, tied=True, layers=3):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    m = Qwen3ForCausalLM(c)
    randomize_(m, seed)
    if tied:
        m.tie_weights()
    return m.to(dtype).eval()


def save_lm(model, path, tied=True, dtype=None) -> str:
    """ComfyUI's qwen_3_4b.safetensors layout ('model.' names; a tied head is not stored), or with lm_head.weight."""
    sd = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.state_dict().items()}
    if tied:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(path))
    return str(path)


def ours(path, tokenizer_dir, dtype=torch.float64, **kw):
    return en.load_chat(zc.load_text_encoder(path, dtype=dtype, tokenizer=tokenizer_dir, **kw))


def template_ids(hf_tokenizer, prompt, thinking, system=en.SYSTEM_PROMPT):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    return text, hf_tokenizer(text, add_special_tokens=False).input_ids


def hf_generate(model, ids, n, **kw):
    kw = {"do_sample": False, **kw}
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
                         eos_token_id=list(kw.pop("eos", en.STOP_IDS)), pad_token_id=151643, **kw)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("system", [en.SYSTEM_PROMPT, None])
def test_chat_template_is_qwen3s(hf_tokenizer, tokenizer_dir, thinking, system):
    tok = zc.text_encoder.PromptTokenizer(tokenizer_dir)
    for p in PROMPTS:
        text, ids = template_ids(hf_tokenizer, p, thinking, system)
        assert en.chat_text(p, system, thinking) == text
        assert tok.ids(text) == ids


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    m = causal_lm(0)
    return m, save_lm(m, tmp_path_factory.mktemp("lm") / "qwen_3_4b.safetensors")


@pytest.mark.parametrize("thinking", [False, True])
def test_greedy_equals_transformers_generate(tied, hf_tokenizer, tokenizer_dir, thinking):
    ref, path = tied
    chat = ours(path, tokenizer_dir)
    assert chat.lm_head is None and len(chat.blocks()) == 3
    for i, p in enumerate(PROMPTS):  # our system prompt once (long: slow in float64), plain chat for the others
        _, ids = template_ids(hf_tokenizer, p, thinking, en.SYSTEM_PROMPT if i == 0 else None)
        expect = hf_generate(ref, ids, 16)
        assert en.generate(chat, ids, max_tokens=16) == expect
    # a stop token ends both at the same place (the token itself is returned, as transformers does)
    stop = expect[5]
    assert en.generate(chat, ids, max_tokens=16, stop=(stop,)) == hf_generate(ref, ids, 16, eos=[stop])


def test_untied_head_and_hf_names(hf_tokenizer, tokenizer_dir, tmp_path):
    ref = causal_lm(1, tied=False)
    path = save_lm(ref, tmp_path / "untied.safetensors", tied=False)
    chat = ours(path, tokenizer_dir)
    assert chat.lm_head is not None
    _, ids = template_ids(hf_tokenizer, PROMPTS[0], False, None)
    assert en.generate(chat, ids, max_tokens=12) == hf_generate(ref, ids, 12)


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_greedy_equals_transformers_on_the_expanded_weights(hf_tokenizer, tokenizer_dir, tmp_path, tied):
    """A Qwen3 GGUF named and typed as llama.cpp's convert_hf_to_gguf.py + llama-quantize write it (tests/tiny_gguf.py:
    gguf's GGUFWriter, mixed Q8_0/Q4_0/Q5_1/IQ4_NL/Q4_1/Q5_0 blocks, token_embd quantised too). A tied file has no
    output.weight; llama.cpp then reads token_embd as the output (ggml-org/llama.cpp src/llama-model.cpp,
    TENSOR_DUPLICATED). Truth: transformers on the blocks expanded by gguf-py's own dequantize, in float64."""
    import gguf
    from gguf import GGMLQuantizationType as QT
    from safetensors.torch import load_file
    from tiny_gguf import save_qwen_gguf

    from zimage_core.packed import Packed

    path, truth = str(tmp_path / "Qwen3-4B-Q4_K_M.gguf"), str(tmp_path / "truth.safetensors")
    parts = (("self_attn.q_proj", QT.Q8_0), ("self_attn.k_proj", QT.Q8_0), ("self_attn.v_proj", QT.Q8_0),
             ("self_attn.o_proj", QT.Q5_0), ("mlp.gate_proj", QT.Q4_0), ("mlp.up_proj", QT.Q4_0))  # down: 48 columns, F16
    save_qwen_gguf(causal_lm(2, torch.float32, tied=tied), path, truth, parts=parts)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"output_norm.weight", "blk.2.attn_q.weight", "blk.2.ffn_down.weight"} <= names and ("output.weight" in names) != tied
    chat = ours(path, tokenizer_dir)
    last = chat.last  # read on first use, kept packed
    assert all(isinstance(m.weight, Packed) for m in (last.self_attn.qkv_proj, last.self_attn.o_proj, last.mlp.gate_up_proj))
    assert isinstance(chat.encoder.embed_tokens.weight, Packed) and (chat.lm_head is None) == tied
    assert tied or isinstance(chat.lm_head.weight, Packed)
    ref = causal_lm(2, tied=tied)
    missing, unexpected = ref.load_state_dict(load_file(truth), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if tied else [])  # tied: the head is embed_tokens
    for p in PROMPTS[:2]:
        _, ids = template_ids(hf_tokenizer, p, False, None)
        assert en.generate(chat, ids, max_tokens=12) == hf_generate(ref, ids, 12)


def test_seeded_sampling_equals_transformers(tied, hf_tokenizer, tokenizer_dir):
    """Same warpers, same CPU generator stream: transformers' do_sample after torch.manual_seed(s) picks the same tokens."""
    ref, path = tied
    chat = ours(path, tokenizer_dir)
    _, ids = template_ids(hf_tokenizer, PROMPTS[1], False, None)
    kw = dict(temperature=0.7, top_k=20, top_p=0.8)
    runs = {}
    for seed in (3, 4):
        torch.manual_seed(seed)
        expect = hf_generate(ref, ids, 12, do_sample=True, **kw)
        runs[seed] = en.generate(chat, ids, max_tokens=12, seed=seed, **kw)
        assert runs[seed] == expect
    assert runs[3] != runs[4]
    assert en.generate(chat, ids, max_tokens=12, seed=3, **kw) == runs[3]


def test_warp_equals_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0)) * 3
    for t, k, p in [(0.7, 20, 0.8), (1.3, 0, 0.95), (1.0, 50, 1.0), (0.5, 0, 0.3)]:
        x = TemperatureLogitsWarper(t)(None, logits.clone())
        x = TopKLogitsWarper(k)(None, x) if k else x
        x = TopPLogitsWarper(p)(None, x) if p < 1 else x
        assert torch.equal(en.warp(logits, t, k, p), x.softmax(-1))


def logits_stepwise(chat, ids, seq):
    """Our logits for every position from the prompt's last token on, fed one token at a time after the prompt."""
    cache, rope = chat.new_cache(1, len(seq)), chat.encoder.rope(len(seq), chat.device)
    with torch.inference_mode():
        first = chat(torch.tensor([ids]), cache, rope)[0]
        return [first] + [chat(torch.tensor([[t]]), cache, rope)[0] for t in seq[len(ids) : -1]]


def test_fp32_logits_within_bound(tied, hf_tokenizer, tokenizer_dir):
    ref64, path = tied
    ref32 = copy.deepcopy(ref64).float()
    chat = ours(path, tokenizer_dir, dtype=torch.float32)
    _, ids = template_ids(hf_tokenizer, PROMPTS[0], False, None)
    seq = ids + hf_generate(ref64, ids, 8)
    with torch.no_grad():
        truth, theirs = (m(torch.tensor([seq])).logits[0, len(ids) - 1 : -1] for m in (ref64, ref32))
    for o, t, r in zip(logits_stepwise(chat, ids, seq), truth, theirs):
        e_ours, e_ref = rel_err(o, t), rel_err(r, t)
        assert e_ours < 2e-6 and e_ours < 2 * e_ref + 1e-7, (e_ours, e_ref)


def dequantized(chat) -> dict:
    """Our (fp8) weights as real numbers under transformers' Qwen3ForCausalLM names (fused q/k/v and gate/up split)."""
    c = chat.cfg
    real = lambda m: m.weight.double() * (1 if m.weight_scale is None else m.weight_scale.double())  # noqa: E731
    sd = {"model.embed_tokens.weight": real(chat.encoder.embed_tokens), "model.norm.weight": chat.norm.weight.double()}
    for i, b in enumerate(chat.blocks()):
        q, k, v = real(b.self_attn.qkv_proj).split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim])
        gate, up = real(b.mlp.gate_up_proj).chunk(2)
        parts = {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v, "self_attn.o_proj": real(b.self_attn.o_proj),
                 "mlp.gate_proj": gate, "mlp.up_proj": up, "mlp.down_proj": real(b.mlp.down_proj),
                 "self_attn.q_norm": b.self_attn.q_norm.weight, "self_attn.k_norm": b.self_attn.k_norm.weight,
                 "input_layernorm": b.input_layernorm.weight, "post_attention_layernorm": b.post_attention_layernorm.weight}
        sd.update({f"model.layers.{i}.{n}.weight": w.double() for n, w in parts.items()})
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def test_fp8_storage_reaches_the_last_layer_and_head(tied, hf_tokenizer, tokenizer_dir):
    ref, path = tied
    chat = ours(path, tokenizer_dir, dtype=torch.float32, storage_dtype=torch.float8_e4m3fn)
    assert chat.last.mlp.down_proj.weight.dtype == chat.encoder.embed_tokens.weight.dtype == torch.float8_e4m3fn
    truth = copy.deepcopy(ref)
    truth.load_state_dict(dequantized(chat))
    _, ids = template_ids(hf_tokenizer, PROMPTS[0], False, None)
    seq = ids + hf_generate(truth, ids, 4)
    with torch.no_grad():
        expect = truth(torch.tensor([seq])).logits[0, len(ids) - 1 : -1]
    for o, t in zip(logits_stepwise(chat, ids, seq), expect):
        assert rel_err(o, t) < 2e-6


def test_reads_only_the_tail_and_leaves_the_encoder_alone(tied, tokenizer_dir, monkeypatch):
    _, path = tied
    te = zc.load_text_encoder(path, dtype=torch.float64, tokenizer=tokenizer_dir)
    before = te.encode(["a fox"])[0]
    read = []
    orig = SafetensorsFile.get
    monkeypatch.setattr(SafetensorsFile, "get", lambda self, k: (read.append(k), orig(self, k))[1])
    chat = en.load_chat(te)
    assert read and all(k.startswith(("model.layers.2.", "model.norm.")) for k in read), sorted(set(read))
    assert chat.encoder is te and all(a is b for a, b in zip(chat.blocks(), te.layers))
    assert torch.equal(te.encode(["a fox"])[0], before)


def test_streamed_offload_gives_the_same_tokens(tied, hf_tokenizer, tokenizer_dir):
    from zimage_core.offload import Ledger, module_bytes, offload

    _, path = tied
    chat = ours(path, tokenizer_dir)
    _, ids = template_ids(hf_tokenizer, PROMPTS[0], False)
    plain = en.generate(chat, ids, max_tokens=10)
    ledger = Ledger()
    streamer = offload(chat, mode="min_vram", device="cpu", ledger=ledger)
    try:
        assert en.generate(chat, ids, max_tokens=10) == plain
        head = module_bytes(chat.encoder.embed_tokens)  # tied: the embedding is the head, so it stays with compute
        assert len(streamer.plan.streamed) == 3 and ledger.peak < head + 3 * module_bytes(chat.last)
    finally:
        streamer.detach()


def test_cancel_and_progress(tied, tokenizer_dir):
    _, path = tied
    chat = ours(path, tokenizer_dir)
    seen = []
    with pytest.raises(zc.ZImageInterrupted):
        en.enhance(chat, "a fox", max_tokens=30, callback=lambda n, total, text: seen.append((n, total, text)),
                   cancel=lambda: len(seen) >= 3)
    assert [s[:2] for s in seen] == [(1, 30), (2, 30), (3, 30)] and seen[2][2].startswith(seen[1][2])
    text = en.enhance(chat, "a fox", max_tokens=12)
    assert text == en.clean(chat.tokenizer.tok.decode(en.generate(chat, chat.tokenizer.ids(en.chat_text("a fox")), max_tokens=12),
                                                       skip_special_tokens=True))
    assert en.enhance(chat, "  ") == "  "


def test_clean():
    assert en.clean("<think>\nplan\n</think>\n\n“A fox on a stone.”") == "A fox on a stone."
    assert en.clean('  A sign reads "OPEN".') == 'A sign reads "OPEN".'


def test_encoder_only_file_is_refused(tmp_path, tokenizer_dir):
    from tiny import tiny_qwen

    m = tiny_qwen(0)
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("norm.")}
    save_file({"model." + k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "enc.safetensors"))
    te = zc.load_text_encoder(str(tmp_path / "enc.safetensors"), tokenizer=tokenizer_dir)
    with pytest.raises(zc.ZImageError, match=r"enc.safetensors has no final norm"):
        en.load_chat(te)


@pytest.mark.comfyui
def test_node_in_real_comfyui_feeds_text_encode(comfy_server, tokenizer_dir):
    """Enhancer → Z-Image Text Encode → sampler in a real server; the caption equals ours in-process (greedy)."""
    import os

    from comfy_harness import load_workflow, to_api

    info = comfy_server.get("/object_info")
    node = info["ZImagePromptEnhancer"]
    assert node["category"] == "Z-Image" and node["output"] == ["STRING"]
    assert all(spec[1].get("tooltip") for group in ("required", "optional") for spec in node["input"].get(group, {}).values())
    prompt = to_api(load_workflow("z_image_turbo_text_to_image.json"), info)
    enc = next(k for k, n in prompt.items() if n["class_type"] == "ZImageTextEncode")
    loader = prompt[enc]["inputs"]["text_encoder"]
    for n in prompt.values():
        if n["class_type"] == "ZImageEmptyLatent":
            n["inputs"].update(resolution="custom", width=128, height=128)
    prompt["90"] = {"class_type": "ZImagePromptEnhancer", "inputs": {
        "text_encoder": loader, "prompt": "a red fox", "seed": 0, "temperature": 0.0, "max_tokens": 16}}
    prompt["91"] = {"class_type": "PreviewAny", "inputs": {"source": ["90", 0]}}
    prompt[enc]["inputs"]["prompt"] = ["90", 0]
    msgs, _ = comfy_server.run_with_messages(prompt)
    assert msgs[-1]["type"] == "execution_success", msgs[-1]
    assert [m["data"]["value"] for m in msgs if m["type"] == "progress" and m["data"]["node"] == "90"][-1] <= 16
    entry = comfy_server.wait(msgs[-1]["data"]["prompt_id"])  # the history is written just after the success message
    text = entry["outputs"]["91"]["text"][0]
    assert comfy_server.images(entry)[0].shape[:2] == (128, 128)
    path = os.path.join(comfy_server.base, "models", "text_encoders", "qwen_3_4b.safetensors")
    chat = en.load_chat(zc.load_text_encoder(path, dtype=torch.float32, tokenizer=tokenizer_dir))
    assert text == en.enhance(chat, "a red fox", max_tokens=16, temperature=0.0)


def test_cli_enhance_prints_the_caption(tied, tokenizer_dir, capsys):
    from zimage_core import cli

    _, path = tied
    args = ["enhance", "-p", "a red fox", "--text-encoder", path, "--tokenizer", tokenizer_dir, "--dtype", "fp32",
            "--device", "cpu", "--temperature", "0.9", "--max-tokens", "10", "--seed", "4"]
    assert cli.main(args) == 0
    chat = en.load_chat(zc.load_text_encoder(path, dtype=torch.float32, tokenizer=tokenizer_dir))
    assert capsys.readouterr().out.strip() == en.enhance(chat, "a red fox", max_tokens=10, temperature=0.9, seed=4)
