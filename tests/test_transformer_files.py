"""The loader against the complete real key sets (on the meta device) and against bad files."""

import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file
from tiny import diffusers_transformer, save_comfyui

import zimage_core as zc
from zimage_core.safetensors_io import DTYPES
from zimage_core.transformer import ZImageConfig, ZImageTransformer
from zimage_core.transformer_files import internal_shape_fn, transformer_plan

REF = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")
REF = os.environ.get("ZIMAGE_REFERENCE_DIR", REF)


class HeaderOnly:
    """A weight-file stand-in made from a reference key list: names, shapes and dtypes, no data."""

    def __init__(self, listing: str, prefix: str = ""):
        self.path, self.metadata, self._shapes = listing, {}, {}
        with open(listing) as f:
            for line in f:
                if line.startswith("#") or not line.strip():
                    continue
                name, shape, dtype = line.rstrip("\n").split("\t")
                self._shapes[prefix + name] = (tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), dtype)

    def keys(self):
        return list(self._shapes)

    def __contains__(self, k):
        return k in self._shapes

    def shape(self, k):
        return self._shapes[k][0]

    def dtype(self, k):
        return getattr(torch, self._shapes[k][1])


def listing(name):
    path = os.path.join(REF, name)
    if not os.path.exists(path):
        pytest.skip(f"reference key list {path} not found (set ZIMAGE_REFERENCE_DIR)")
    return path


@pytest.mark.parametrize(
    "name,prefix,count",
    [
        ("zimage_turbo_keys.txt", "", 521),
        ("zimage_turbo_keys_comfyui.txt", "", 453),
        ("zimage_turbo_keys_comfyui.txt", "model.diffusion_model.", 453),
    ],
)
def test_full_real_key_set_maps_onto_the_model(name, prefix, count):
    files = HeaderOnly(listing(name), prefix)
    assert len(files.keys()) == count
    plan, unexpected, layout = transformer_plan(files)
    assert unexpected == []
    assert layout == ("diffusers" if "comfyui" not in name else "comfyui")
    cfg = ZImageConfig.from_weights(internal_shape_fn(files, plan), list(plan))
    assert (cfg.dim, cfg.n_layers, cfg.n_noise_refiner, cfg.n_context_refiner, cfg.n_heads) == (3840, 30, 2, 2, 30)
    assert (cfg.ffn_hidden, cfg.cap_feat_dim, cfg.axes_dims, cfg.adaln_dim) == (10240, 2560, (32, 48, 48), 256)
    with torch.device("meta"):
        model = ZImageTransformer(cfg)
    params = dict(model.named_parameters())
    assert set(params) == set(plan), (set(params) ^ set(plan))
    shape = internal_shape_fn(files, plan)
    for k, p in params.items():
        assert tuple(p.shape) == shape(k), k
    assert sum(p.numel() for p in params.values()) == 6_154_908_736
    consumed = {k for src in plan.values() for k in src.keys}
    assert consumed == set(files.keys())  # every tensor of the real file is used


def write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return str(path)


def fake(keys_shapes):
    return {k: torch.zeros(s) for k, s in keys_shapes.items()}


@pytest.mark.parametrize(
    "tensors,expected",
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4), "model.diffusion_model.output_blocks.0.0.weight": (4,),
          "conditioner.embedders.1.model.ln_final.weight": (4,)}, "SDXL"),
        ({"double_blocks.0.img_attn.qkv.weight": (6, 2), "single_blocks.0.linear1.weight": (2, 2)}, "FLUX"),
        ({"cap_embedder.1.weight": (2304, 8), "noise_refiner.0.attention.k_norm.weight": (8,)}, "Lumina"),
        ({"model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.q_norm.weight": (4,),
          "model.layers.0.mlp.gate_proj.weight": (8, 8), "model.embed_tokens.weight": (100, 8)}, "text encoder"),
        ({"encoder.down.0.block.0.conv1.weight": (4, 4, 3, 3), "decoder.up.0.block.0.conv1.weight": (4, 4, 3, 3),
          "decoder.conv_in.weight": (8, 16, 3, 3)}, "VAE"),
        ({"something.else": (3,)}, "no model family"),
    ],
)
def test_wrong_model_is_named(tmp_path, tensors, expected):
    path = write(tmp_path / "wrong.safetensors", fake(tensors))
    with pytest.raises(zc.ZImageError) as e:
        zc.load_transformer(path)
    msg = str(e.value)
    assert "wrong.safetensors" in msg and expected in msg and "not a Z-Image transformer" in msg


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return save_comfyui(diffusers_transformer(seed=2), str(tmp_path_factory.mktemp("good") / "z.safetensors"))


def test_truncated_file(tmp_path, good_file):
    data = open(good_file, "rb").read()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(zc.ZImageError, match=r"truncated\.safetensors is truncated: 1,000 bytes are missing"):
        zc.load_transformer(str(path))


def test_corrupt_header(tmp_path, good_file):
    data = bytearray(open(good_file, "rb").read())
    data[10:20] = b"\x00\xff" * 5
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(data))
    with pytest.raises(zc.ZImageError, match="corrupt.safetensors has a corrupt safetensors header"):
        zc.load_transformer(str(tmp_path / "corrupt.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"xx")
    with pytest.raises(zc.ZImageError, match="garbage.safetensors is not a valid safetensors file"):
        zc.load_transformer(str(tmp_path / "garbage.safetensors"))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(zc.ZImageError, match="empty or truncated"):
        zc.load_transformer(str(tmp_path / "empty.safetensors"))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    from safetensors.torch import load_file

    sd = load_file(save_comfyui(diffusers_transformer(seed=2), str(tmp_path / "full.safetensors")))
    missing = {k: v for k, v in sd.items() if not k.startswith("layers.1.feed_forward")}
    with pytest.raises(zc.ZImageError) as e:
        zc.load_transformer(write(tmp_path / "missing.safetensors", missing))
    assert "missing.safetensors: 3 tensor(s)" in str(e.value) and "layers.1.feed_forward.w1.weight" in str(e.value)
    extra = dict(sd, **{"lora_unet_foo.alpha": torch.ones(()), "extra_head.weight": torch.ones(3, 3)})
    with pytest.raises(zc.ZImageError) as e:
        zc.load_transformer(write(tmp_path / "extra.safetensors", extra))
    assert "2 tensor(s) do not belong" in str(e.value) and "extra_head.weight" in str(e.value)
    bad = dict(sd, **{"layers.0.feed_forward.w2.weight": torch.ones(64, 100)})
    with pytest.raises(zc.ZImageError, match=r"layers.0.feed_forward.w2.weight has shape \[64, 100\]"):
        zc.load_transformer(write(tmp_path / "shape.safetensors", bad))


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["ZIMAGE_PICKLE_MARKER"],))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.safetensors"])
def test_pickle_files_are_refused_never_unpickled(tmp_path, monkeypatch, name):
    marker = tmp_path / "executed"
    monkeypatch.setenv("ZIMAGE_PICKLE_MARKER", str(marker))
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save({"x": _Boom()}, str(path))  # zip container
    else:
        path.write_bytes(pickle.dumps({"state_dict": _Boom()}, protocol=4))
    with pytest.raises(zc.ZImageError, match="never unpickled"):
        zc.load_transformer(str(path))
    assert not marker.exists()


def test_folder_with_only_pickle_weights(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(zc.ZImageError, match="pickle-format weights"):
        zc.load_transformer(str(tmp_path))


def test_unsupported_quant_format_is_named(tmp_path, good_file):
    import json

    from safetensors.torch import load_file

    sd = load_file(good_file)
    sd["layers.0.attention.qkv.comfy_quant"] = torch.tensor(list(json.dumps({"format": "svdquant_w2"}).encode()), dtype=torch.uint8)
    with pytest.raises(zc.ZImageError, match="uses quantisation format 'svdquant_w2'"):
        zc.load_transformer(write(tmp_path / "nvfp4.safetensors", sd))


def test_dtype_table_covers_safetensors_types():
    assert {"F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"} <= set(DTYPES)
