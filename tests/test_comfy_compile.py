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
