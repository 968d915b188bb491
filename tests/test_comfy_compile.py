"""ComfyUI's TorchCompileModel on our MODEL, in ComfyUI's own environment (CPU, no server): the compiled diffusion
model is what KSampler runs, and it gives the eager result.

The node's own wrapper (``comfy_api.torch_helpers.set_torch_compile_wrapper``, with the node's clone and guard
options) is driven with a counting backend (``torch._dynamo.testing.CompileCounter``): it proves the frames were
traced and runs their graphs eagerly, in seconds. Inductor itself (the node's default) took 200 s to generate C++ for
this tiny model on a loaded 2-core machine (then 2.4 s vs 4.8 s eager for 3 steps, equal to 8e-7): too slow for CI.
"""

import pytest
from comfy_harness import comfyui_path, run_in_comfy
from tiny import diffusers_transformer, save_comfyui

COMFY = comfyui_path()
pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
if COMFY is None:
    pytest.skip("no ComfyUI found (set COMFYUI_PATH or put one in ~/ComfyUI): real-ComfyUI tests skipped", allow_module_level=True)

SCRIPT = r"""
(path,) = ARGS
import comfy.sample
from comfy_api.torch_helpers import set_torch_compile_wrapper
from comfy_extras.nodes_torch_compile import skip_torch_compile_dict
from torch._dynamo.testing import CompileCounter
from zimage_pack.nodes.memory import ZImagePatcher
from zimage_pack.nodes.model import ZImageBase, ZImageDiffusionModel
import zimage_core as zc

cpu = torch.device("cpu")
p = ZImagePatcher(ZImageBase(zc.load_transformer(path, dtype=torch.float32, cls=ZImageDiffusionModel)), cpu, cpu)
g = torch.Generator().manual_seed(0)
cap = torch.randn(1, 7, 32, generator=g)
lat = torch.zeros(1, 16, 16, 16)
noise = comfy.sample.prepare_noise(lat, 3)
run = lambda m: comfy.sample.sample(m, noise, 3, 1.0, "euler", "simple", [[cap, {}]], [[torch.zeros_like(cap), {}]], lat, seed=3)
eager = run(p)
counter = CompileCounter()
c = p.clone(disable_dynamic=True)  # what TorchCompileModel.execute does, with the counting backend
set_torch_compile_wrapper(model=c, backend=counter, options={"guard_filter_fn": skip_torch_compile_dict})
compiled = run(c)
again = run(p)  # the plain model stays plain
print("RESULT" + json.dumps({"frames": counter.frame_count, "ops": counter.op_count,
                             "rel": float((compiled - eager).norm() / eager.norm()), "plain_again": bool(torch.equal(again, eager))}))
"""


def test_torch_compile_model_on_our_model(tmp_path):
    path = save_comfyui(diffusers_transformer(seed=1), str(tmp_path / "z.safetensors"))
    out = run_in_comfy(COMFY, SCRIPT, path)
    assert out["frames"] > 0 and out["ops"] > 50, out  # our forward was traced (block matmuls, attention…)
    assert out["rel"] < 1e-5 and out["plain_again"], out


LOADER_SCRIPT = r"""
(folder, name) = ARGS
import functools
import comfy.sample, folder_paths
from comfy_api.torch_helpers import set_torch_compile_wrapper
from comfy_extras.nodes_torch_compile import skip_torch_compile_dict
from torch._dynamo.testing import CompileCounter
from zimage_pack.nodes.graph import SamplerSettings, sample_latent
from zimage_pack.nodes.loaders import ZImageModelLoader
from zimage_pack.nodes.model import SamplerModel
import zimage_core as zc

folder_paths.add_model_folder_path("diffusion_models", folder)
counter = CompileCounter()  # the loader's compile, with a counting backend instead of inductor
orig = zc.ZImageTransformer.compile_blocks
zc.ZImageTransformer.compile_blocks = lambda self, **o: orig(self, **{**o, "backend": counter})
load = lambda c: ZImageModelLoader.execute(name, "fp32", "sdpa", "resident", 0.0, compile=c).args[0]
plain, compiled = load(False), load(True)
g = torch.Generator().manual_seed(0)
cond = [[torch.randn(1, 7, 32, generator=g), {}]]
neg = [[torch.randn(1, 5, 32, generator=g), {}]]
lat = {"samples": torch.zeros(1, 16, 16, 16)}
settings = SamplerSettings(seed=3, steps=3, cfg=2.0, shift=3.0)
ours = lambda m: sample_latent(SamplerModel(m), cond, neg, lat, settings)["samples"]
ks = lambda m: comfy.sample.sample(m, comfy.sample.prepare_noise(lat["samples"], 3), 3, 2.0, "euler", "simple", cond, neg,
                                   lat["samples"], seed=3)
rel = lambda a, b: float((a - b).norm() / b.norm())
out = {"distinct": plain is not compiled,
       "compiled_blocks": sum(b._compiled_call_impl is not None for b in compiled.model.diffusion_model.blocks()),
       "plain_blocks": sum(b._compiled_call_impl is not None for b in plain.model.diffusion_model.blocks())}
eager_ours, eager_ks = ours(plain), ks(plain)
out.update(rel_ours=rel(ours(compiled), eager_ours), rel_ks=rel(ks(compiled), eager_ks), loader_frames=counter.frame_count)
# ComfyUI's TorchCompileModel on the plain MODEL now also reaches the Z-Image Sampler (through apply_model)
tcm = CompileCounter()
c = plain.clone(disable_dynamic=True)
set_torch_compile_wrapper(model=c, backend=tcm, options={"guard_filter_fn": skip_torch_compile_dict})
out.update(wrapped=SamplerModel(c).wrapped(), plain_wrapped=SamplerModel(plain).wrapped())
out.update(rel_tcm=rel(ours(c), eager_ours), tcm_frames=tcm.frame_count)
print("RESULT" + json.dumps(out))
"""


def test_loader_compile_option_and_torch_compile_model_reach_both_samplers(tmp_path):
    """The loader's ``compile`` compiles every block of its own (cached separately) model, and both the Z-Image
    Sampler and KSampler then run the compiled blocks; TorchCompileModel's wrapper reaches the Z-Image Sampler too.
    Both give the eager result (a counting backend runs the traced graphs eagerly; fp32, CFG 2, 3 steps)."""
    save_comfyui(diffusers_transformer(seed=1), str(tmp_path / "z.safetensors"))
    out = run_in_comfy(COMFY, LOADER_SCRIPT, tmp_path, "z.safetensors")
    assert out["distinct"] and out["compiled_blocks"] == 4 and out["plain_blocks"] == 0, out  # 1+1 refiners, 2 layers
    assert out["loader_frames"] > 0, out
    assert out["rel_ours"] < 1e-5 and out["rel_ks"] < 1e-5, out
    assert out["wrapped"] and not out["plain_wrapped"] and out["tcm_frames"] > 0, out
    assert out["rel_tcm"] < 1e-5, out
