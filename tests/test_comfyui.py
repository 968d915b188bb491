"""The nodes inside a real ComfyUI server: object_info, every example workflow, interrupt, wrong files."""

import copy
import os
import time

import numpy as np
import pytest
from comfy_harness import comfyui_path, comfyui_python, load_workflow, to_api

pytestmark = pytest.mark.comfyui
COMFY = comfyui_path()
if COMFY is None:
    pytest.skip("no ComfyUI found (set COMFYUI_PATH or put one in ~/ComfyUI): real-ComfyUI tests skipped",
                allow_module_level=True)

OUR_NODES = {"ZImageModelLoader", "ZImageTextEncoderLoader", "ZImageTextEncode", "ZImageSampler", "ZImageEmptyLatent",
             "ZImageImageToLatent", "ZImageLoraLoader", "ZImageEditEncode", "ZImageControlNetLoader", "ZImageApplyControlNet"}
WORKFLOW_FILES = sorted(f for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "example_workflows")) if f.endswith(".json"))


@pytest.fixture(scope="module")
def server(comfy_server):
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def test_object_info_lists_every_node_with_tooltips(object_info):
    assert OUR_NODES <= set(object_info)
    for name in OUR_NODES:
        info = object_info[name]
        assert info["category"] == "Z-Image" and info["description"], name
        for group in ("required", "optional"):
            for inp, spec in info["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
        assert all(info["output_tooltips"]), f"{name} has an output without a tooltip"
    seed = object_info["ZImageSampler"]["input"]["required"]["seed"][1]
    assert seed["control_after_generate"] is True


def shrink(prompt: dict) -> dict:
    """Keep the shipped workflow but draw 256×256 (tiny random weights, CPU)."""
    p = copy.deepcopy(prompt)
    for node in p.values():
        if node["class_type"] == "ZImageEmptyLatent":
            node["inputs"].update(resolution="custom", width=256, height=256)
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=256, height=256)
    return p


def run(server, prompt, seed):
    p = copy.deepcopy(prompt)
    for node in p.values():
        if node["class_type"] in ("ZImageSampler", "KSampler"):
            node["inputs"]["seed"] = seed
        if node["class_type"] == "RandomNoise":
            node["inputs"]["noise_seed"] = seed
    t0 = time.time()
    entry = server.wait(server.queue(p))
    assert entry["status"]["status_str"] == "success", entry["status"]
    return server.images(entry), time.time() - t0


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_example_workflow_runs(server, object_info, name):
    prompt = shrink(to_api(load_workflow(name), object_info))
    a, seconds = run(server, prompt, 1)
    b, _ = run(server, prompt, 1)
    c, _ = run(server, prompt, 2)
    print(f"{name}: {seconds:.1f} s end to end")
    assert len(a) == 1
    img = a[0]
    text_to_image = any(n["class_type"] in ("ZImageEmptyLatent", "EmptySD3LatentImage") for n in prompt.values())
    expect = (256, 256) if text_to_image else (192, 256)  # the edit inputs are 256×192 pictures
    assert img.shape[:2] == expect and img.std() > 2, (img.shape, img.std())
    assert np.array_equal(a[0], b[0]), "same seed, same image"
    assert np.abs(a[0] - c[0]).mean() > 0.5, "another seed, another image"


def test_progress_previews_and_step_messages(server, object_info):
    prompt = shrink(to_api(load_workflow("z_image_turbo_text_to_image.json"), object_info))
    msgs, previews = server.run_with_messages(prompt)
    progress = [m["data"] for m in msgs if m["type"] == "progress"]
    steps = [m["data"] for m in msgs if m["type"] == "zimage.progress"]
    assert msgs[-1]["type"] == "execution_success"
    assert [p["value"] for p in progress if p["max"] == 8][-1] == 8  # ProgressBar reached the last of 8 steps
    assert previews >= 1, "no live preview frames"
    assert [s["step"] for s in steps] == list(range(1, 9)) and all(s["total"] == 8 and s["eta_seconds"] >= 0 for s in steps)
    assert any(m["type"] == "zimage.plan" for m in msgs)


def test_loras_change_the_image_and_the_base_graph_stays_plain(server, object_info):
    with_loras = shrink(to_api(load_workflow("z_image_turbo_two_loras.json"), object_info))
    plain = shrink(to_api(load_workflow("z_image_turbo_text_to_image.json"), object_info))
    a, _ = run(server, with_loras, 11)
    b, _ = run(server, plain, 11)
    c, _ = run(server, with_loras, 11)
    off = copy.deepcopy(with_loras)
    for node in off.values():
        if node["class_type"] == "ZImageLoraLoader":
            node["inputs"]["strength"] = 0.0
    d, _ = run(server, off, 11)
    assert np.abs(a[0] - b[0]).mean() > 1.0  # the stacked LoRAs change the picture
    assert np.array_equal(a[0], c[0])  # and applying them again is deterministic
    assert np.array_equal(b[0], d[0])  # strength 0 = the cached base model, restored bit for bit
    assert np.array_equal(b[0], run(server, plain, 11)[0][0])


def test_controlnet_changes_the_image_strength_zero_is_plain(server, object_info):
    ctl = shrink(to_api(load_workflow("z_image_turbo_controlnet_canny.json"), object_info))
    apply_id = next(k for k, n in ctl.items() if n["class_type"] == "ZImageApplyControlNet")
    plain = copy.deepcopy(ctl)
    for node in plain.values():  # the same graph with the Apply node bypassed
        if node["class_type"] == "ZImageSampler":
            node["inputs"]["model"] = plain[apply_id]["inputs"]["model"]
    off = copy.deepcopy(ctl)
    off[apply_id]["inputs"]["strength"] = 0.0
    a, b, c = run(server, ctl, 5)[0][0], run(server, plain, 5)[0][0], run(server, off, 5)[0][0]
    assert np.abs(a - b).mean() > 1.0 and np.array_equal(b, c)


def test_controlnet_reaches_ksampler_as_our_sampler(server, object_info):
    """Our Apply ControlNet's MODEL through the core KSampler (euler / simple: the same shift-3 schedule as the
    Z-Image Sampler's turbo preset): the control reaches the blocks there too, with the same picture."""
    ctl = shrink(to_api(load_workflow("z_image_turbo_controlnet_canny.json"), object_info))
    apply_id = next(k for k, n in ctl.items() if n["class_type"] == "ZImageApplyControlNet")
    ks = copy.deepcopy(ctl)
    sid = next(k for k, n in ks.items() if n["class_type"] == "ZImageSampler")
    ours = ks[sid]["inputs"]
    ks["zero"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ours["positive"]}}
    ks[sid] = {"class_type": "KSampler", "inputs": {
        "model": ours["model"], "seed": 0, "steps": 8, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ours["positive"], "negative": ["zero", 0], "latent_image": ours["latent_image"], "denoise": 1.0}}
    plain = copy.deepcopy(ks)
    plain[sid]["inputs"]["model"] = ks[apply_id]["inputs"]["model"]
    a, b, c = run(server, ks, 5)[0][0], run(server, ctl, 5)[0][0], run(server, plain, 5)[0][0]
    def diff(u, v):
        return np.abs(u.astype(np.float32) - v.astype(np.float32)).mean()
    assert diff(a, c) > 1.0 and diff(a, b) < 0.05 * diff(a, c), (diff(a, b), diff(a, c))


def test_inpainting_keeps_the_unmasked_area(server, object_info):
    prompt = to_api(load_workflow("z_image_turbo_inpainting.json"), object_info)
    imgs, _ = run(server, prompt, 3)
    other, _ = run(server, prompt, 4)
    d = np.abs(imgs[0] - other[0]).mean(-1)
    # the mask (alpha 0) covers rows 48–144, cols 64–192; far from it the two seeds agree closely
    assert d[:24, :].mean() < 0.25 * d[56:136, 72:184].mean()


def test_interrupt_then_next_run_succeeds(server, object_info):
    prompt = shrink(to_api(load_workflow("z_image_turbo_text_to_image.json"), object_info))
    long = copy.deepcopy(prompt)
    for node in long.values():
        if node["class_type"] == "ZImageSampler":
            node["inputs"].update(preset="custom", steps=200, seed=9)
        if node["class_type"] == "ZImageEmptyLatent":
            node["inputs"].update(width=1024, height=1024)
    pid = server.queue(long)
    t0 = time.time()
    while time.time() - t0 < 120:  # wait until it is running
        q = server.get("/queue")
        if any(item[1] == pid for item in q["queue_running"]):
            break
        time.sleep(0.2)
    time.sleep(3)
    server.post("/interrupt")
    entry = server.wait(pid, timeout=120)
    assert time.time() - t0 < 100, "the interrupt was not prompt"
    msgs = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in msgs, entry["status"]
    imgs, _ = run(server, prompt, 5)
    assert imgs and imgs[0].std() > 2


def test_wrong_file_error_names_it_and_server_keeps_serving(server, object_info):
    prompt = shrink(to_api(load_workflow("z_image_turbo_text_to_image.json"), object_info))
    bad = copy.deepcopy(prompt)
    for node in bad.values():
        if node["class_type"] == "ZImageModelLoader":
            node["inputs"]["model_name"] = "not_zimage_sdxl.safetensors"
    entry = server.wait(server.queue(bad))
    assert entry["status"]["status_str"] == "error"
    err = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert "not_zimage_sdxl.safetensors" in err["exception_message"] and "SDXL" in err["exception_message"]
    assert "not a Z-Image transformer" in err["exception_message"]
    assert "ZImageSampler" in server.get("/object_info")
    imgs, _ = run(server, prompt, 6)
    assert imgs


def test_gguf_model_and_text_encoder_from_unet_and_clip(server, object_info):
    """Quantised GGUF files in models/unet and models/clip are listed and draw what their expanded weights draw."""
    def options(node, name):
        spec = object_info[node]["input"]["required"][name]
        return spec[0] if isinstance(spec[0], list) else spec[1]["options"]

    assert "z_image_turbo-Q8_0.gguf" in options("ZImageModelLoader", "model_name")
    assert "Qwen3-4B-Q4_0.gguf" in options("ZImageTextEncoderLoader", "text_encoder_name")
    prompt = shrink(to_api(load_workflow("z_image_turbo_text_to_image.json"), object_info))

    def with_files(dit, te):
        p = copy.deepcopy(prompt)
        for node in p.values():
            if node["class_type"] == "ZImageModelLoader":
                node["inputs"]["model_name"] = dit
            if node["class_type"] == "ZImageTextEncoderLoader":
                node["inputs"]["text_encoder_name"] = te
        return p

    a, _ = run(server, with_files("z_image_turbo-Q8_0.gguf", "Qwen3-4B-Q4_0.gguf"), 21)
    b, _ = run(server, with_files("z_image_turbo_gguf_expanded.safetensors", "qwen3_gguf_expanded.safetensors"), 21)
    assert a[0].std() > 2 and np.abs(a[0] - b[0]).mean() < 0.5, np.abs(a[0] - b[0]).mean()


def test_seed_noise_equals_comfyui_prepare_noise(tmp_path):
    import subprocess

    code = ("import sys, torch; out = sys.argv[1:]; sys.argv = ['main.py', '--cpu']; sys.path.insert(0, '.'); "
            "import comfy.options; comfy.options.enable_args_parsing(); import comfy.sample as s; "
            "torch.save(s.prepare_noise(torch.zeros(2, 16, 8, 8), 123), out[0]); "
            "torch.save(s.prepare_noise(torch.zeros(2, 16, 4, 4), 7, [3, 1]), out[1])")
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    subprocess.run([comfyui_python(COMFY), "-c", code, a, b], cwd=COMFY, check=True, capture_output=True)
    import torch

    import zimage_core as zc

    assert torch.equal(torch.load(a), zc.comfy_noise((2, 16, 8, 8), 123))
    assert torch.equal(torch.load(b), zc.comfy_noise((2, 16, 4, 4), 7, [3, 1]))


def test_comfyui_quantized_files_run_through_our_loaders(server, object_info, tmp_path):
    """The Turbo workflow on a transformer and a Qwen3 encoder quantized per layer ("mixed": nvfp4, mxfp8, fp8, int8,
    ConvRot, W4A8 and plain layers) by ComfyUI itself, placed in its models folders."""
    import shutil

    from test_quant_formats import quantize_file

    models = os.path.join(server.base, "models")
    (tmp_path / "dit").mkdir()
    (tmp_path / "te").mkdir()
    dit, _, _ = quantize_file(os.path.join(models, "diffusion_models", "z_image_turbo_bf16.safetensors"), tmp_path / "dit",
                              skip="pad_token")
    te, _, _ = quantize_file(os.path.join(models, "text_encoders", "qwen_3_4b.safetensors"), tmp_path / "te",
                             force={"model.embed_tokens": ["int8_tensorwise", "TensorWiseINT8Layout", {}]})
    shutil.copy(dit, os.path.join(models, "diffusion_models", "z_image_turbo_mixed.safetensors"))
    shutil.copy(te, os.path.join(models, "text_encoders", "qwen_3_4b_fp4_mixed.safetensors"))
    prompt = shrink(to_api(load_workflow("z_image_turbo_text_to_image.json"), object_info))
    for node in prompt.values():
        if node["class_type"] == "ZImageModelLoader":
            node["inputs"]["model_name"] = "z_image_turbo_mixed.safetensors"
        if node["class_type"] == "ZImageTextEncoderLoader":
            node["inputs"]["text_encoder_name"] = "qwen_3_4b_fp4_mixed.safetensors"
    imgs, _ = run(server, prompt, 3)
    assert imgs and imgs[0].shape[:2] == (256, 256) and imgs[0].std() > 2


def test_malicious_files_selected_in_the_loader_leave_the_server_answering(server, object_info):
    """Choosing a file in the loader's dropdown makes the web extension POST /zimage/plan for it. Crafted files (a
    90 MB header, a header of three million numbers, a pickle, a named pipe, GGUF files with a metadata bomb or a
    tensor table past their end) must get an error naming them while the server keeps answering other requests
    within a second; queued in a graph they fail with that message."""
    import json
    import struct
    import threading

    from test_bad_files import gguf_head, gguf_string

    folder = os.path.join(server.base, "models", "diffusion_models")
    big = json.dumps({"__metadata__": {"x": "y" * 90_000_000}}).encode()
    numbers = b'{"x": [' + b"0," * 3_000_000 + b"0]}"
    files = {"huge_header.safetensors": struct.pack("<Q", len(big)) + big,
             "numbers.safetensors": struct.pack("<Q", len(numbers)) + numbers,
             "disguised_pickle.safetensors": b"\x80\x02}q\x00." + b"\0" * 64,
             "strings.gguf": gguf_head(1, 1) + gguf_string("bomb") + struct.pack("<IIQ", 9, 8, 3_000_000)
             + struct.pack("<Q", 0) * 3_000_000,
             "table_past_end.gguf": gguf_head(1, 0) + gguf_string("w") + struct.pack("<I2QIQ", 2, 64, 64, 0, 1 << 40)}
    for name, blob in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(blob)
    os.mkfifo(os.path.join(folder, "pipe.safetensors"))
    names = [*files, "pipe.safetensors"]
    try:
        answers, latencies = {}, []
        ask = [threading.Thread(target=lambda n=n: answers.__setitem__(n, server.post("/zimage/plan", {"model_name": n})))
               for n in names]
        for t in ask:
            t.start()
        while any(t.is_alive() for t in ask) or len(latencies) < 5:
            t0 = time.perf_counter()
            server.get("/zimage/info")
            latencies.append(time.perf_counter() - t0)
        for t in ask:
            t.join()
        assert max(latencies) < 1.0, latencies
        for n in names:
            assert answers[n]["ok"] is False and n in answers[n]["error"], answers[n]
        prompt = shrink(to_api(load_workflow("z_image_turbo_text_to_image.json"), object_info))
        for n in ("numbers.safetensors", "pipe.safetensors", "strings.gguf"):
            bad = copy.deepcopy(prompt)
            for node in bad.values():
                if node["class_type"] == "ZImageModelLoader":
                    node["inputs"]["model_name"] = n
            entry = server.wait(server.queue(bad))
            err = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
            assert entry["status"]["status_str"] == "error" and n in err["exception_message"], err
    finally:
        for n in names:
            os.remove(os.path.join(folder, n))


def test_clip_output_encodes_like_our_text_encode(server, object_info):
    """The loader's CLIP output through core CLIPTextEncode (ComfyUI's Z-Image tokenizer and template) gives the
    same conditioning as Z-Image Text Encode: the same picture for the same seed."""
    ours = shrink(to_api(load_workflow("z_image_turbo_text_to_image.json"), object_info))
    core = copy.deepcopy(ours)
    loader = next(k for k, n in core.items() if n["class_type"] == "ZImageTextEncoderLoader")
    for node in core.values():
        if node["class_type"] == "ZImageTextEncode":
            node.update(class_type="CLIPTextEncode", inputs={"clip": [loader, 1], "text": node["inputs"]["prompt"]})
    a, _ = run(server, ours, 21)
    b, _ = run(server, core, 21)
    assert np.abs(a[0] - b[0]).mean() < 0.5


def test_seed_variety_node_with_ksampler(server, object_info):
    """The standalone Seed Variety node between our text encode and the core KSampler on our MODEL (the shipped
    KSampler workflow, res_multistep / simple): variety 0 is the plain graph bit for bit; variety > 0 changes the
    latent, the same variety seed gives it again (with another run in between, so not from ComfyUI's cache) and
    another variety seed gives another one, all at the same sampler seed."""
    import torch
    from safetensors.torch import load_file

    plain = shrink(to_api(load_workflow("z_image_turbo_ksampler.json"), object_info))
    sid = next(k for k, n in plain.items() if n["class_type"] == "KSampler")
    plain["latent_out"] = {"class_type": "SaveLatent", "inputs": {"samples": [sid, 0], "filename_prefix": "latents/variety"}}

    def varied(variety, seed):
        p = copy.deepcopy(plain)
        p["variety"] = {"class_type": "ZImageSeedVariety", "inputs": {"conditioning": p[sid]["inputs"]["positive"],
                                                                      "seed": seed, "variety": variety, "fraction": 0.5}}
        p[sid]["inputs"]["positive"] = ["variety", 0]
        return p

    def latent(p):
        entry = server.wait(server.queue(copy.deepcopy(p)))
        assert entry["status"]["status_str"] == "success", entry["status"]
        info = entry["outputs"]["latent_out"]["latents"][0]
        return load_file(os.path.join(server.base, "output", info["subfolder"], info["filename"]))["latent_tensor"]

    base = latent(plain)
    assert torch.equal(latent(varied(0.0, 7)), base)
    a, b, a2 = latent(varied(1.0, 7)), latent(varied(1.0, 8)), latent(varied(1.0, 7))
    def rel(u, v):
        return ((u - v).norm() / v.norm()).item()
    print(f"KSampler + Seed Variety 1.0 / fraction 0.5: rel change vs plain {rel(a, base):.3e}, seed 7 vs 8 {rel(a, b):.3e}")
    assert torch.equal(a, a2)
    assert rel(a, base) > 1e-3 and rel(a, b) > 1e-3
