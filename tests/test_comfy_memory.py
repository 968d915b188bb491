"""Our models inside ComfyUI's memory manager, checked in ComfyUI's own environment (CPU, no server):
the ModelPatcher contract (partial load/unload, detach) drives the block streamer, and loaders and the LoRA
node's parse cache hold their modules weakly."""

import pytest
from comfy_harness import comfyui_path, run_in_comfy
from tiny import diffusers_transformer, save_comfyui

COMFY = comfyui_path()
pytestmark = pytest.mark.comfyui
if COMFY is None:
    pytest.skip("no ComfyUI found (set COMFYUI_PATH or put one in ~/ComfyUI): real-ComfyUI tests skipped", allow_module_level=True)

SCRIPT = r"""
import gc
path, lora_path = ARGS
from zimage_pack.nodes import lora as lora_node, memory
from zimage_pack.nodes.model import ZImageBase, ZImageDiffusionModel
import zimage_core as zc
from zimage_core.offload import module_bytes

out = {}
load = lambda: ZImageBase(zc.load_transformer(path, dtype=torch.float32, cls=ZImageDiffusionModel))
offload = {"mode": "auto", "budget_gb": 0.0, "prefetch": 2}
h1 = memory.cached_load("transformer", path, load, {"dtype": "fp32"}, offload)
h2 = memory.cached_load("transformer", path, load, {"dtype": "fp32"}, offload)
h3 = memory.cached_load("transformer", path, load, {"dtype": "bf16"}, offload)
out["cached_same"] = h1 is h2
out["other_options_other_module"] = h1.model is not h3.model
del h3; gc.collect()
out["released_when_unreferenced"] = len(memory._CACHE) == 1

model = h1.model.diffusion_model
x, t, caps = torch.randn(1, 16, 8, 8), torch.tensor([0.4]), [torch.randn(7, 32)]
with torch.inference_mode():
    ref = model.predict(x, t, caps)
p = h1
p.stream_on_cpu = True
p.activations = 0
total = module_bytes(model)
blocks = [module_bytes(b) for b in model.blocks()]
out["model_size_is_weights"] = p.model_size() == total
p.partially_load(p.load_device, 1e32)                          # ComfyUI: room for everything
out["full_load"] = p.loaded_size() == total and p.last_plan.streamed == []
freed = p.partially_unload(p.offload_device, 3 * max(blocks))   # another model needs room
out["unload_frees_enough"] = freed >= 3 * max(blocks) - 1 and p.loaded_size() <= total - freed + 1
with torch.inference_mode():
    out["streamed_output_equal"] = bool(torch.equal(model.predict(x, t, caps), ref))
out["streamed_blocks_after_unload"] = len(p.last_plan.streamed)
more = p.partially_load(p.load_device, 10 * max(blocks))         # memory came back
out["load_more_grows"] = more > 0
p.budget_gb, p.mode = (3 * max(blocks) + total - sum(blocks)) / 1024**3 * 1.01, "budget"
p.partially_load(p.load_device, 1e32)                          # a user budget caps what ComfyUI offers
out["budget_respected"] = p.loaded_size() <= p.budget_gb * 1024**3
with torch.inference_mode():
    out["budget_output_equal"] = bool(torch.equal(model.predict(x, t, caps), ref))
p.detach()
out["detach_empties"] = p.loaded_size() == 0 and p.current_loaded_device() == p.offload_device
with torch.inference_mode():
    out["after_detach_equal"] = bool(torch.equal(model.predict(x, t, caps), ref))
out["dtype"] = str(p.model_dtype())
parsed = lora_node.parsed(lora_path, model)
out["lora_parse_cached"] = lora_node.parsed(lora_path, model) is parsed
other = load().diffusion_model
lora_node.parsed(lora_path, other)
n = len(lora_node._PARSED)
del other; gc.collect()
out["lora_parse_dies_with_its_module"] = n == 2 and len(lora_node._PARSED) == 1
out["clone_shares_state"] = p.clone().last_plan is p.last_plan and p.clone().mode == p.mode
print("RESULT" + json.dumps(out))
"""


def test_patcher_contract_and_cache(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = save_comfyui(diffusers_transformer(seed=1, n_layers=6), str(tmp_path / "z.safetensors"))
    k = "diffusion_model.layers.0.attention.to_q"
    save_file({k + ".lora_A.weight": torch.randn(4, 64), k + ".lora_B.weight": torch.randn(64, 4)}, str(tmp_path / "l.safetensors"))
    out = run_in_comfy(COMFY, SCRIPT, path, tmp_path / "l.safetensors")
    assert out.pop("dtype") == "torch.float32"
    assert out.pop("streamed_blocks_after_unload") > 0
    assert all(out.values()), out


PACKED_SCRIPT = r"""
gguf_path, dense_path, lora_path, diff_path = ARGS
import comfy.sd, comfy.utils
from zimage_pack.nodes.memory import ZImagePatcher
from zimage_pack.nodes.model import ZImageBase, ZImageDiffusionModel
import zimage_core as zc
from zimage_core.layers import Linear
from zimage_core.offload import module_bytes
from zimage_core.packed import Packed

cpu = torch.device("cpu")
g = torch.Generator().manual_seed(0)
x, t, caps = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.8]), [torch.randn(7, 32, generator=g)] * 2
rel = lambda a, b: float((a - b).norm() / b.norm())

def load(path, storage, dense=False):
    dit = zc.load_transformer(path, dtype=torch.float32, storage_dtype=storage, cls=ZImageDiffusionModel)
    if dense:  # the same numbers as plain float32 Parameters, which ComfyUI patches by merging
        for m in dit.modules():
            if isinstance(m, Linear) and m.patch_only:
                m.weight, m.weight_scale = torch.nn.Parameter(m.compute_weight(torch.float32), requires_grad=False), None
    return ZImagePatcher(ZImageBase(dit), cpu, cpu)

def predict(p):
    p.partially_load(cpu, 1e32)
    with torch.inference_mode():
        return p.model.diffusion_model.predict(x, t, caps)

out = {}
for name, path, storage, lora in (("gguf", gguf_path, None, diff_path), ("fp8", dense_path, torch.float8_e4m3fn, lora_path)):
    p, q = load(path, storage), load(path, storage, dense=True)
    qkv = p.model.diffusion_model.layers[0].attention.qkv
    plain = predict(p)
    sd = comfy.utils.load_torch_file(lora, safe_load=True)
    pl, _ = comfy.sd.load_lora_for_models(p, None, sd, 0.8, 0)  # what LoraLoaderModelOnly does
    ql, _ = comfy.sd.load_lora_for_models(q, None, sd, 0.8, 0)
    a, b = predict(pl), predict(ql)
    out[name] = {"keys": [len(pl.patches), len(ql.patches)], "lora_vs_dense_lora": rel(a, b), "lora_vs_plain": rel(a, plain),
                 "still_stored": isinstance(qkv.weight, Packed) if name == "gguf" else qkv.weight.dtype == storage,
                 "runtime": bool(qkv.patches), "size": [p.model_size(), module_bytes(p.model.diffusion_model), q.model_size()]}
    pl.unpatch_model(unpatch_weights=True)
    out[name]["restored"] = not qkv.patches and torch.equal(predict(p), plain)
print("RESULT" + json.dumps(out))
"""


def test_core_lora_on_packed_and_fp8_weights_equals_dense(tmp_path):
    """ComfyUI's core LoRA loader on a GGUF (packed) and an fp8 model: run-time patches that equal the same LoRA merged
    into the same weights held as float32 (the packed layers' keys are found, the stored weights stay as stored),
    undone exactly, and the memory manager counts stored bytes."""
    import torch
    from safetensors.torch import save_file
    from tiny_gguf import save_dit_gguf

    ref = diffusers_transformer(seed=3, dim=256, n_heads=8, n_kv_heads=8)
    gguf_path, dense = str(tmp_path / "z.gguf"), str(tmp_path / "z.safetensors")
    save_dit_gguf(ref, gguf_path, dense)
    g = torch.Generator().manual_seed(5)
    d, hidden = 256, ref.layers[0].feed_forward.w1.weight.shape[0]
    lora = {}
    for blk in ("layers.0", "noise_refiner.0"):  # ai-toolkit's diffusers names: to_q/k/v land on rows of the fused qkv
        for mod, (o, i) in {"attention.to_q": (d, d), "attention.to_k": (d, d), "attention.to_v": (d, d),
                            "attention.to_out.0": (d, d), "feed_forward.w1": (hidden, d), "feed_forward.w2": (d, hidden)}.items():
            k = f"diffusion_model.{blk}.{mod}"
            lora[k + ".lora_A.weight"] = torch.randn(4, i, generator=g) / i**0.5
            lora[k + ".lora_B.weight"] = torch.randn(o, 4, generator=g) * 0.05
    save_file(lora, str(tmp_path / "lora.safetensors"))
    # a dense diff (not a LoRA) on a packed layer: it becomes an exact run-time delta
    lora["diffusion_model.layers.0.feed_forward.w3.diff"] = torch.randn(hidden, d, generator=g) * 0.01
    save_file(lora, str(tmp_path / "diff.safetensors"))
    out = run_in_comfy(COMFY, PACKED_SCRIPT, gguf_path, dense, tmp_path / "lora.safetensors", tmp_path / "diff.safetensors")
    for name, o in out.items():
        assert o["keys"] == [9 if name == "gguf" else 8] * 2, (name, o)  # qkv, out, w1, w2 in two blocks (+ w3's diff)
        assert o["lora_vs_dense_lora"] < 1e-5 and o["lora_vs_plain"] > 1e-3, (name, o)
        assert o["still_stored"] and o["runtime"] and o["restored"], (name, o)
        stored, counted, dense_size = o["size"]
        assert stored == counted < dense_size, (name, o)


CONTROL_SCRIPT = r"""
dit_path, cn_path, vae_path = ARGS
import comfy.model_management as mm, comfy.sd, comfy.utils
from zimage_pack.nodes import memory
from zimage_pack.nodes.controlnet import ZImageApplyControlNet, load_control_patcher
from zimage_pack.nodes.model import SamplerModel, ZImageBase, ZImageDiffusionModel
import zimage_core as zc
from zimage_core.blocks import PLAIN
from zimage_core.offload import GB, module_bytes

out = {}
load = lambda: ZImageBase(zc.load_transformer(dit_path, dtype=torch.float32, cls=ZImageDiffusionModel))
p = memory.cached_load("transformer", dit_path, load, {"dtype": "fp32"}, {"mode": "auto", "budget_gb": 0.0, "prefetch": 2})
dit = p.model.diffusion_model
cnp = load_control_patcher(cn_path, "fp32")
cn = cnp.model
vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae_path))
g = torch.Generator().manual_seed(0)
m = ZImageApplyControlNet.execute(p, cnp, vae, 0.7, 0.0, 1.0, image=torch.rand(1, 64, 64, 3, generator=g)).result[0]
x, t, caps = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.4]), [torch.randn(7, 32, generator=g)]
with torch.inference_mode():
    ref = SamplerModel(m)(x, t, caps)  # resident (the control latent is encoded here, once)
    plain = SamplerModel(p)(x, t, caps)
out["control_changes_output"] = not torch.equal(ref, plain)
out["not_loaded_by_comfyui_whole"] = cnp not in m.get_nested_additional_models()
out["size_counts_control"] = m.model_size() == module_bytes(dit) + module_bytes(cn)
bound = lambda q: q.fixed_bytes + q.resident_bytes + q.buffer_bytes
budget = (module_bytes(dit) + module_bytes(cn)) // 2
m.stream_on_cpu, m.mode, m.budget_gb = True, "budget", budget / GB
m.load_for(0)  # ComfyUI's load_models_gpu → our partially_load: one plan for both
st = m.streamer
side = st.sides[0] if st.sides else None
out["control_streamed"] = side is not None and cn.executor is side and bool(side.plan.streamed)
out["within_budget"] = bound(st.plan) + bound(side.plan) <= budget
out["loaded_size_counts_control"] = m.loaded_size() == st.ledger.now + side.ledger.now and side.ledger.now > 0
with torch.inference_mode():
    out["streamed_equal"] = bool(torch.equal(SamplerModel(m)(x, t, caps), ref))
out["control_blocks_copied"] = side.copied_bytes >= side.plan.streamed_bytes > 0
st.drop_inflight()  # what the sampler node does after a run or an interrupt
out["drop_releases_control_copies"] = not side.inflight and side.ledger.now == side.plan.fixed_bytes + side.plan.resident_bytes
m.partially_unload(m.offload_device, m.loaded_size() // 4)  # another model needs room: one plan again
with torch.inference_mode():
    out["after_unload_equal"] = bool(torch.equal(SamplerModel(m)(x, t, caps), ref))
out["unload_within"] = m.loaded_size() <= 3 * budget // 4 + 1
mm.unload_all_models()
out["detached"] = cn.executor is PLAIN and dit.executor is PLAIN and side.ledger.now == 0 and m.loaded_size() == 0
p.stream_on_cpu = True
p.load_for(0)  # the plain model (no controls) never places the control model
out["plain_leaves_control"] = cn.executor is PLAIN and p.streamer.sides == []
print("RESULT" + json.dumps(out))
"""


def test_control_models_stream_under_the_models_budget(tmp_path):
    """Z-Image Apply ControlNet under our patcher with a budget too small for both: ComfyUI's load call gives one
    plan in which the control blocks stream, within the budget, with the resident result bit for bit (CPU clones of
    the same tensors); ComfyUI's partial unload replans both; unloading leaves nothing placed."""
    from comfy_harness import comfy_vae
    from tiny import diffusers_controlnet, save_controlnet

    dit = save_comfyui(diffusers_transformer(seed=1, n_layers=30, n_refiner_layers=2), str(tmp_path / "z.safetensors"))
    cn = save_controlnet(diffusers_controlnet("2.1"), tmp_path / "cn.safetensors", "2.1")
    out = run_in_comfy(COMFY, CONTROL_SCRIPT, dit, cn, comfy_vae(str(tmp_path / "ae.safetensors")))
    assert all(out.values()), out


GRAPHS_SCRIPT = r"""
(path,) = ARGS
import zimage_core as zc
from zimage_core.blocks import BlockRun
from zimage_pack.nodes import memory
from zimage_pack.nodes.loaders import ZImageModelLoader
from zimage_pack.nodes.model import GRAPHS, ZImageBase, ZImageDiffusionModel, comfy_block_run

cpu = torch.device("cpu")
p = memory.ZImagePatcher(ZImageBase(zc.load_transformer(path, dtype=torch.float32, cls=ZImageDiffusionModel)), cpu, cpu)
p.stream_on_cpu, p.activations = True, 0
dit = p.model.diffusion_model
x, t, caps = torch.randn(1, 16, 8, 8), torch.tensor([0.4]), [torch.randn(7, 32)]
out = {}
bare = comfy_block_run(dit, {}, x, t, caps, BlockRun(cancel=lambda: False))
out["no_patch_no_hooks"] = not bare.wraps and not bare.after and bare.cancel() is False
out["graphs_off_unless_asked"] = bare.cuda_graphs is False
out["graphs_per_model_option"] = comfy_block_run(dit, {GRAPHS: True}, x, t, caps).cuda_graphs is True
hooked = comfy_block_run(dit, {"patches": {"double_block": [lambda a: {}]}}, x, t, caps)
out["a_patch_hooks"] = len(hooked.wraps) == 1 and len(hooked.after) == 1
dit.use_cuda_graphs()
g = dit.cuda_graphs
for where, act in (("detach", lambda: p.detach()),
                   ("unload", lambda: (p.partially_load(cpu, 1e32), g.graphs.__setitem__("k", object()),
                                       p.partially_unload(cpu, 1)))):
    g.graphs["k"], g.seen = object(), {"k"}
    act()
    out[f"{where}_drops_graphs"] = not g.graphs and not g.seen
try:
    ZImageModelLoader.execute(model_name="x.safetensors", weight_dtype="auto", attention="sdpa", offload="auto",
                              vram_budget_gb=0.0, cuda_graphs=True)
    out["cpu_refused"] = "no error"
except zc.ZImageError as e:
    out["cpu_refused"] = str(e)
print("RESULT" + json.dumps(out))
"""


def test_ksampler_calls_without_patches_run_hookless_and_unloading_drops_cuda_graphs(tmp_path):
    """ComfyUI's path adds no per-block hooks when no patch or ControlNet acts (so a forward can replay as one CUDA
    graph); ComfyUI taking memory back (detach, partial unload) releases the graphs' pools; the loader refuses
    cuda_graphs on a CPU-only ComfyUI with a message that says what to do."""
    path = save_comfyui(diffusers_transformer(seed=1), str(tmp_path / "z.safetensors"))
    out = run_in_comfy(COMFY, GRAPHS_SCRIPT, path)
    assert out.pop("cpu_refused") == "CUDA graphs need an NVIDIA GPU and ComfyUI runs on cpu; turn cuda_graphs off."
    assert all(out.values()), out
