"""Our Qwen3 prompt encoder against transformers' Qwen3Model hidden_states[-2] and diffusers' encode_prompt.

Truth: the transformers model in float64. fp32: ours must be within 2e-6 and ≤ 2× transformers' own fp32
error (both measure ≈4e-7 here). bf16 (truth: bf16-rounded weights in float64): measured ≈8–9e-3 for ours,
1.0–1.2e-2 for transformers in bf16; bound 2e-2 and ≤ 1.5× transformers'.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from tiny import randomize_, rel_err

import zimage_core as zc
from zimage_core.safetensors_io import SafetensorsFile

PROMPTS = ["a cat", "一只猫在月光下 with emoji 🐱 and digits 12345, in the style of ukiyo-e", "", "<|im_end|> literal"]


def qwen(seed=0, dtype=torch.float32, layers=3, hidden=32):
    from transformers import Qwen3Config, Qwen3Model

    c = Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6)
    return randomize_(Qwen3Model(c), seed).to(dtype).eval()


def comfy_te_file(model, path, dtype=None, lm_head=True):
    sd = {"model." + k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.state_dict().items()}
    if lm_head:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(path))
    return str(path)


def hf_folder(model, root, prefix="", shards=2):
    folder = os.path.join(root, "text_encoder")
    os.makedirs(folder, exist_ok=True)
    sd = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    keys, wm = list(sd), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in keys[i::shards]}, os.path.join(folder, name))
        wm.update({k: name for k in keys[i::shards]})
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    json.dump({"rope_theta": 1e6, "rms_norm_eps": 1e-6, "model_type": "qwen3"}, open(os.path.join(folder, "config.json"), "w"))
    return root


def reference(model, hf_tokenizer, prompts):
    from zimage_core.tokenizer import TEMPLATE

    texts = [TEMPLATE.format(p) for p in prompts]
    enc = hf_tokenizer(texts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hs = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask.bool(), output_hidden_states=True).hidden_states[-2]
    return [hs[i][enc.attention_mask[i].bool()] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def ref_models():
    return qwen(0), qwen(0, torch.float64)


def test_fp32_parity_batch_of_different_lengths(ref_models, hf_tokenizer, tokenizer_dir, tmp_path):
    te = zc.load_text_encoder(comfy_te_file(ref_models[0], tmp_path / "qwen_3_4b.safetensors"), tokenizer=tokenizer_dir)
    assert te.cfg.n_layers_file == 3 and len(te.layers) == 2
    ours = te.encode(PROMPTS)
    truth = reference(ref_models[1], hf_tokenizer, PROMPTS)
    theirs = reference(ref_models[0], hf_tokenizer, PROMPTS)
    assert [o.shape for o in ours] == [t.shape for t in truth]
    for o, t, r in zip(ours, truth, theirs):
        e_ours, e_ref = rel_err(o, t), rel_err(r, t)
        assert e_ours < 2e-6 and e_ours < 2 * e_ref + 1e-7, (e_ours, e_ref)
    # one prompt alone gives the same as inside the batch
    single = te.encode([PROMPTS[1]])[0]
    assert torch.allclose(single, ours[1], atol=1e-6)


def test_bf16_within_measured_bound(ref_models, hf_tokenizer, tokenizer_dir, tmp_path):
    te = zc.load_text_encoder(comfy_te_file(ref_models[0], tmp_path / "bf16.safetensors", torch.bfloat16), tokenizer=tokenizer_dir)
    assert te.compute_dtype == torch.bfloat16
    ref_bf16 = qwen(0).to(torch.bfloat16)
    ref64 = qwen(0)
    ref64.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref64.state_dict().items()})
    ref64 = ref64.double()
    ours = te.encode(PROMPTS)
    truth = reference(ref64, hf_tokenizer, PROMPTS)
    theirs = reference(ref_bf16, hf_tokenizer, PROMPTS)
    for o, t, r in zip(ours, truth, theirs):
        e_ours, e_ref = rel_err(o, t), rel_err(r, t)
        assert o.dtype == torch.bfloat16 and e_ours < 2e-2 and e_ours < 1.5 * e_ref + 2e-3, (e_ours, e_ref)


def test_equals_diffusers_encode_prompt(ref_models, hf_tokenizer, tokenizer_dir, tmp_path):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=ref_models[0], tokenizer=hf_tokenizer, transformer=None)
    pos, neg = pipe.encode_prompt(PROMPTS[:2], device="cpu", do_classifier_free_guidance=True)
    te = zc.load_text_encoder(comfy_te_file(ref_models[0], tmp_path / "te.safetensors"), tokenizer=tokenizer_dir)
    ours_pos, ours_neg = te.encode(PROMPTS[:2]), te.encode(["", ""])
    for o, r in zip(ours_pos + ours_neg, pos + neg):
        assert o.shape == r.shape and rel_err(o, r) < 2e-6


@pytest.mark.parametrize("prefix", ["", "model."])
def test_hf_folder_layouts_load_the_same(ref_models, tokenizer_dir, tmp_path, prefix):
    a = zc.load_text_encoder(comfy_te_file(ref_models[0], tmp_path / "a.safetensors"), tokenizer=tokenizer_dir)
    root = hf_folder(ref_models[0], str(tmp_path / "hf"), prefix)
    import shutil

    shutil.copytree(tokenizer_dir, os.path.join(root, "tokenizer"))
    b = zc.load_text_encoder(root)  # tokenizer found in <root>/tokenizer
    c = zc.load_text_encoder(os.path.join(root, "text_encoder"))
    for m in (b, c):
        for k, v in a.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k
    assert b.tokenizer.folder == os.path.join(root, "tokenizer")


def test_skipped_weights_are_never_read(ref_models, tokenizer_dir, tmp_path, monkeypatch):
    path = comfy_te_file(ref_models[0], tmp_path / "te.safetensors")
    read = []
    orig = SafetensorsFile.get
    monkeypatch.setattr(SafetensorsFile, "get", lambda self, k: (read.append(k), orig(self, k))[1])
    te = zc.load_text_encoder(path, tokenizer=tokenizer_dir)
    te.encode(["x"])
    assert read and not any(k.startswith(("model.layers.2.", "model.norm.", "lm_head.")) for k in read), sorted(read)
    assert {k for k in read} >= {"model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"}


def test_fp8_mixed_file(ref_models, tokenizer_dir, tmp_path):
    """ComfyUI's *_fp8_mixed layout: some linears fp8 with weight_scale + comfy_quant, the rest bf16."""
    sd = {"model." + k: v.contiguous() for k, v in ref_models[0].state_dict().items()}
    out, expect = {}, {}
    for k, v in sd.items():
        if k.endswith(("mlp.up_proj.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            s = float(v.abs().max()) / 448
            out[k] = (v / s).to(torch.float8_e4m3fn)
            layer = k[: -len(".weight")]
            out[layer + ".weight_scale"] = torch.tensor(s)
            out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
            expect[k[len("model."):]] = out[k].float() * s
        else:
            out[k] = v.to(torch.bfloat16)
            expect[k[len("model."):]] = out[k].float()
    save_file(out, str(tmp_path / "qwen_3_4b_fp8_mixed.safetensors"))
    te = zc.load_text_encoder(str(tmp_path / "qwen_3_4b_fp8_mixed.safetensors"), dtype=torch.float32, tokenizer=tokenizer_dir)
    assert te.layers[0].mlp.gate_up_proj.weight.dtype == torch.float32  # bf16 gate + fp8 up: widened to fit one matmul
    assert te.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    ref = qwen(0)
    ref.load_state_dict(expect)
    ids = torch.tensor([te.tokenizer(["fp8 prompt"])[0][0]])
    with torch.no_grad():
        r = ref(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
    assert rel_err(te(ids)[0], r) < 2e-6


def test_wrong_models_are_named(tmp_path, tokenizer_dir):
    from tiny import diffusers_transformer, save_comfyui

    cases = {
        "dit.safetensors": (save_comfyui(diffusers_transformer(), str(tmp_path / "dit.safetensors")), "Z-Image transformer"),
    }
    t5 = {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4), "shared.weight": torch.zeros(10, 4)}
    clip = {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}
    qwen25 = {"model.embed_tokens.weight": torch.zeros(10, 8), "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8),
              "model.layers.0.mlp.gate_proj.weight": torch.zeros(8, 8)}
    for name, sd, expect in [("t5.safetensors", t5, "T5"), ("clip.safetensors", clip, "CLIP"), ("qwen25.safetensors", qwen25, "Qwen2/Llama")]:
        save_file(sd, str(tmp_path / name))
        cases[name] = (str(tmp_path / name), expect)
    for name, (path, expect) in cases.items():
        with pytest.raises(zc.ZImageError) as e:
            zc.load_text_encoder(path, tokenizer=tokenizer_dir)
        assert name in str(e.value) and expect in str(e.value) and "qwen_3_4b.safetensors" in str(e.value)


def test_wrong_size_is_named(tmp_path, tokenizer_dir):
    path = comfy_te_file(qwen(1, hidden=64), tmp_path / "qwen3_other.safetensors")
    with pytest.raises(zc.ZImageError, match=r"hidden size 64\), but this Z-Image model reads Qwen3-4B"):
        zc.load_text_encoder(path, tokenizer=tokenizer_dir, expect_hidden=2560)
