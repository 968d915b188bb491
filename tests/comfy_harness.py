"""A real ComfyUI server for the integration tests: started on 127.0.0.1 with this pack in its custom_nodes
and tiny random weights under the file names the example workflows use.

ComfyUI is found through COMFYUI_PATH, else ~/ComfyUI; it runs in its own virtual environment
(ZIMAGE_COMFY_PYTHON, else built or reused by scripts/comfyui_venv.sh).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import torch
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
WORKFLOWS = os.path.join(ROOT, "example_workflows")


def comfyui_path() -> str | None:
    p = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI")
    return p if os.path.isfile(os.path.join(p, "main.py")) else None


def comfyui_python(path: str) -> str:
    py = os.environ.get("ZIMAGE_COMFY_PYTHON")
    if py and os.path.exists(py):
        return py
    out = subprocess.run([os.path.join(ROOT, "scripts", "comfyui_venv.sh"), path], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def comfyui_commit(path: str) -> str:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        v = {}
        exec(open(os.path.join(path, "comfyui_version.py")).read(), v)  # noqa: S102 (a one-line version file)
        return "version " + v.get("__version__", "?")


# What a script run in ComfyUI's own environment (no server, CPU) starts with: ComfyUI's argument parsing, then this
# pack imported as the package ``zimage_pack`` (root = argv[1]; the script's own arguments follow in ``ARGS``).
IN_COMFY = r"""
import importlib.util, json, sys, torch
root, ARGS = sys.argv[1], sys.argv[2:]
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, ".")
import comfy.options; comfy.options.enable_args_parsing()
spec = importlib.util.spec_from_file_location("zimage_pack", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec); sys.modules["zimage_pack"] = pack; spec.loader.exec_module(pack)
"""


def run_in_comfy(comfy: str, script: str, *args: str, timeout: float = 300) -> dict:
    """Run ``script`` (after ``IN_COMFY``) with ComfyUI's Python in its folder; it prints ``RESULT`` + a JSON object."""
    r = subprocess.run([comfyui_python(comfy), "-c", IN_COMFY + script, ROOT, *map(str, args)], cwd=comfy,
                       capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, r.stderr[-3000:]
    return json.loads(line[len("RESULT"):])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- tiny weights under the real names ------------------------------------------------------------


def comfy_vae(path: str) -> str:
    """A FLUX-layout autoencoder ComfyUI's VAELoader accepts: its encoder width is fixed at 128 channels, the
    decoder's follows the file (32 here, to keep decoding fast)."""
    from safetensors.torch import save_file

    from zimage_core.autoencoder import AutoEncoder

    ae = AutoEncoder([128, 256, 512, 512], 2, 16, 32, dec_chs=[32, 64, 128, 128])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ae.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * r if "norm" in name and name.endswith("weight") else
                    0.1 * r if "norm" in name else r / (p[0].numel() ** 0.5) if p.ndim > 1 else 0.02 * r)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in ae.state_dict().items()}, path)
    return path


def populate(base: str) -> None:
    from tiny import diffusers_transformer, sample_picture, save_comfyui, save_qwen_comfyui, tiny_qwen

    models = os.path.join(base, "models")
    dit = diffusers_transformer(seed=1)
    save_comfyui(dit, os.path.join(models, "diffusion_models", "z_image_turbo_bf16.safetensors"), dtype=torch.bfloat16)
    save_comfyui(diffusers_transformer(seed=2), os.path.join(models, "diffusion_models", "z_image_bf16.safetensors"), dtype=torch.bfloat16)
    save_qwen_comfyui(tiny_qwen(0), os.path.join(models, "text_encoders", "qwen_3_4b.safetensors"), dtype=torch.bfloat16)
    os.makedirs(os.path.join(models, "vae"), exist_ok=True)
    comfy_vae(os.path.join(models, "vae", "ae.safetensors"))
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
               "model.diffusion_model.output_blocks.0.0.weight": torch.zeros(4),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)},
              os.path.join(models, "diffusion_models", "not_zimage_sdxl.safetensors"))
    write_loras(os.path.join(models, "loras"), dit)
    from tiny import diffusers_controlnet, save_controlnet

    save_controlnet(diffusers_controlnet("2.1"), os.path.join(models, "model_patches",
                    "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors"), "2.1", dtype=torch.bfloat16)
    from tiny_gguf import save_dit_gguf, save_qwen_gguf  # quantised files in ComfyUI's other folders, with their truth

    save_dit_gguf(dit, os.path.join(models, "unet", "z_image_turbo-Q8_0.gguf"),
                  os.path.join(models, "diffusion_models", "z_image_turbo_gguf_expanded.safetensors"))
    save_qwen_gguf(tiny_qwen(0), os.path.join(models, "clip", "Qwen3-4B-Q4_0.gguf"),
                   os.path.join(models, "text_encoders", "qwen3_gguf_expanded.safetensors"))
    inp = os.path.join(base, "input")
    os.makedirs(inp, exist_ok=True)
    sample_picture(256, 192, seed=1).save(os.path.join(inp, "zimage_example.png"))
    rgba = sample_picture(256, 192, seed=2).convert("RGBA")
    a = np.full((192, 256), 255, dtype=np.uint8)
    a[48:144, 64:192] = 0  # transparent = masked (LoadImage's MASK is 1 − alpha)
    rgba.putalpha(Image.fromarray(a))
    rgba.save(os.path.join(inp, "zimage_inpaint_example.png"))


def write_loras(folder: str, dit) -> None:
    """Two tiny LoRAs for the tiny transformer, in two dialects (ai-toolkit and kohya/musubi)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    a, b = {}, {}
    for name, m in dit.named_modules():
        if isinstance(m, torch.nn.Linear) and ("attention.to_" in name or "feed_forward" in name):
            down, up = torch.randn(4, m.in_features, generator=g) * 0.3, torch.randn(m.out_features, 4, generator=g) * 0.3
            a[f"diffusion_model.{name}.lora_A.weight"], a[f"diffusion_model.{name}.lora_B.weight"] = down, up
            k = "lora_unet_" + name.replace(".", "_")
            b[k + ".lora_down.weight"], b[k + ".lora_up.weight"], b[k + ".alpha"] = down.flip(0), up, torch.tensor(4.0)
    save_file({k: v.contiguous() for k, v in a.items()}, os.path.join(folder, "zimage_style_lora.safetensors"))
    save_file({k: v.contiguous() for k, v in b.items()}, os.path.join(folder, "zimage_detail_lora.safetensors"))


# ---- the server -------------------------------------------------------------------------------


class ComfyServer:
    def __init__(self, comfy: str, python: str, base: str, extra_args=()):
        self.comfy, self.python, self.base = comfy, python, base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
        link = os.path.join(base, "custom_nodes", "ComfyUI-ZImage")
        if not os.path.exists(link):
            os.symlink(ROOT, link)
        self.log_path = os.path.join(base, "comfyui.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", base,
             "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--preview-method", "latent2rgb", *extra_args],
            cwd=comfy, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 240):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {self.log()[-3000:]}")
            try:
                self.get("/object_info/ZImageSampler")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not start in {timeout} s: {self.log()[-3000:]}")

    def log(self) -> str:
        return open(self.log_path, encoding="utf-8", errors="replace").read()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict | None = None):
        req = urllib.request.Request(self.url + path, data=json.dumps(data or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{path}: HTTP {e.code}: {e.read().decode()[:2000]}") from None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                if h[prompt_id]["status"].get("status_str") in ("success", "error") or h[prompt_id]["status"]["completed"]:
                    return h[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run_with_messages(self, prompt: dict, timeout: float = 300) -> tuple[list[dict], int]:
        """Queue ``prompt`` while listening on the websocket: its JSON messages and the number of binary
        (preview image) frames, until the run ends."""
        import websocket

        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=timeout)
        try:
            pid = self.queue(prompt)
            msgs, previews, t0 = [], 0, time.time()
            while time.time() - t0 < timeout:
                frame = ws.recv()
                if isinstance(frame, bytes):
                    previews += 1
                    continue
                m = json.loads(frame)
                msgs.append(m)
                d = m.get("data", {})
                if d.get("prompt_id") == pid and m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    return msgs, previews
            raise TimeoutError("run did not end")
        finally:
            ws.close()

    def images(self, entry: dict) -> list[np.ndarray]:
        out = []
        for node_out in entry.get("outputs", {}).values():
            for im in node_out.get("images", []):
                p = os.path.join(self.base, "output", im.get("subfolder", ""), im["filename"])
                out.append(np.asarray(Image.open(p).convert("RGB"), dtype=np.int16))
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def to_api(workflow: dict, object_info: dict) -> dict:
    """UI-format workflow → API prompt, mapping widgets_values onto each node's widget inputs in
    /object_info's input order (a seed's control_after_generate value takes one extra slot)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for n in workflow["nodes"]:
        if n["type"] in ("MarkdownNote", "Note") or n.get("mode", 0) in (2, 4):
            continue
        if n["type"] not in object_info:
            raise KeyError(f"node type {n['type']} is missing from /object_info")
        info = object_info[n["type"]]
        inputs = {}
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                lk = links[inp["link"]]
                inputs[inp["name"]] = [str(lk[1]), lk[2]]
        values = list(n.get("widgets_values") or [])
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name in info["input_order"].get("required", []) + info["input_order"].get("optional", []):
            typ = spec[name][0]
            opts = spec[name][1] if len(spec[name]) > 1 else {}
            if not (isinstance(typ, list) or typ in WIDGET_TYPES) or not values:
                continue
            v = values.pop(0)
            inputs.setdefault(name, v)
            if opts.get("control_after_generate") and values:
                values.pop(0)
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def load_workflow(name: str) -> dict:
    with open(os.path.join(WORKFLOWS, name), encoding="utf-8") as f:
        return json.load(f)


def full_width_checkpoint(path: str, seed: int = 0, n_layers: int = 1) -> None:
    """Random Z-Image weights in the ComfyUI single-file layout at the real width, one main layer. Names and
    shapes come from our transformer on the meta device; ComfyUI's UNETLoader loading the file checks them."""
    from zimage_core.transformer import ZImageConfig, ZImageTransformer

    with torch.device("meta"):
        model = ZImageTransformer(ZImageConfig(n_layers=n_layers))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "norm" in name or name == "cap_embedder.0.weight":
            v = 1.0 + 0.2 * r
        elif p.ndim >= 2 and "pad_token" not in name:
            v = r / p.shape[-1] ** 0.5
        else:
            v = 0.5 * r
        sd[name] = v.to(torch.bfloat16)
    from safetensors.torch import save_file

    save_file(sd, path)
