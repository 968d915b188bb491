"""The standalone command end to end on tiny weights in a temporary ComfyUI-style models/ folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny import sample_picture, write_models_dir

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ComfyUI") / "models"
    write_models_dir(str(root))
    return str(root)


def run(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "zimage_core", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_batch_writes_pngs_with_parameters(models, tokenizer_dir, tmp_path):
    out = tmp_path / "out" / "fox.png"
    r = run(["generate", "--models", models, "--tokenizer", tokenizer_dir, "--dtype", "fp32", "-p", "a fox",
             "--width", "64", "--height", "48", "--batch-size", "2", "--seed", "11", "-o", str(out)])
    assert r.returncode == 0, r.stderr
    files = [tmp_path / "out" / "fox_00001.png", tmp_path / "out" / "fox_00002.png"]
    a, b = (pixels(f) for f in files)
    assert a.shape == (48, 64, 3) and a.std() > 1 and np.abs(a - b).mean() > 1  # not constant; batch items differ
    meta = Image.open(files[0]).info
    assert "a fox" in meta["parameters"] and "Seed: 11" in meta["parameters"] and "Steps: 8" in meta["parameters"]
    info = json.loads(meta["zimage"])
    assert info["seed"] == 11 and info["preset"] == "turbo" and info["transformer"].endswith("z_image_turbo_bf16.safetensors")
    # same seed → same image; another seed → another image. The batch of one runs other matmul shapes than the
    # batch of two (other CPU kernels: ~3e-6 apart on an AMD EPYC), so a pixel may round the other way
    r2 = run(["generate", "--models", models, "--tokenizer", tokenizer_dir, "--dtype", "fp32", "-p", "a fox",
              "--width", "64", "--height", "48", "--seed", "11", "-o", str(tmp_path / "again.png")])
    assert r2.returncode == 0 and np.abs(pixels(tmp_path / "again.png") - a).max() <= 1
    r3 = run(["generate", "--models", models, "--tokenizer", tokenizer_dir, "--dtype", "fp32", "-p", "a fox",
              "--width", "64", "--height", "48", "--seed", "12", "-o", str(tmp_path / "other.png")])
    assert r3.returncode == 0 and np.abs(pixels(tmp_path / "other.png") - a).mean() > 1


def test_img2img_and_inpaint_from_the_command_line(models, tokenizer_dir, tmp_path):
    sample_picture(64, 48).save(tmp_path / "in.png")
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 32, 48))
    mask.save(tmp_path / "mask.png")
    r = run(["generate", "--models", models, "--tokenizer", tokenizer_dir, "--dtype", "fp32", "-p", "paint",
             "--init-image", str(tmp_path / "in.png"), "--strength", "0.5", "--preset", "base", "--steps", "4",
             "--mask", str(tmp_path / "mask.png"), "--vae-tile", "32", "-o", str(tmp_path / "inpaint.png")])
    assert r.returncode == 0, r.stderr
    out = pixels(tmp_path / "inpaint.png")
    assert out.shape == (48, 64, 3)
    assert json.loads(Image.open(tmp_path / "inpaint.png").info["zimage"])["strength"] == 0.5


def test_reference_editing_from_the_command_line(models, tokenizer_dir, tmp_path):
    sample_picture(96, 64).save(tmp_path / "ref.png")
    r = run(["generate", "--models", models, "--tokenizer", tokenizer_dir, "--dtype", "fp32", "-p", "make it winter",
             "--reference", str(tmp_path / "ref.png"), "-o", str(tmp_path / "edit.png")])
    assert r.returncode == 0, r.stderr
    assert pixels(tmp_path / "edit.png").shape == (64, 96, 3)  # the reference's size


def test_missing_weights_say_what_to_download(tmp_path):
    r = run(["generate", "--models", str(tmp_path), "-p", "x"])
    assert r.returncode == 2
    assert "Could not find the transformer, text encoder and VAE" in r.stderr and "qwen_3_4b.safetensors" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_size_is_a_clear_error(models, tokenizer_dir, tmp_path):
    r = run(["generate", "--models", models, "--tokenizer", tokenizer_dir, "-p", "x", "--width", "100", "--height", "64",
             "-o", str(tmp_path / "x.png")])
    assert r.returncode == 2 and "width 100 is not a positive multiple of 16" in r.stderr and "Traceback" not in r.stderr


def test_info(models):
    r = run(["info", os.path.join(models, "diffusion_models", "z_image_turbo_bf16.safetensors")])
    assert r.returncode == 0 and "Z-Image transformer" in r.stdout and "layout: comfyui" in r.stdout


def test_lora_option(models, tokenizer_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    lora = {}
    for i in range(2):
        k = f"diffusion_model.layers.{i}.attention.to_q"
        lora[k + ".lora_A.weight"], lora[k + ".lora_B.weight"] = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
    save_file(lora, str(tmp_path / "l.safetensors"))
    args = ["generate", "--models", models, "--tokenizer", tokenizer_dir, "--dtype", "fp32", "-p", "x", "--width", "64",
            "--height", "48", "--seed", "3"]
    assert run(args + ["-o", str(tmp_path / "plain.png")]).returncode == 0
    r = run(args + ["--lora", f"{tmp_path / 'l.safetensors'}:0.9", "-o", str(tmp_path / "lora.png")])
    assert r.returncode == 0, r.stderr
    assert np.abs(pixels(tmp_path / "lora.png") - pixels(tmp_path / "plain.png")).mean() > 0.5
    assert json.loads(Image.open(tmp_path / "lora.png").info["zimage"])["lora"] == [f"{tmp_path / 'l.safetensors'}:0.9"]
    bad = run(args + ["--lora", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x.png")])
    assert bad.returncode == 2 and "missing.safetensors: file not found" in bad.stderr
