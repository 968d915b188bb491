"""Our text encoder's standard CLIP output against ComfyUI's own Z-Image text encoder (CLIPLoader type lumina2) on the
same weights: CLIPTextEncode's conditioning through both. ComfyUI recognises Qwen3-4B by its width (2560), so the
weights are full width with three layers; ComfyUI's Qwen3-4B config is shortened to match (its layer count is fixed)."""

import pytest
import torch
from comfy_harness import comfyui_path, run_in_comfy
from tiny import randomize_, save_qwen_comfyui

COMFY = comfyui_path()
pytestmark = pytest.mark.comfyui
if COMFY is None:
    pytest.skip("no ComfyUI found (set COMFYUI_PATH or put one in ~/ComfyUI): real-ComfyUI tests skipped", allow_module_level=True)

SCRIPT = r"""
import dataclasses, os
import comfy.text_encoders.llama as llama

@dataclasses.dataclass
class ThreeLayers(llama.Qwen3_4BConfig):  # the weights' depth; everything else is Qwen3-4B's
    intermediate_size: int = 64
    num_hidden_layers: int = 3

llama.Qwen3_4BConfig = ThreeLayers
import comfy.sd, folder_paths
from safetensors.torch import save_file
path, out, *texts = ARGS
folder_paths.add_model_folder_path("text_encoders", os.path.dirname(path))
native = comfy.sd.load_clip(ckpt_paths=[path], clip_type=comfy.sd.CLIPType.LUMINA2)
from zimage_pack.nodes.loaders import ZImageTextEncoderLoader
ours = ZImageTextEncoderLoader.execute(os.path.basename(path), "auto", "cpu").args[1]
res = {}
for i, text in enumerate(texts):
    for name, clip in (("native", native), ("ours", ours)):
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        res[f"{name}{i}"] = cond[0][0].float().contiguous()
save_file(res, out)
print("RESULT" + json.dumps({"n": len(texts)}))
"""


def test_clip_text_encode_equals_native_lumina2_clip(tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3Model

    c = Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=64, num_hidden_layers=3, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6)
    path = save_qwen_comfyui(randomize_(Qwen3Model(c), 5).eval(), str(tmp_path / "te" / "qwen_three_layers.safetensors"),
                             dtype=torch.bfloat16)
    texts = ["a red fox asleep in the snow", "一只狐狸，电影感的光线", 'a sign that says "OPEN"']
    out = run_in_comfy(COMFY, SCRIPT, path, tmp_path / "cond.safetensors", *texts, timeout=600)
    assert out["n"] == len(texts)
    got = load_file(str(tmp_path / "cond.safetensors"))
    for i in range(len(texts)):
        a, b = got[f"ours{i}"], got[f"native{i}"]
        assert a.shape == b.shape, (texts[i], a.shape, b.shape)
        rel = float((a.double() - b.double()).norm() / b.double().norm())
        assert rel <= 1e-5, (texts[i], rel)
