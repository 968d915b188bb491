"""LoRA in every dialect from the same low-rank deltas, exact on the fused qkv, against diffusers' load_lora_weights."""

import re

import pytest
import torch
from safetensors.torch import save_file
from tiny import diffusers_transformer, rel_err, save_comfyui

import zimage_core as zc
from zimage_core.lora import LoraPatcher, apply_lora_specs, read_lora

RANK = 4


@pytest.fixture(scope="module")
def ref():
    return diffusers_transformer(seed=1)


@pytest.fixture(scope="module")
def path(ref, tmp_path_factory):
    return save_comfyui(ref, str(tmp_path_factory.mktemp("lora") / "z.safetensors"))


def load(path, **kw):
    return zc.load_transformer(path, dtype=torch.float32, **kw)


def targets(ref):
    """diffusers module names a LoRA trainer targets (attention q/k/v/out, FFN, modulation), with (out, in)."""
    names = {}
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear) and any(s in name for s in ("attention.to_", "feed_forward.w", "adaLN_modulation.0")) \
                and "final_layer" not in name:
            names[name] = (m.out_features, m.in_features)
    return names


@pytest.fixture(scope="module")
def deltas(ref):
    g = torch.Generator().manual_seed(42)
    return {n: (torch.randn(RANK, i, generator=g) * 0.1, torch.randn(o, RANK, generator=g) * 0.1) for n, (o, i) in targets(ref).items()}


def write(tmp, name, sd):
    p = str(tmp / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, p)
    return p


def peft(deltas, prefix="", tag=""):
    sd = {}
    for n, (down, up) in deltas.items():
        sd[f"{prefix}{n}.lora_A{tag}.weight"] = down
        sd[f"{prefix}{n}.lora_B{tag}.weight"] = up
    return sd


def kohya(deltas, prefix, alpha=2.0):
    """lora_down/lora_up/alpha with underscores; weights pre-scaled so alpha/rank gives the same delta."""
    sd = {}
    for n, (down, up) in deltas.items():
        k = prefix + n.replace(".", "_")
        sd[k + ".lora_down.weight"] = down
        sd[k + ".lora_up.weight"] = up * (RANK / alpha)
        sd[k + ".alpha"] = torch.tensor(alpha)
    return sd


def comfy_fused(deltas, mix=False):
    """ComfyUI names with one fused qkv LoRA per block (block-diagonal up), optionally only for some blocks."""
    sd, done = {}, set()
    for n, (down, up) in deltas.items():
        if ".attention.to_" in n and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            base = n.rsplit(".", 1)[0]
            if mix and base.startswith("layers.1"):
                sd[f"diffusion_model.{n}.lora_down.weight"], sd[f"diffusion_model.{n}.lora_up.weight"] = down, up
                continue
            if base in done:
                continue
            done.add(base)
            parts = [deltas[f"{base}.to_{p}"] for p in "qkv"]
            d = torch.cat([p[0] for p in parts])
            u = torch.block_diag(*[p[1] for p in parts])
            sd[f"diffusion_model.{base}.qkv.lora_down.weight"], sd[f"diffusion_model.{base}.qkv.lora_up.weight"] = d, u
            continue
        k = n.replace("attention.to_out.0", "attention.out")
        sd[f"diffusion_model.{k}.lora_down.weight"], sd[f"diffusion_model.{k}.lora_up.weight"] = down, up
    return sd


DIALECTS = {
    "diffusers": lambda d: peft(d, "transformer."),
    "bare_peft": lambda d: peft(d),
    "peft_base_model": lambda d: peft(d, "base_model.model."),
    "ai_toolkit": lambda d: peft(d, "diffusion_model."),
    "diffsynth": lambda d: peft(d, "", ".default"),
    "kohya_musubi": lambda d: kohya(d, "lora_unet_"),
    # aigc-apps/VideoX-Fun videox_fun/utils/lora_utils.py (Z-Image-Fun LoRAs): "lora_unet" + "." + "" (the root
    # module's name) + "." + child name, dots → "_", lora_down/lora_up/alpha, scale alpha / rank
    "videox_fun": lambda d: kohya(d, "lora_unet__"),
    "lycoris": lambda d: kohya(d, "lycoris_", alpha=8.0),
    "comfyui_fused": lambda d: comfy_fused(d),
    "mixed_fused_and_split": lambda d: comfy_fused(d, mix=True),
}


def expected_weights(path, deltas, strength=1.0):
    """The base model with every delta merged by hand, in diffusers terms, mapped onto our fused layout."""
    m = load(path)
    sd = m.state_dict()
    dim = m.cfg.dim
    for n, (down, up) in deltas.items():
        dw = strength * (up @ down)
        base, leaf = n.rsplit(".", 1)
        if leaf in ("to_q", "to_k", "to_v"):
            i = "qkv".index(leaf[-1])
            sd[f"{base}.qkv.weight"][i * dim:(i + 1) * dim] += dw
        elif n.endswith("attention.to_out.0"):
            sd[n.replace("to_out.0", "out") + ".weight"] += dw
        else:
            sd[n + ".weight"] += dw
    return sd


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_every_dialect_gives_the_same_weights(path, deltas, tmp_path, dialect):
    lora_path = write(tmp_path, f"{dialect}.safetensors", DIALECTS[dialect](deltas))
    m = load(path)
    lf = read_lora(lora_path, m)
    assert lf.unmatched == [], lf.unmatched[:5]
    LoraPatcher.of(m).apply([(lf, 0.8)])
    want = expected_weights(path, deltas, 0.8)
    for k, v in m.state_dict().items():
        assert torch.allclose(v, want[k], atol=1e-6, rtol=1e-5), k


def _forward_pair(theirs, ours, path):
    """(error of ours against diffusers, distance of the base model from diffusers) on one forward."""
    g = torch.Generator().manual_seed(0)
    x, t, cap = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.4]), [torch.randn(11, 32, generator=g)]
    with torch.no_grad():
        r = theirs(list(x.unsqueeze(2)), t, cap, return_dict=False)[0][0].squeeze(1)
        o = ours(x, t, cap)[0]
        base = load(path)(x, t, cap)[0]
    return rel_err(o, r), rel_err(base, r)


def test_equals_diffusers_load_lora_weights(path, deltas, tmp_path):
    from diffusers import ZImagePipeline

    lora_path = write(tmp_path, "pytorch_lora_weights.safetensors", DIALECTS["diffusers"](deltas))
    theirs = diffusers_transformer(seed=1)
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=theirs)
    pipe.load_lora_weights(lora_path, adapter_name="style")
    ours = load(path)
    apply_lora_specs(ours, [f"{lora_path}:1.0"])
    err, moved = _forward_pair(theirs, ours, path)
    assert err < 2e-6 and moved > 1e-3  # the LoRA did something, and the same thing


def test_merged_and_runtime_agree_and_removal_is_exact(path, deltas, tmp_path):
    lf_path = write(tmp_path, "k.safetensors", DIALECTS["kohya_musubi"](deltas))
    m = load(path)
    original = {k: v.clone() for k, v in m.state_dict().items()}
    lf = read_lora(lf_path, m)
    g = torch.Generator().manual_seed(1)
    x, t, cap = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6]), [torch.randn(7, 32, generator=g)]
    p = LoraPatcher.of(m)
    with torch.no_grad():
        p.apply([(lf, 1.2)])
        merged = m(x, t, cap)
        p.apply([(lf, 1.2)], runtime=True)
        assert all(torch.equal(v, original[k]) for k, v in m.state_dict().items())  # runtime leaves weights alone
        runtime = m(x, t, cap)
        p.apply([(lf, 0.5)])
        p.apply([])
        restored = m(x, t, cap)
    assert rel_err(merged, runtime) < 1e-5
    for k, v in m.state_dict().items():
        assert torch.equal(v, original[k]), k  # bit for bit
    with torch.no_grad():
        assert torch.equal(restored, load(path)(x, t, cap))


def test_stacking_two_loras_adds_their_deltas(path, deltas, tmp_path):
    half = {n: (d, u) for i, (n, (d, u)) in enumerate(deltas.items()) if i % 2 == 0}
    other = {n: (d * 0.5, u) for n, (d, u) in deltas.items()}
    a = write(tmp_path, "a.safetensors", DIALECTS["ai_toolkit"](half))
    b = write(tmp_path, "b.safetensors", DIALECTS["lycoris"](other))
    m = load(path)
    apply_lora_specs(m, [f"{a}:1.0", f"{b}:0.6"])
    want = expected_weights(path, half)
    extra = expected_weights(path, other, 0.6)
    base = load(path).state_dict()
    for k, v in m.state_dict().items():
        assert torch.allclose(v, want[k] + extra[k] - base[k], atol=1e-6, rtol=1e-5), k


def test_fp8_storage_gets_runtime_patches(path, deltas, tmp_path):
    lf_path = write(tmp_path, "d.safetensors", DIALECTS["diffusers"](deltas))
    m = load(path, storage_dtype=torch.float8_e4m3fn)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora_specs(m, [lf_path])
    assert all(torch.equal(v.view(torch.uint8) if v.dtype in (torch.float8_e4m3fn,) else v,
                           before[k].view(torch.uint8) if before[k].dtype in (torch.float8_e4m3fn,) else before[k])
               for k, v in m.state_dict().items())  # nothing re-quantised
    assert m.layers[0].attention.qkv.patches and m.layers[0].feed_forward.w1.patches
    x, t, cap = torch.randn(1, 16, 8, 8), torch.tensor([0.5]), [torch.randn(5, 32)]
    with torch.no_grad():
        out = m(x, t, cap)
        full = load(path)
        apply_lora_specs(full, [lf_path])
        # fp8 base weights, exact LoRA on top: close to the merged fp32 model within fp8 rounding
        assert rel_err(out, full(x, t, cap)) < 0.1


def test_streamed_blocks_carry_their_patches(path, deltas, tmp_path):
    from zimage_core.offload import BlockStreamer, plan_offload

    lf_path = write(tmp_path, "d.safetensors", DIALECTS["diffusers"](deltas))
    m = load(path)
    apply_lora_specs(m, [lf_path])
    LoraPatcher.of(m).apply([(read_lora(lf_path, m), 1.0)], runtime=True)
    x, t, cap = torch.randn(1, 16, 8, 8), torch.tensor([0.5]), [torch.randn(5, 32)]
    with torch.no_grad():  # the reference also on the executor's copies: matmuls on mmap views may round differently
        resident = BlockStreamer(m, plan_offload(m, mode="resident", device="cpu")).attach()
        want = m(x, t, cap)
        resident.detach()
        st = BlockStreamer(m, plan_offload(m, mode="min_vram", device="cpu")).attach()
        got = m(x, t, cap)
        st.detach()
    assert torch.equal(got, want)


def test_lokr(path, tmp_path):
    m = load(path)
    g = torch.Generator().manual_seed(3)
    w1, w2a, w2b = torch.randn(4, 4, generator=g), torch.randn(16, 2, generator=g), torch.randn(2, 16, generator=g)
    key = "lycoris_layers_0_attention_to_out_0"  # [64, 64] = kron(4×4, 16×16)
    sd = {f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b, f"{key}.alpha": torch.tensor(1.0)}
    p = write(tmp_path, "lokr.safetensors", sd)
    before = m.layers[0].attention.out.weight.clone()
    apply_lora_specs(m, [p])
    want = before + torch.kron(w1, w2a @ w2b) * (1.0 / 2)  # alpha / dim, dim = rank of the factored w2
    assert torch.allclose(m.layers[0].attention.out.weight, want, atol=1e-6)


def test_bad_loras_are_named(path, deltas, tmp_path):
    m = load(path)
    flux = write(tmp_path, "flux_lora.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
                                                      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 4)})
    with pytest.raises(zc.ZImageError, match="flux_lora.safetensors is a LoRA for FLUX.1"):
        read_lora(flux, m)
    sdxl = write(tmp_path, "sdxl.safetensors", {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(zc.ZImageError, match="for SD 1.x / SDXL"):
        read_lora(sdxl, m)
    qwen = write(tmp_path, "qwen.safetensors", {"transformer_blocks.0.img_mod.1.lora_A.weight": torch.zeros(4, 8)})
    with pytest.raises(zc.ZImageError, match="Qwen-Image"):
        read_lora(qwen, m)
    n = next(iter(deltas))
    bad = peft({n: (torch.zeros(4, 99), torch.zeros(deltas[n][1].shape[0], 4))}, "transformer.")
    with pytest.raises(zc.ZImageError, match=r"gives a .*×99 update but .* is"):
        read_lora(write(tmp_path, "big.safetensors", bad), m)
    rank = peft({n: (torch.zeros(4, deltas[n][0].shape[1]), torch.zeros(deltas[n][1].shape[0], 3))}, "transformer.")
    with pytest.raises(zc.ZImageError, match="rank mismatch"):
        read_lora(write(tmp_path, "rank.safetensors", rank), m)
    partial = dict(peft(deltas, "transformer."), **{"transformer.some_new_head.lora_A.weight": torch.zeros(2, 2),
                                                    "text_encoder.layers.0.q.lora_A.weight": torch.zeros(2, 2)})
    lf = read_lora(write(tmp_path, "partial.safetensors", partial), m)
    assert len(lf.unmatched) == 2 and "2 keys matched nothing" in lf.summary()


def test_fused_and_split_twins_apply_once_like_diffusers(path, deltas, tmp_path):
    """Anime-Z style files carry both fused ``qkv``/``out`` and split ``to.q``/``to_out.0`` copies; diffusers
    (loaders/lora_conversion_utils.py, the ``.lora.down.weight`` branch) skips the fused ones, and so do we."""
    from diffusers import ZImagePipeline

    g = torch.Generator().manual_seed(5)
    sd = {}
    for n, (down, up) in deltas.items():
        k = re.sub(r"attention\.to_([qkv])$", r"attention.to.\1", n)
        sd[f"diffusion_model.{k}.lora.down.weight"], sd[f"diffusion_model.{k}.lora.up.weight"] = down, up
        if n.endswith("attention.to_q") or n.endswith("attention.to_out.0"):  # a different fused twin
            base = n.rsplit(".attention.", 1)[0] + ".attention." + ("qkv" if n.endswith("to_q") else "out")
            rows = up.shape[0] * (3 if n.endswith("to_q") else 1)
            sd[f"diffusion_model.{base}.lora.down.weight"] = torch.randn(RANK, down.shape[1], generator=g)
            sd[f"diffusion_model.{base}.lora.up.weight"] = torch.randn(rows, RANK, generator=g)
    lora_path = write(tmp_path, "twins.safetensors", sd)
    theirs = diffusers_transformer(seed=1)
    ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=theirs).load_lora_weights(lora_path)
    ours = load(path)
    lf = read_lora(lora_path, ours)
    LoraPatcher.of(ours).apply([(lf, 1.0)])
    assert lf.unmatched == [] and len(lf.duplicates) == 2 * 2 * sum(n.endswith("to_q") for n in deltas)
    err, moved = _forward_pair(theirs, ours, path)
    assert err < 2e-6 and moved > 1e-3


def test_lora_adapter_metadata_alpha_like_diffusers(path, deltas, tmp_path):
    """diffusers training scripts save lora_alpha (and patterns) only in the ``lora_adapter_metadata`` header
    entry (ZImagePipeline.save_lora_weights(..., transformer_lora_adapter_metadata=...)); diffusers scales by it."""
    from diffusers import ZImagePipeline

    meta = {"r": RANK, "lora_alpha": 16, "alpha_pattern": {"feed_forward.w2": 2},
            "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", "adaLN_modulation.0"]}
    ZImagePipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=peft(deltas),
                                     transformer_lora_adapter_metadata=meta)
    lora_path = str(tmp_path / "pytorch_lora_weights.safetensors")
    theirs = diffusers_transformer(seed=1)
    ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=theirs).load_lora_weights(lora_path)
    ours = load(path)
    apply_lora_specs(ours, [lora_path])
    err, moved = _forward_pair(theirs, ours, path)
    assert err < 2e-6 and moved > 1e-3
    w2 = next(d for d in read_lora(lora_path, ours).deltas if d.target == "layers.0.feed_forward.w2")
    assert w2.scale == 2 / RANK  # the pattern, not lora_alpha


def test_full_diffs_for_norms_biases_and_embedders(path, deltas, tmp_path):
    """ComfyUI's trainer (comfy_extras/nodes_train.py: ``{module}.diff`` for 1-D weights, ``{module}.diff_b`` for
    biases, under the model's own names) and its extractor (nodes_lora_extract.py: ``.diff`` full deltas); applied
    as ComfyUI's comfy/lora.py does: weight += strength · diff. LyCORIS norm modules write ``w_norm``/``b_norm``."""
    m = load(path)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(9)
    full = {
        "layers.0.attention_norm1.weight": "diffusion_model.layers.0.attention_norm1.diff",
        "layers.1.attention.k_norm.weight": "diffusion_model.layers.1.attention.k_norm.diff",
        "layers.0.adaLN_modulation.0.bias": "diffusion_model.layers.0.adaLN_modulation.0.diff_b",
        "x_embedder.bias": "diffusion_model.x_embedder.diff_b",
        "cap_embedder.1.weight": "diffusion_model.cap_embedder.1.diff",
        "layers.1.ffn_norm1.weight": "lycoris_layers_1_ffn_norm1.w_norm",
        "t_embedder.mlp.0.bias": "lycoris_t_embedder_mlp_0.b_norm",
    }
    sd = dict(peft(deltas, "diffusion_model."))
    for name, key in full.items():
        sd[key] = torch.randn(base[name].shape, generator=g)
    lf = read_lora(write(tmp_path, "full.safetensors", sd), m)
    assert lf.unmatched == []
    LoraPatcher.of(m).apply([(lf, 0.7)])
    want = expected_weights(path, deltas, 0.7)
    for name, key in full.items():
        want[name] = want[name] + 0.7 * sd[key]
    for k, v in m.state_dict().items():
        assert torch.allclose(v, want[k], atol=1e-6, rtol=1e-5), k
    LoraPatcher.of(m).apply([])
    assert all(torch.equal(v, base[k]) for k, v in m.state_dict().items())
