"""Our FLUX autoencoder against diffusers' AutoencoderKL on the same random weights, both file namings,
and exact tiling (tiled = untiled up to rounding, so no seams)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from tiny import rel_err, sample_picture, save_bfl_vae, tiny_vae

import zimage_core as zc
from zimage_core.pipeline import image_to_tensor


@pytest.fixture(scope="module")
def ref():
    return tiny_vae(0)


@pytest.fixture(scope="module")
def ae(ref, tmp_path_factory):
    return zc.load_autoencoder(save_bfl_vae(ref, str(tmp_path_factory.mktemp("vae") / "ae.safetensors")))


def test_bfl_names_are_the_real_ones(ref, tmp_path):
    from safetensors import safe_open

    path = save_bfl_vae(ref, str(tmp_path / "ae.safetensors"))
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("encoder.mid.attn_1.q.weight").get_shape() == [64, 64, 1, 1]
    for k in ["encoder.conv_in.weight", "encoder.down.0.block.1.conv2.weight", "encoder.down.2.downsample.conv.weight",
              "encoder.down.2.block.0.nin_shortcut.weight", "encoder.mid.block_2.norm1.bias", "encoder.norm_out.weight",
              "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.2.conv1.weight", "decoder.mid.attn_1.proj_out.bias",
              "decoder.norm_out.bias", "decoder.conv_out.weight"]:
        assert k in keys, k
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)  # the full-resolution level has no upsampler


def test_decode_and_encode_equal_diffusers(ref, ae):
    z = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = (ref.decode(z).sample / 2 + 0.5).clamp(0, 1)
        assert rel_err(ae.decode(z), expect) < 2e-6
        img = image_to_tensor(sample_picture(64, 48, seed=4))
        assert rel_err(ae.encode(img), ref.encode(img * 2 - 1).latent_dist.mean) < 2e-6
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert rel_err(ae.encode(img, generator=g1), ref.encode(img * 2 - 1).latent_dist.sample(generator=g2)) < 2e-6


def test_both_namings_load_the_same_weights(ref, ae, tmp_path):
    folder = tmp_path / "Z-Image-Turbo" / "vae"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    json.dump(dict(ref.config), open(folder / "config.json", "w"), default=list)
    for other in (zc.load_autoencoder(str(folder)), zc.load_autoencoder(str(folder.parent))):
        a, b = ae.state_dict(), other.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefixed_single_file(ref, tmp_path):
    from tiny import bfl_vae_state_dict

    save_file({"vae." + k: v for k, v in bfl_vae_state_dict(ref.state_dict()).items()}, str(tmp_path / "ckpt.safetensors"))
    assert zc.load_autoencoder(str(tmp_path / "ckpt.safetensors")).decoder.conv_out.weight.shape[0] == 3


@pytest.mark.parametrize("tile", [64, 96, 128])
def test_tiled_decode_equals_untiled(ae, tile):
    """Exact tiling: the measured difference is rounding (≈6e-7 relative, max |Δ| ≈ 5e-6 of a [0, 1] image)."""
    z = ae.encode(image_to_tensor(sample_picture(256, 192, seed=3)))
    full, tiled = ae.decode(z), ae.decode(z, tile=tile)
    assert rel_err(tiled, full) < 5e-6 and (tiled - full).abs().max() < 1e-4


@pytest.mark.parametrize("tile", [64, 100])
def test_tiled_encode_equals_untiled(ae, tile):
    img = image_to_tensor(sample_picture(256, 192, seed=6))
    assert rel_err(ae.encode(img, tile=tile), ae.encode(img)) < 5e-6


def test_wrong_files_are_named(tmp_path):
    from tiny import diffusers_transformer, save_comfyui

    dit = save_comfyui(diffusers_transformer(), str(tmp_path / "dit.safetensors"))
    with pytest.raises(zc.ZImageError, match="dit.safetensors looks like a Z-Image transformer, not the FLUX autoencoder"):
        zc.load_autoencoder(dit)
    sd = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
          "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
          "decoder.up.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3)}
    save_file(sd, str(tmp_path / "sdxl_vae.safetensors"))
    with pytest.raises(zc.ZImageError, match="4 latent channels; Z-Image needs the 16-channel FLUX autoencoder"):
        zc.load_autoencoder(str(tmp_path / "sdxl_vae.safetensors"))
    assert os.path.exists(dit)


def test_mid_block_attention_in_query_chunks_is_exact(ae, monkeypatch):
    """The mid-block's one 512-wide head takes its queries in chunks (bounded score memory): same result."""
    import zimage_core.autoencoder as autoencoder

    z = ae.encode(image_to_tensor(sample_picture(256, 192, seed=4)))
    whole = ae.decode(z)
    monkeypatch.setattr(autoencoder, "SCORE_ELEMENTS", 100 * (256 // 8) * (192 // 8))  # 100 queries a chunk
    chunked = ae.decode(z)
    assert rel_err(chunked, whole) < 1e-6
