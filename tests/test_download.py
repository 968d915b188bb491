"""``python -m zimage_core download`` and ``generate --download`` against a local server that speaks the hub's file API.

The server answers as huggingface.co does (huggingface_hub's ``get_hf_file_metadata`` / ``http_get`` read it):
``HEAD /{repo}/resolve/main/{path}`` gives ``X-Repo-Commit``, and for LFS files a 302 to a CDN address with
``X-Linked-Size`` and ``X-Linked-Etag`` (the sha256); small files answer 200 with their git blob id as ETag; the CDN
honours ``Range``; ``/api/models/{repo}/revision/main`` lists the files. Served files are tiny, under the real paths.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tiny import write_models_dir

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

from zimage_core import download as dl

ROOT = os.path.join(os.path.dirname(__file__), "..")
COMMIT = "a" * 40


class Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[tuple[str, str], bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.requests, self.cut, self.release = files, [], {}, threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.cdn = f"http://localhost:{self.server_address[1]}"

    def gets(self, path: str) -> list[str | None]:
        """The Range header of every body request for ``path`` (None: from the start)."""
        return [r for m, p, r in self.requests if m == "GET" and p == path]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _lookup(self, prefix: str):
        parts = self.path.split("?")[0].lstrip("/").split("/")
        if parts[0] == "cdn":
            parts = parts[1:]
        elif len(parts) < 5 or parts[2:4] != [prefix, "main"]:
            return None, None
        repo, path = "/".join(parts[:2]), "/".join(parts[4:] if parts[2] == prefix else parts[2:])
        return (repo, path), self.server.files.get((repo, path))

    def do_HEAD(self):
        key, data = self._lookup("resolve")
        if data is None:
            return self._send(404, {"X-Error-Code": "EntryNotFound"})
        if self.path.startswith("/cdn/"):
            return self._send(200, {"Content-Length": str(len(data)), "Accept-Ranges": "bytes"})
        if key[1].endswith((".safetensors", ".gguf")):  # as the hub: a redirect to the CDN (another host), size and
            # sha256 of the linked file in X-Linked-*
            self._send(302, {"X-Repo-Commit": COMMIT, "Location": f"{self.server.cdn}/cdn/{key[0]}/{key[1]}",
                             "X-Linked-Size": str(len(data)), "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"'})
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            self._send(200, {"X-Repo-Commit": COMMIT, "ETag": f'"{blob}"', "Content-Length": str(len(data))})

    def do_GET(self):
        if self.path.startswith("/api/models/"):
            repo = "/".join(self.path.split("?")[0].split("/")[3:5])
            names = [p for r, p in self.server.files if r == repo]
            body = json.dumps({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in names]}).encode()
            return self._send(200 if names else 404, {"Content-Type": "application/json", "Content-Length": str(len(body))}, body)
        key, data = self._lookup("resolve")
        if data is None:
            return self._send(404, {"X-Error-Code": "EntryNotFound"})
        rng = self.headers.get("Range")
        self.server.requests.append(("GET", key[1], rng))
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        headers = {"Content-Length": str(len(body)), "Accept-Ranges": "bytes", "X-Repo-Commit": COMMIT}
        if rng:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        cut = self.server.cut.pop(key[1], None)
        if cut is None:
            return self._send(206 if rng else 200, headers, body)
        self._send(200, headers, body[:cut])  # then stall, as a dropped connection would, until the test kills the client
        self.server.release.wait(60)

    def _send(self, code, headers, body=b""):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            self.wfile.flush()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Tiny real weights under the real repository paths of the Turbo files and the Tongyi-MAI diffusers folder."""
    src = tmp_path_factory.mktemp("weights")
    made = write_models_dir(str(src))
    files = {(f.repo, f.path): open(made[kind], "rb").read()
             for f, kind in zip(dl.files_for("turbo", "bf16"), ("transformer", "text_encoder", "vae"))}
    files[(dl.HF_REPOS["turbo"], "model_index.json")] = b'{"_class_name": "ZImagePipeline"}\n'
    files[(dl.HF_REPOS["turbo"], "vae/diffusion_pytorch_model.safetensors")] = files[(dl.VAE.repo, dl.VAE.path)]
    files[(dl.HF_REPOS["turbo"], "assets/showcase.jpg")] = b"not part of the pipeline"
    for f in dl.files_for("turbo", "gguf-q8_0")[:2]:  # bytes the download does not parse; the DiT larger than one chunk
        files[(f.repo, f.path)] = os.urandom(24 << 20 if f.folder == "diffusion_models" else 4096)
    srv = Hub(files)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.release.set()
    srv.shutdown()


def env(hub, home):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return dict(e, PYTHONPATH=os.path.abspath(ROOT), HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
                HF_HUB_DOWNLOAD_TIMEOUT="60", HF_HUB_DISABLE_XET="1")


def cli(hub, home, *args, extra=None):
    """The command in a fresh process, with HF_* pointing at the local hub."""
    return subprocess.run([sys.executable, "-m", "zimage_core", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**env(hub, home), **(extra or {})})


@pytest.fixture
def run(hub, monkeypatch, capsys, caplog, tmp_path):
    """The command in this process (no torch import per call): HF_ENDPOINT/HF_HOME/HF_HUB_OFFLINE as huggingface_hub
    reads them once at import. Returns (exit code, stdout, stderr and log)."""
    from huggingface_hub import constants

    from zimage_core.cli import main

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def go(*args, endpoint=None, offline=False):
        monkeypatch.setattr(constants, "ENDPOINT", endpoint or hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        caplog.clear()
        with caplog.at_level("INFO", logger="zimage"):
            rc = main(list(args))
        out, err = capsys.readouterr()
        return rc, out, err + caplog.text

    return go


def layout(models):
    return sorted(os.path.relpath(os.path.join(d, f), models) for d, _, fs in os.walk(models) for f in fs)


def test_files_land_in_the_comfyui_folders_and_a_second_run_downloads_nothing(hub, run, tmp_path):
    models = tmp_path / "models"
    hub.requests.clear()
    rc, _, err = run("download", "turbo", "--to", str(models))
    assert rc == 0, err
    assert layout(models) == [dl.VERIFIED, "diffusion_models/z_image_turbo_bf16.safetensors",
                              "text_encoders/qwen_3_4b.safetensors", "vae/ae.safetensors"]
    for f in dl.files_for("turbo"):
        assert (models / f.folder / f.name).read_bytes() == hub.files[(f.repo, f.path)]
    assert len([r for r in hub.requests if r[0] == "GET"]) == 3
    hub.requests.clear()
    rc, _, err = run("download", "turbo", "--to", str(models))
    assert rc == 0, err
    assert hub.requests == [] and err.count("present and verified") == 3


def test_an_interrupted_download_resumes_where_it_stopped(hub, tmp_path):
    """Ctrl-C in the middle of a file; the next run asks the server only for the bytes it does not have."""
    f = dl.files_for("turbo", "gguf-q8_0")[0]
    data, models = hub.files[(f.repo, f.path)], tmp_path / "models"
    hub.cut[f.path] = len(data) // 2  # huggingface_hub writes 10 MiB chunks: the first reaches the disk, then it stalls
    hub.requests.clear()
    args = ["download", "--format", "gguf-q8_0", "--to", str(models)]
    proc = subprocess.Popen([sys.executable, "-m", "zimage_core", *args], cwd=ROOT, env=env(hub, tmp_path / "hf"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder, t0 = models / f.folder, time.time()

    def partial():
        return list(folder.glob(f.name + ".*.incomplete")) if folder.is_dir() else []

    while not (partial() and partial()[0].stat().st_size > 0) and time.time() - t0 < 120:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "run the same command again to continue" in stderr
    done = partial()[0].stat().st_size
    assert 0 < done < len(data) and not (folder / f.name).exists()
    r = cli(hub, tmp_path / "hf", *args)
    assert r.returncode == 0, r.stderr
    assert hub.gets(f.path) == [None, f"bytes={done}-"]  # the second run asked only for the rest
    assert (folder / f.name).read_bytes() == data and partial() == []
    assert "continuing an interrupted download" in r.stderr


def test_a_corrupted_file_is_detected_and_fetched_again(hub, run, tmp_path):
    models = tmp_path / "models"
    assert run("download", "--to", str(models))[0] == 0
    te = dl.files_for("turbo")[1]
    path = models / te.folder / te.name
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # same size, one byte differs: only the checksum can tell
    path.write_bytes(bytes(flipped))
    (models / "vae" / "ae.safetensors").write_bytes(hub.files[(dl.VAE.repo, dl.VAE.path)][:100])  # truncated
    hub.requests.clear()
    rc, _, err = run("download", "--to", str(models))
    assert rc == 0, err
    assert path.read_bytes() == good and (models / "vae" / "ae.safetensors").read_bytes() == hub.files[(dl.VAE.repo, dl.VAE.path)]
    assert sorted(p for _, p, _ in hub.requests) == sorted([te.path, dl.VAE.path])  # the intact DiT was not fetched
    assert err.count("fetching it again") == 2


def test_offline_and_unreachable_say_what_to_do(run, tmp_path):
    models = str(tmp_path / "models")
    rc, _, err = run("download", "--to", models, offline=True)
    assert rc == 2 and "HF_HUB_OFFLINE" in err and "Traceback" not in err
    assert "huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/diffusion_models" in err
    rc, _, err = run("download", "turbo", "--format", "gguf-q3_k_xs", "--to", models)
    assert rc == 2 and "z_image_turbo-Q3_K_XS.gguf is not published in jayn7/Z-Image-Turbo-GGUF" in err
    assert run("download", "--to", models)[0] == 0
    rc, _, err = run("download", "--to", models, endpoint="http://127.0.0.1:9")
    assert rc == 0 and err.count("unchecked") == 3  # present files are used as they are
    empty = str(tmp_path / "empty")
    rc, _, err = run("generate", "-p", "x", "--models", empty)
    assert rc == 2 and f"python -m zimage_core download turbo --to {empty}" in err and "--download" in err


def test_generate_download_then_writes_a_png(hub, tmp_path):
    """A fresh machine: no ComfyUI, no weights; the tokenizer ships with the package, the weights come from the hub."""
    models, out = tmp_path / "models", tmp_path / "fox.png"
    extra = {"HOME": str(tmp_path), "COMFYUI_PATH": "", "ZIMAGE_TOKENIZER": ""}
    r = cli(hub, tmp_path / "hf", "generate", "--download", "--models", str(models), "--dtype", "fp32", "-p", "a fox",
            "--width", "64", "--height", "48", "-o", str(out), extra=extra)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    im = Image.open(out)
    assert im.size == (64, 48) and json.loads(im.info["zimage"])["transformer"].endswith(
        os.path.join("diffusion_models", "z_image_turbo_bf16.safetensors"))


def test_the_diffusers_folder_with_hf(run, tmp_path):
    models = tmp_path / "models"
    rc, out, err = run("download", "--hf", "--to", str(models))
    assert rc == 0, err
    root = os.path.join("diffusion_models", "Z-Image-Turbo")
    assert layout(models) == [dl.VERIFIED, os.path.join(root, "model_index.json"),
                              os.path.join(root, "vae", "diffusion_pytorch_model.safetensors")]  # no assets/
    assert f"--hf {models / root}" in out


def test_formats_name_the_published_files():
    assert [f.url() for f in dl.files_for("base")] == [
        "https://huggingface.co/Comfy-Org/z_image/resolve/main/split_files/diffusion_models/z_image_bf16.safetensors",
        "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors",
        "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/vae/ae.safetensors"]
    q = dl.files_for("turbo", "gguf-q4_k_m")
    assert [(f.repo, f.path, f.folder) for f in q[:2]] == [
        ("jayn7/Z-Image-Turbo-GGUF", "z_image_turbo-Q4_K_M.gguf", "diffusion_models"),
        ("unsloth/Qwen3-4B-GGUF", "Qwen3-4B-Q4_K_M.gguf", "text_encoders")]
    with pytest.raises(dl.ZImageError, match="published for turbo only"):
        dl.files_for("base", "int8")


LOADER_FOLDERS = {"ZImageModelLoader": "diffusion_models", "ZImageTextEncoderLoader": "text_encoders", "VAELoader": "vae",
                  "UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "ZImageLoraLoader": "loras",
                  "LoraLoaderModelOnly": "loras", "ModelPatchLoader": "model_patches",
                  "ZImageControlNetLoader": "model_patches", "CLIPVisionLoader": "clip_vision"}
USER_FILES = {"zimage_style_lora.safetensors", "zimage_detail_lora.safetensors"}  # the two-LoRA template: your own LoRAs


def test_every_template_file_has_its_download_link():
    """Each node naming a weight file carries ComfyUI's properties.models entry (name, url, directory — the fields the
    frontend's missing-models dialog reads) pointing into the repository that publishes that file."""
    folder = os.path.join(ROOT, "example_workflows")
    from build_workflows import MODEL_FILES as published
    checked = 0
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".json")):
        wf = json.load(open(os.path.join(folder, name), encoding="utf-8"))
        for node in wf["nodes"]:
            files = [v for v in node.get("widgets_values") or [] if isinstance(v, str)
                     and v.endswith((".safetensors", ".gguf", ".sft")) and v not in USER_FILES]
            entries = {m["name"]: m for m in node.get("properties", {}).get("models", [])}
            assert sorted(entries) == sorted(files), f"{name}: {node['type']} names {files}, models lists {sorted(entries)}"
            for v in files:
                f, m = published[v], entries[v]
                assert m["url"] == f"https://huggingface.co/{f.repo}/resolve/main/{f.path}", (name, m)
                assert m["directory"] == f.folder == LOADER_FOLDERS.get(node["type"], f.folder), (name, node["type"], m)
                checked += 1
    assert checked >= 21  # 7 templates × transformer, text encoder, VAE
