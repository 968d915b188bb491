"""Writes example_workflows/*.json (ComfyUI UI format). Edit the graphs here and rerun:

    python scripts/build_workflows.py
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "example_workflows")
sys.path.insert(0, os.path.join(HERE, ".."))
from zimage_core.download import HubFile, catalog  # noqa: E402  (the download command's list: one source for both)

# Every published file a template may name → its repository file and models folder. Add a loader's file here (or to
# zimage_core.download) and every node naming it gets the metadata below.
MODEL_FILES = {f.name: f for f in catalog()}
CONTROLNET = HubFile("alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1", "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors",
                     "model_patches")
MODEL_FILES[CONTROLNET.name] = CONTROLNET


def models_property(widgets) -> list[dict]:
    """ComfyUI's ``properties.models`` for a node: name, url and directory of each published file among its widget
    values. The frontend's missing-models dialog reads these and offers the downloads (ComfyUI's own templates in
    Comfy-Org/workflow_templates carry the same three fields)."""
    return [{"name": v, "url": MODEL_FILES[v].url(), "directory": MODEL_FILES[v].folder}
            for v in widgets if isinstance(v, str) and v in MODEL_FILES]

def files_note(model: str, tips: str, extra: tuple[str, ...] = ()) -> str:
    """The read-me note: where each file goes and where it comes from (the same links the loaders carry), then tips."""
    rows = [f"| `models/{f.folder}/` | `{f.name}` | [{f.repo}]({f.url()}) |"
            for f in (MODEL_FILES[n] for n in (model, "qwen_3_4b.safetensors", "ae.safetensors", *extra))]
    return "\n".join(["## Files this workflow needs", "", "| put it in | file | from |", "|---|---|---|", *rows, "",
                      "ComfyUI offers these downloads when a file is missing; or run `python -m zimage_core download` "
                      "(add `base` for the base model) from this pack's folder.", "", tips])


OUTPUT_TYPES = {
    "ZImageModelLoader": ["MODEL"], "ZImageTextEncoderLoader": ["ZIMAGE_TEXT_ENCODER"],
    "ZImageTextEncode": ["CONDITIONING"], "ZImageEmptyLatent": ["LATENT"], "ZImageSampler": ["LATENT"],
    "ZImageImageToLatent": ["LATENT"], "VAELoader": ["VAE"], "VAEDecode": ["IMAGE"], "SaveImage": [],
    "LoadImage": ["IMAGE", "MASK"], "MarkdownNote": [], "ZImageLoraLoader": ["MODEL"],
    "ZImageEditEncode": ["CONDITIONING", "CONDITIONING", "LATENT"], "ModelSamplingAuraFlow": ["MODEL"], "KSampler": ["LATENT"],
    "EmptySD3LatentImage": ["LATENT"], "ConditioningZeroOut": ["CONDITIONING"], "RandomNoise": ["NOISE"],
    "KSamplerSelect": ["SAMPLER"], "BasicScheduler": ["SIGMAS"], "BasicGuider": ["GUIDER"],
    "SamplerCustomAdvanced": ["LATENT", "LATENT"], "ZImageControlNetLoader": ["ZIMAGE_CONTROLNET"],
    "ZImageApplyControlNet": ["MODEL"], "Canny": ["IMAGE"],
}
OUTPUT_NAMES = {"LoadImage": ["IMAGE", "MASK"], "ZImageEditEncode": ["positive", "negative", "latent"],
                "SamplerCustomAdvanced": ["output", "denoised_output"]}


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_: str, pos, widgets=(), size=(320, 120), title=None, inputs=(), color=None):
        nid = len(self.nodes) + 1
        names = OUTPUT_NAMES.get(type_, OUTPUT_TYPES[type_])
        outs = [{"name": names[i], "type": t, "links": [], "slot_index": i} for i, t in enumerate(OUTPUT_TYPES[type_])]
        n = {"id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1, "mode": 0,
             "inputs": [{"name": name, "type": t, "link": None} for name, t in inputs], "outputs": outs,
             "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if models := models_property(widgets):
            n["properties"]["models"] = models
        if title:
            n["title"] = title
        if color:
            n["color"], n["bgcolor"] = color
        self.nodes.append(n)
        return nid

    def link(self, src: int, slot: int, dst: int, input_name: str):
        lid = len(self.links) + 1
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        t = s["outputs"][slot]["type"]
        inp = next(i for i in d["inputs"] if i["name"] == input_name)
        inp["link"] = lid
        s["outputs"][slot]["links"].append(lid)
        self.links.append([lid, src, slot, dst, d["inputs"].index(inp), t])

    def dump(self, name: str, title: str):
        wf = {"id": name, "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
              "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
              "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}, "title": title}, "version": 0.4}
        with open(os.path.join(OUT, name + ".json"), "w", encoding="utf-8") as f:
            json.dump(wf, f, indent=1, ensure_ascii=False)
            f.write("\n")


def finish(g: Graph, name: str, title: str, x: int, model: int, positive, latent, vae: int, values: list, negative=None):
    """Sampler → VAE Decode → Save Image at column ``x``; ``positive``/``latent``/``negative`` are (node, slot)."""
    ins = [("model", "MODEL"), ("positive", "CONDITIONING"), ("latent_image", "LATENT")]
    ins += [("negative", "CONDITIONING")] if negative else []
    s = g.node("ZImageSampler", (x, 420), values, size=(320, 330), inputs=ins)
    g.link(model, 0, s, "model")
    g.link(*positive, s, "positive")
    g.link(*latent, s, "latent_image")
    if negative:
        g.link(*negative, s, "negative")
    decode_and_save(g, name, title, x, s, vae)


def decode_and_save(g: Graph, name: str, title: str, x: int, sampler: int, vae: int):
    s = sampler
    dec = g.node("VAEDecode", (x + 360, 420), [], size=(200, 50), inputs=[("samples", "LATENT"), ("vae", "VAE")])
    g.link(s, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    save = g.node("SaveImage", (x + 360, 520), [f"z-image/{name}"], size=(420, 460), inputs=[("images", "IMAGE")])
    g.link(dec, 0, save, "images")
    g.dump(name, title)


def base_graph(model: str, note: str):
    g = Graph()
    g.node("MarkdownNote", (20, 20), [note], size=(520, 360), title="Read me: files and settings")
    m = g.node("ZImageModelLoader", (20, 420), [model, "auto", "auto", "auto", 0.0, 2], size=(340, 270))
    te = g.node("ZImageTextEncoderLoader", (20, 730), ["qwen_3_4b.safetensors", "auto", "auto"], size=(340, 110))
    return g, m, te


PROMPT = ("A red fox curled up asleep on a mossy stone in a misty birch forest at dawn, soft golden light through the "
          "trees, shallow depth of field, detailed fur, photorealistic")
NEG = "blurry, low quality, oversaturated, deformed, text, watermark"


def text_to_image(name, title, model, preset, steps, cfg, negative, tips, loras=()):
    g, m, te = base_graph(model, files_note(model, tips))
    for i, (lora, strength) in enumerate(loras):
        nxt = g.node("ZImageLoraLoader", (20, 880 + 130 * i), [lora, strength], size=(340, 90), title=f"LoRA {i + 1}",
                     inputs=[("model", "MODEL")])
        g.link(m, 0, nxt, "model")
        m = nxt
    pos = g.node("ZImageTextEncode", (400, 420), [PROMPT], size=(420, 200), title="Positive prompt",
                 inputs=[("text_encoder", "ZIMAGE_TEXT_ENCODER")], color=("#232", "#353"))
    g.link(te, 0, pos, "text_encoder")
    neg = None
    if negative:
        neg = g.node("ZImageTextEncode", (400, 660), [NEG], size=(420, 140), title="Negative prompt",
                     inputs=[("text_encoder", "ZIMAGE_TEXT_ENCODER")], color=("#322", "#533"))
        g.link(te, 0, neg, "text_encoder")
    lat = g.node("ZImageEmptyLatent", (400, 840), ["1:1 (1024×1024)", 1024, 1024, 1], size=(320, 170))
    vae = g.node("VAELoader", (400, 1050), ["ae.safetensors"], size=(320, 60))
    finish(g, name, title, 860, m, (pos, 0), (lat, 0), vae, [42, "randomize", preset, steps, cfg, 3.0, 1.0, 0.0, 1.0],
           (neg, 0) if neg else None)


def core_sampling(name, title, advanced: bool, tips):
    """The official template's shape with our loaders: model → ModelSamplingAuraFlow (shift 3) → core sampling."""
    model = "z_image_turbo_bf16.safetensors"
    g, m, te = base_graph(model, files_note(model, tips))
    ms = g.node("ModelSamplingAuraFlow", (400, 300), [3.0], size=(320, 60), inputs=[("model", "MODEL")])
    g.link(m, 0, ms, "model")
    pos = g.node("ZImageTextEncode", (400, 420), [PROMPT], size=(420, 200), title="Positive prompt",
                 inputs=[("text_encoder", "ZIMAGE_TEXT_ENCODER")], color=("#232", "#353"))
    g.link(te, 0, pos, "text_encoder")
    lat = g.node("EmptySD3LatentImage", (400, 840), [1024, 1024, 1], size=(320, 110))
    vae = g.node("VAELoader", (400, 1000), ["ae.safetensors"], size=(320, 60))
    if advanced:
        noise = g.node("RandomNoise", (860, 120), [42, "randomize"], size=(320, 80))
        guider = g.node("BasicGuider", (860, 240), [], size=(320, 50), inputs=[("model", "MODEL"), ("conditioning", "CONDITIONING")])
        g.link(ms, 0, guider, "model")
        g.link(pos, 0, guider, "conditioning")
        sel = g.node("KSamplerSelect", (860, 330), ["res_multistep"], size=(320, 60))
        sched = g.node("BasicScheduler", (860, 430), ["simple", 8, 1.0], size=(320, 110), inputs=[("model", "MODEL")])
        g.link(ms, 0, sched, "model")
        s = g.node("SamplerCustomAdvanced", (860, 580), [], size=(320, 120), inputs=[
            ("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")])
        for src, inp in ((noise, "noise"), (guider, "guider"), (sel, "sampler"), (sched, "sigmas"), (lat, "latent_image")):
            g.link(src, 0, s, inp)
    else:
        neg = g.node("ConditioningZeroOut", (400, 660), [], size=(320, 50), title="Negative (zeroed; cfg 1 ignores it)",
                     inputs=[("conditioning", "CONDITIONING")])
        g.link(pos, 0, neg, "conditioning")
        s = g.node("KSampler", (860, 420), [42, "randomize", 8, 1.0, "res_multistep", "simple", 1.0], size=(320, 270),
                   inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")])
        for src, inp in ((ms, "model"), (pos, "positive"), (neg, "negative"), (lat, "latent_image")):
            g.link(src, 0, s, inp)
    decode_and_save(g, name, title, 1220, s, vae)


def edit(name, title, image, with_mask, denoise, tips):
    model = "z_image_turbo_bf16.safetensors"
    g, m, te = base_graph(model, files_note(model, tips))
    load = g.node("LoadImage", (400, 420), [image, "image"], size=(320, 360))
    vae = g.node("VAELoader", (400, 820), ["ae.safetensors"], size=(320, 60))
    ins = [("image", "IMAGE"), ("vae", "VAE")] + ([("mask", "MASK")] if with_mask else [])
    enc = g.node("ZImageImageToLatent", (760, 420), [6, 8, "crop"], size=(320, 160), inputs=ins)
    g.link(load, 0, enc, "image")
    g.link(vae, 0, enc, "vae")
    if with_mask:
        g.link(load, 1, enc, "mask")
    prompt = ("the same scene repainted as a watercolor illustration, soft washes of color, paper texture" if not with_mask
              else "a small wooden cabin with a warm glowing window")
    pos = g.node("ZImageTextEncode", (760, 620), [prompt], size=(420, 160), title="Prompt",
                 inputs=[("text_encoder", "ZIMAGE_TEXT_ENCODER")], color=("#232", "#353"))
    g.link(te, 0, pos, "text_encoder")
    finish(g, name, title, 1220, m, (pos, 0), (enc, 0), vae, [7, "randomize", "turbo", 8, 1.0, 3.0, denoise, 0.0, 1.0])


def reference_edit(name, title, images, prompt, tips):
    model = "z_image_turbo_bf16.safetensors"
    g, m, te = base_graph(model, files_note(model, tips))
    loads = [g.node("LoadImage", (400, 420 + 400 * i), [im, "image"], size=(320, 360), title=f"Reference {i + 1}")
             for i, im in enumerate(images)]
    vae = g.node("VAELoader", (760, 820), ["ae.safetensors"], size=(420, 60))
    ins = [("text_encoder", "ZIMAGE_TEXT_ENCODER"), ("vae", "VAE")] + [(f"image{i + 1}", "IMAGE") for i in range(len(images))]
    enc = g.node("ZImageEditEncode", (760, 420), [prompt, "", True], size=(420, 340), inputs=ins, color=("#232", "#353"))
    g.link(te, 0, enc, "text_encoder")
    g.link(vae, 0, enc, "vae")
    for i, ld in enumerate(loads):
        g.link(ld, 0, enc, f"image{i + 1}")
    finish(g, name, title, 1220, m, (enc, 0), (enc, 2), vae, [5, "randomize", "turbo", 8, 1.0, 3.0, 1.0, 0.0, 1.0], (enc, 1))


def controlnet(name, title, file, inpaint, tips):
    """Load Image → (Canny →) Z-Image Apply ControlNet on the model → sampler."""
    model = "z_image_turbo_bf16.safetensors"
    g, m, te = base_graph(model, files_note(model, tips, (file,)))
    load = g.node("LoadImage", (400, 420), ["zimage_inpaint_example.png" if inpaint else "zimage_example.png", "image"],
                  size=(320, 360))
    vae = g.node("VAELoader", (400, 820), ["ae.safetensors"], size=(320, 60))
    cn = g.node("ZImageControlNetLoader", (20, 880), [file, "auto"], size=(340, 90))
    ins = [("model", "MODEL"), ("control_net", "ZIMAGE_CONTROLNET"), ("vae", "VAE")]
    ins += [("inpaint_image", "IMAGE"), ("mask", "MASK")] if inpaint else [("image", "IMAGE")]
    apply = g.node("ZImageApplyControlNet", (760, 820), [0.9 if inpaint else 0.75, 0.0, 1.0], size=(320, 230), inputs=ins,
                   color=("#223", "#335"))
    g.link(m, 0, apply, "model")
    g.link(cn, 0, apply, "control_net")
    g.link(vae, 0, apply, "vae")
    if inpaint:
        g.link(load, 0, apply, "inpaint_image")
        g.link(load, 1, apply, "mask")
        enc = g.node("ZImageImageToLatent", (760, 420), [6, 8, "crop"], size=(320, 160),
                     inputs=[("image", "IMAGE"), ("vae", "VAE"), ("mask", "MASK")])
        g.link(load, 0, enc, "image")
        g.link(vae, 0, enc, "vae")
        g.link(load, 1, enc, "mask")
        latent, prompt = (enc, 0), "a small wooden cabin with a warm glowing window"
    else:
        canny = g.node("Canny", (400, 920), [0.4, 0.8], size=(320, 90), inputs=[("image", "IMAGE")])
        g.link(load, 0, canny, "image")
        g.link(canny, 0, apply, "image")
        enc = g.node("ZImageEmptyLatent", (760, 420), ["1:1 (1024×1024)", 1024, 1024, 1], size=(320, 170))
        latent, prompt = (enc, 0), "a cozy mountain village at dusk, warm lights, snow, detailed illustration"
    pos = g.node("ZImageTextEncode", (760, 620), [prompt], size=(420, 160), title="Prompt",
                 inputs=[("text_encoder", "ZIMAGE_TEXT_ENCODER")], color=("#232", "#353"))
    g.link(te, 0, pos, "text_encoder")
    finish(g, name, title, 1220, apply, (pos, 0), latent, vae, [11, "randomize", "turbo", 8, 1.0, 3.0, 1.0, 0.0, 1.0])


def main():
    os.makedirs(OUT, exist_ok=True)
    text_to_image(
        "z_image_turbo_text_to_image", "Z-Image-Turbo: text to image", "z_image_turbo_bf16.safetensors", "turbo", 8, 1.0, False,
        "**Settings:** preset *turbo* = 8 steps, cfg 1 (no negative prompt needed), shift 3. Long, detailed prompts work best; "
        "Chinese and English both work. On 8–12 GB cards leave offload on *auto* (or set a budget in GB).")
    text_to_image(
        "z_image_base_text_to_image_cfg", "Z-Image (base): text to image with CFG", "z_image_bf16.safetensors", "base", 28, 4.0, True,
        "**Settings:** preset *base* = 28 steps, cfg 4 (ComfyUI convention; 3–5 works), shift 3, with a negative prompt. "
        "More steps (up to 50) add detail. cfg_normalization 1 tames very high cfg.")
    text_to_image(
        "z_image_turbo_two_loras", "Z-Image-Turbo: two stacked LoRAs", "z_image_turbo_bf16.safetensors", "turbo", 8, 1.0, False,
        "**LoRAs:** put Z-Image LoRAs in `models/loras/` and pick them in the two LoRA nodes (any trainer's format: "
        "ai-toolkit, musubi/kohya, diffusers, LyCORIS/LoKr, DiffSynth). Chain more nodes to stack more; strength 0 "
        "turns one off. The example names are placeholders for your own files.",
        loras=[("zimage_style_lora.safetensors", 0.8), ("zimage_detail_lora.safetensors", 0.5)])
    core_sampling(
        "z_image_turbo_ksampler", "Z-Image-Turbo: our loaders with the core KSampler (official template shape)", False,
        "**Core sampling:** our loader's output is a standard MODEL, so ComfyUI's own KSampler, ModelSamplingAuraFlow, "
        "LoRA loaders and model patches work on it. This is the official template's graph: shift 3, 8 steps, cfg 1, "
        "res_multistep / simple. The Z-Image Sampler adds the reference schedule, CFG normalisation and edit references.")
    core_sampling(
        "z_image_turbo_sampler_custom_advanced", "Z-Image-Turbo: SamplerCustomAdvanced", True,
        "**Custom sampling:** noise, guider, sampler and sigmas as separate nodes (swap in any sampler or scheduler). "
        "BasicGuider runs without CFG, as Turbo needs; use CFGGuider with a negative prompt for the base model.")
    edit("z_image_turbo_image_to_image", "Z-Image-Turbo: image to image", "zimage_example.png", False, 0.6,
         "**Settings:** put your picture in `input/` and pick it in Load Image. *denoise* is the strength: 0.3 keeps the "
         "composition, 0.8 repaints most of it.")
    reference_edit(
        "z_image_edit_one_reference", "Z-Image Edit: instruction editing with one reference image", ["zimage_example.png"],
        "turn this scene into a snowy winter evening, keep the composition",
        "**Editing:** the instruction says what to change; the reference image is given to the model as clean tokens "
        "(the Z-Image Omni/Edit scheme). Today's Turbo/Base weights follow references loosely; when Z-Image-Edit is "
        "released, load it in the model loader instead (and connect a SigLIP2 CLIP vision model if it needs one). "
        "The target size is the (last) reference image's.")
    reference_edit(
        "z_image_edit_two_references", "Z-Image Edit: combine two images", ["zimage_example.png", "zimage_inpaint_example.png"],
        "place the disc from image 2 into the scene of image 1, matching its lighting",
        "**Combining:** up to three references; refer to them as image 1, image 2 … in the instruction. The output takes "
        "the size of the last reference.")
    edit("z_image_turbo_inpainting", "Z-Image-Turbo: inpainting", "zimage_inpaint_example.png", True, 1.0,
         "**Settings:** paint the area to replace in the Load Image mask editor (right-click → Open in MaskEditor). "
         "grow_mask_by and feather blend the edges; denoise 1 fully repaints the masked area.")
    controlnet(
        "z_image_turbo_controlnet_canny", "Z-Image-Turbo: ControlNet (canny edges)",
        "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors", False,
        "**ControlNet:** the core Canny node turns your picture into an edge map; any preprocessor works (depth, pose, "
        "HED, scribble, gray, tile from a preprocessor pack). strength 0.65–0.9; lower end_percent lets details depart "
        "from the edges. The empty latent sets the output size (the control image is resized to it). Every Fun "
        "ControlNet Union version loads here: v1, 2.0, 2.1, lite, tile, 2602.")
    controlnet(
        "z_image_turbo_controlnet_inpainting", "Z-Image-Turbo: ControlNet inpainting",
        "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors", True,
        "**ControlNet inpainting (2.x models):** paint the area to replace in the Load Image mask editor. The ControlNet "
        "sees the picture with that area blanked and the mask; the sampler keeps the rest of the picture. Add a control "
        "image too (e.g. a pose) to guide what is painted.")


if __name__ == "__main__":
    main()
