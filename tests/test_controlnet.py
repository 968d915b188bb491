"""Fun ControlNet Union: our control model + transformer against diffusers' ZImageControlNetModel +
ZImageTransformer2DModel on random tiny weights, for every published layout.

Layouts (VideoX-Fun ``config/z_image/z_image_control*.yaml``, aigc-apps/VideoX-Fun): v1 = 6 layers after
main layers 0,5,…,25, 16 channels, plain control refiner; 2.1 = 15 layers after 0,2,…,28, 33 channels,
control refiner with hints after noise-refiner blocks 0,1; lite = 3 layers after 0,10,20; 2.0 = as 2.1 but
the control layers run as the refiner (its own refiner shipped untrained). Files are written with
diffusers' (= VideoX-Fun's) parameter names and with ComfyUI's converted names (``z_image_convert`` in
ComfyUI ``comfy_extras/nodes_model_patch.py``: fused qkv, ``out``, ``q_norm``).

diffusers 0.42.1 computes the 2.x refiner hints inside ZImageControlNetModel but its transformer has no
input for them (only ``controlnet_block_samples``); VideoX-Fun adds them to the main noise refiner
(``BaseZImageTransformerBlock`` there). The reference below adds them with forward hooks, as VideoX-Fun does.

Truth: diffusers in float64. Ours in fp32 must be within 2e-6 (relative norm) of it and at most twice as far as
diffusers' own fp32 run: measured 5e-7 … 1e-6 for both, every layout.
"""

import os

import pytest
import torch
from safetensors.torch import save_file
from tiny import CONTROL_LAYOUTS as LAYOUTS
from tiny import TINY_DIT, diffusers_controlnet, diffusers_transformer, rel_err
from tiny import save_controlnet as controlnet_file

from zimage_core import ZImageError, load_transformer
from zimage_core.blocks import PLAIN, BlockRun
from zimage_core.controlnet import Control, blank_masked, control_hooks, control_input, load_controlnet
from zimage_core.offload import BlockStreamer, Ledger, module_bytes, plan_with_sides

DIT = dict(n_layers=30, n_refiner_layers=2)
TOL = 2e-6


def reference(dit, cn, x, t, caps, ctl, scale):
    """diffusers' control model + transformer, with the 2.x refiner hints added as VideoX-Fun does."""
    from diffusers import ZImageControlNetModel

    dt = next(dit.parameters()).dtype
    cn = ZImageControlNetModel.from_transformer(cn, dit)
    chain = {"control_noise_refiner": cn.control_noise_refiner, "control_layers": cn.control_layers}.get(
        cn.config.add_control_noise_refiner)
    got = []
    hooks = [chain[-1].register_forward_hook(lambda _m, _a, out: got.append(out))] if chain is not None else []
    xs = [xi.to(dt)[:, None] for xi in x]
    with torch.no_grad():
        samples = cn(xs, t.to(dt), [c.to(dt) for c in caps], [c.to(dt)[:, None] for c in ctl], conditioning_scale=scale)
        for h in hooks:
            h.remove()
        if got:  # first call of the chain's last block: [hint 0, hint 1, …, state]
            hints = got[0][:-1]
            hooks = [dit.noise_refiner[j].register_forward_hook(lambda _m, _a, out, j=j: out + hints[j] * scale)
                     for j in range(len(dit.noise_refiner))]
        out = dit(xs, t.to(dt), [c.to(dt) for c in caps], controlnet_block_samples=samples, return_dict=False)[0]
        for h in hooks:
            h.remove()
    return [o[:, 0] for o in out]


def inputs(seed, shapes, cap_lens, in_ch):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, h, w, generator=g) for h, w in shapes]
    ctl = [torch.randn(in_ch, h, w, generator=g) for h, w in shapes]
    t = torch.rand(1, generator=g).expand(len(shapes))
    caps = [torch.randn(n, TINY_DIT["cap_feat_dim"], generator=g) for n in cap_lens]
    return x, t, caps, ctl


def controlled(model, x, t, caps, controls):
    """Our transformer with these controls, as the sampler runs it."""
    return model(x, t, caps, run=BlockRun(after=control_hooks(controls, model, t, tuple(x[0].shape[-2:]))))


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    from tiny import save_comfyui

    ref32 = diffusers_transformer(seed=1, **DIT)
    ref64 = diffusers_transformer(seed=1, dtype=torch.float64, **DIT)
    path = save_comfyui(ref32, str(tmp_path_factory.mktemp("dit") / "z_image.safetensors"))
    return ref32, ref64, load_transformer(path, dtype=torch.float32)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_diffusers(dit, tmp_path, layout):
    ref32, ref64, ours = dit
    cn32 = diffusers_controlnet(layout)
    model = load_controlnet(controlnet_file(cn32, tmp_path / "cn.safetensors", layout), dtype=torch.float32)
    expect = {"v1": "plain", "2.1": "control", "lite": "control", "2.0": "layers"}[layout]
    assert model.cfg.refiner == expect and model.cfg.places == LAYOUTS[layout]["control_layers_places"]
    # ComfyUI's converted names load into the same tensors
    fused = load_controlnet(controlnet_file(cn32, tmp_path / "cn_comfy.safetensors", layout, "comfyui"), dtype=torch.float32)
    a, b = model.state_dict(), fused.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shapes, cap_lens = [(8, 8), (8, 8)], [5, 40]  # a batch whose captions differ in length: padding masked
    x, t, caps, ctl = inputs(0, shapes, cap_lens, model.cfg.in_channels)
    truth = reference(ref64, diffusers_controlnet(layout, dtype=torch.float64), x, t, caps, ctl, 0.7)
    theirs = reference(ref32, cn32, x, t, caps, ctl, 0.7)
    with torch.no_grad():
        got = controlled(ours, x, t, caps, [Control(model, torch.stack(ctl), 0.7)])
        plain = ours(x, t, caps)
    for o, r64, r32, p in zip(got, truth, theirs, plain):
        e, e_diff = rel_err(o, r64), rel_err(r32, r64)
        assert e < TOL and e < 2 * e_diff + 1e-7, (e, e_diff)
        assert rel_err(p, r64) > 1e-2  # the control changes the prediction


def test_strength_zero_and_outside_range_is_no_control_bit_for_bit(dit, tmp_path):
    _, _, ours = dit
    model = load_controlnet(controlnet_file(diffusers_controlnet("2.1"), tmp_path / "cn.safetensors", "2.1"),
                            dtype=torch.float32)
    x, t, caps, ctl = inputs(1, [(8, 8)], [7], 33)
    t = torch.tensor([0.25])  # sigma 0.75
    with torch.no_grad():
        plain = ours(x, t, caps)
        zero = controlled(ours, x, t, caps, [Control(model, torch.stack(ctl), 0.0)])
        # sigma 0.75 is 50 % into the shift-3 schedule: a control over 60–100 % is off, one over 40–60 % is on
        late = controlled(ours, x, t, caps, [Control(model, torch.stack(ctl), 1.0, start=0.6)])
        on = controlled(ours, x, t, caps, [Control(model, torch.stack(ctl), 1.0, start=0.4, end=0.6)])
    assert torch.equal(zero[0], plain[0]) and torch.equal(late[0], plain[0])
    assert not torch.equal(on[0], plain[0])


def test_two_controls_stack(dit, tmp_path):
    """Two models: each hint is added after its own blocks (v1 after 0,5,…; lite after 0,10,20)."""
    ref32, ref64, ours = dit
    a, b = diffusers_controlnet("v1", seed=4), diffusers_controlnet("lite", seed=5)
    ma = load_controlnet(controlnet_file(a, tmp_path / "a.safetensors", "v1"), dtype=torch.float32)
    mb = load_controlnet(controlnet_file(b, tmp_path / "b.safetensors", "lite"), dtype=torch.float32)
    x, t, caps, ctl_a = inputs(2, [(8, 8)], [9], 16)
    ctl_b = [torch.randn(33, 8, 8, generator=torch.Generator().manual_seed(9))]
    from diffusers import ZImageControlNetModel

    with torch.no_grad():
        got = controlled(ours, x, t, caps, [Control(ma, torch.stack(ctl_a), 0.6), Control(mb, torch.stack(ctl_b), 0.9)])
        a64, b64 = diffusers_controlnet("v1", 4, torch.float64), diffusers_controlnet("lite", 5, torch.float64)
        xs, tt, cc = [x[0].double()[:, None]], t.double(), [caps[0].double()]
        got_b = []
        hook = b64.control_noise_refiner[-1].register_forward_hook(lambda _m, _i, o: got_b.append(o))
        sb = ZImageControlNetModel.from_transformer(b64, ref64)(xs, tt, cc, [ctl_b[0].double()[:, None]], 0.9)
        hook.remove()
        # lite's refiner hints enter the main noise refiner, so v1's first control block sees them too
        hints = got_b[0][:-1]
        hooks = [ref64.noise_refiner[j].register_forward_hook(lambda _m, _i, o, j=j: o + hints[j] * 0.9) for j in range(2)]
        sa = ZImageControlNetModel.from_transformer(a64, ref64)(xs, tt, cc, [ctl_a[0].double()[:, None]], 0.6)
        both = {k: sa.get(k, 0) + sb.get(k, 0) for k in set(sa) | set(sb)}
        truth = ref64(xs, tt, cc, controlnet_block_samples=both, return_dict=False)[0][0][:, 0]
        for h in hooks:
            h.remove()
    assert rel_err(got[0], truth) < TOL


def test_hints_follow_the_control_image(dit, tmp_path):
    """The v1 hints depend on the control image: a different image gives a different prediction."""
    _, _, ours = dit
    model = load_controlnet(controlnet_file(diffusers_controlnet("v1"), tmp_path / "cn.safetensors", "v1"),
                            dtype=torch.float32)
    x, t, caps, ctl = inputs(3, [(8, 8)], [4], 16)
    with torch.no_grad():
        a = controlled(ours, x, t, caps, [Control(model, torch.stack(ctl))])
        b = controlled(ours, x, t, caps, [Control(model, torch.stack(ctl) * 0.5)])
    assert rel_err(a[0], b[0]) > 1e-3


def test_fp8_file_keeps_fp8_storage(dit, tmp_path):
    ref32, ref64, ours = dit
    cn = diffusers_controlnet("lite")
    path = controlnet_file(cn, tmp_path / "cn_fp8.safetensors", "lite", style="comfyui")
    from safetensors.torch import load_file

    sd = load_file(path)
    sd = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    save_file(sd, path)
    model = load_controlnet(path, dtype=torch.float32)
    assert model.control_layers[0].attention.qkv.weight.dtype == torch.float8_e4m3fn
    # the reference holds the same fp8-rounded values
    cn64 = diffusers_controlnet("lite", dtype=torch.float64)
    with torch.no_grad():
        for p in cn64.parameters():
            if p.ndim == 2:
                p.copy_(p.to(torch.float8_e4m3fn).double())
    x, t, caps, ctl = inputs(4, [(8, 8)], [6], 33)
    truth = reference(ref64, cn64, x, t, caps, ctl, 1.0)
    with torch.no_grad():
        got = controlled(ours, x, t, caps, [Control(model, torch.stack(ctl))])
    assert rel_err(got[0], truth[0]) < TOL


def test_broken_refiner_detected(tmp_path):
    m20 = load_controlnet(controlnet_file(diffusers_controlnet("2.0"), tmp_path / "a.safetensors", "2.0"))
    m21 = load_controlnet(controlnet_file(diffusers_controlnet("2.1"), tmp_path / "b.safetensors", "2.1"))
    assert m20.cfg.refiner == "layers" and not hasattr(m20, "control_noise_refiner")
    assert m21.cfg.refiner == "control" and len(m21.control_noise_refiner) == 2


def test_wrong_files_are_named(dit, tmp_path):
    p = tmp_path / "flux_cn.safetensors"
    save_file({"controlnet_blocks.0.weight": torch.zeros(4, 4), "pos_embed_input.weight": torch.zeros(4, 4)}, str(p))
    with pytest.raises(ZImageError, match="not a Z-Image Fun ControlNet.*another model family"):
        load_controlnet(str(p))
    sd = diffusers_controlnet("v1").state_dict()
    sd["something_else.weight"] = torch.zeros(2)
    p2 = tmp_path / "merged.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p2))
    with pytest.raises(ZImageError, match="do not belong.*something_else"):
        load_controlnet(str(p2))
    model = load_controlnet(controlnet_file(diffusers_controlnet("v1"), tmp_path / "c.safetensors", "v1"))
    x, t, caps, _ = inputs(0, [(8, 8)], [4], 16)
    with pytest.raises(ZImageError, match="33 channels|takes 16 channels"):
        controlled(dit[2], x, t, caps, [Control(model, torch.randn(1, 33, 8, 8))])


def test_control_input_follows_videox_fun():
    """VideoX-Fun ZImageControlPipeline: [control, 1 − mask (nearest), latent of the image blanked where mask ≥ .5]."""
    from zimage_core.controlnet import ControlNetConfig

    c = torch.randn(1, 16, 4, 4)
    inp = torch.randn(1, 16, 4, 4)
    mask = (torch.rand(1, 1, 4, 4) > 0.5).float()
    v1 = ControlNetConfig(in_channels=16)
    v2 = ControlNetConfig(in_channels=33)
    assert torch.equal(control_input(v1, c), c)
    out = control_input(v2, c, inp, mask)
    assert torch.equal(out[:, :16], c) and torch.equal(out[:, 16:17], 1 - mask) and torch.equal(out[:, 17:], inp)
    none = control_input(v2, None, inp)
    assert torch.equal(none[:, :16], torch.zeros_like(c)) and torch.equal(none[:, 16:17], torch.zeros(1, 1, 4, 4))
    img = torch.rand(1, 3, 8, 8)
    m = torch.zeros(1, 1, 8, 8)
    m[..., :4] = 1
    b = blank_masked(img, m)
    assert torch.allclose(b[..., 4:], img[..., 4:]) and torch.equal(b[..., :4], torch.full_like(b[..., :4], 0.5))


# ---- whole pipelines ---------------------------------------------------------------------------------


class RefinerHints:
    """Adds the 2.x refiner hints to diffusers' transformer inside its pipelines (VideoX-Fun's forward; diffusers
    0.42.1 computes them in the control model but never passes them on). The noise-refiner blocks are shared
    with the control model, so hints are added only outside the control model's own forward."""

    def __init__(self, cn, dit):
        self.inside, self.hints, self.scale = False, None, 1.0
        chain = {"control_noise_refiner": cn.control_noise_refiner, "control_layers": cn.control_layers}.get(
            cn.config.add_control_noise_refiner)
        self.handles = [cn.register_forward_pre_hook(self.enter, with_kwargs=True), cn.register_forward_hook(self.leave)]
        if chain is not None:
            self.handles.append(chain[-1].register_forward_hook(self.capture))
            self.handles += [b.register_forward_hook(lambda _m, _a, o, j=j: self.add(j, o)) for j, b in enumerate(dit.noise_refiner)]

    def enter(self, _m, args, kwargs):
        self.inside, self.hints = True, None
        self.scale = kwargs.get("conditioning_scale", args[4] if len(args) > 4 else 1.0)

    def leave(self, _m, _a, _o):
        self.inside = False

    def capture(self, _m, _a, o):
        if self.inside and self.hints is None:
            self.hints = o[:-1]

    def add(self, j, o):
        return o if self.inside or self.hints is None else o + self.hints[j] * self.scale

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def pipes(tmp_path_factory, tokenizer_dir, hf_tokenizer):
    from tiny import tiny_qwen, tiny_vae, write_models_dir

    import zimage_core as zc

    refs = {"dit": diffusers_transformer(seed=1, **DIT), "te": tiny_qwen(0), "vae": tiny_vae(0)}
    paths = write_models_dir(str(tmp_path_factory.mktemp("models")), refs["dit"], refs["te"], refs["vae"])
    ours = zc.ZImagePipeline.from_paths(zc.find_weights(transformer=paths["transformer"], text_encoder=paths["text_encoder"],
                                                        vae=paths["vae"], tokenizer=tokenizer_dir), dtype=torch.float32)
    return refs, ours, hf_tokenizer


@pytest.mark.parametrize("layout,inpaint", [("v1", False), ("2.1", True), ("2.0", True)])
def test_pipeline_equals_diffusers(pipes, tmp_path, layout, inpaint):
    """Final latents of our pipeline = ZImageControlNetPipeline / ZImageControlNetInpaintPipeline (+ refiner hints)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageControlNetInpaintPipeline, ZImageControlNetPipeline
    from tiny import sample_picture

    import zimage_core as zc
    from zimage_core.controlnet import ControlImage

    refs, ours, tok = pipes
    cn = diffusers_controlnet(layout)
    model = load_controlnet(controlnet_file(cn, tmp_path / "cn.safetensors", layout), dtype=torch.float32)
    ctl_img, init = sample_picture(64, 48, seed=1), sample_picture(64, 48, seed=2)
    mask = torch.zeros(48, 64)
    mask[8:40, 16:48] = 1.0
    s = zc.GenerationSettings(prompt="a house by a lake", width=64, height=48, preset="base", steps=3, cfg=3.0, seed=7)
    spec = ControlImage(model, ctl_img, 0.8, init if inpaint else None, mask[None, None] if inpaint else None)
    _, latents = ours(s, controls=[spec])
    cls = ZImageControlNetInpaintPipeline if inpaint else ZImageControlNetPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=refs["vae"], text_encoder=refs["te"],
               tokenizer=tok, transformer=refs["dit"], controlnet=cn)
    extra = dict(image=init, mask_image=mask[None, None]) if inpaint else {}
    hints = RefinerHints(pipe.controlnet, refs["dit"])
    try:
        ref = pipe(prompt=s.prompt, negative_prompt=None, height=48, width=64, num_inference_steps=3, guidance_scale=2.0,
                   control_image=ctl_img, controlnet_conditioning_scale=0.8, latents=zc.comfy_noise((1, 16, 6, 8), 7),
                   output_type="latent", **extra).images
    finally:
        hints.remove()
    assert rel_err(latents, ref) < 2e-5, rel_err(latents, ref)


def test_pipeline_streams_control_models_under_its_budget(pipes, tmp_path):
    """The pipeline plans its control models with the transformer under one --vram-budget: too small for both, the
    control blocks stream and the final latents equal the resident run's; afterwards nothing stays placed."""
    from tiny import sample_picture

    import zimage_core as zc
    from zimage_core.controlnet import ControlImage
    from zimage_core.offload import GB, activation_bytes

    _, ours, _ = pipes
    model = load_controlnet(controlnet_file(diffusers_controlnet("2.1"), tmp_path / "cn.safetensors", "2.1"),
                            dtype=torch.float32)
    s = zc.GenerationSettings(prompt="a house by a lake", width=64, height=48, preset="base", steps=2, cfg=3.0, seed=5)
    spec = ControlImage(model, sample_picture(64, 48, seed=3), 0.8)
    _, resident = ours(s, controls=[spec])
    acts = activation_bytes(ours.transformer, 64, 48, 1, True, controls=1)
    seen = []
    ours.stream_on_cpu, ours.offload_mode = True, "budget"
    budget = acts + (module_bytes(ours.transformer) + module_bytes(model)) // 2
    ours.vram_budget_gb = budget / GB
    try:
        _, streamed = ours(s, controls=[spec], callback=lambda _: seen.append((ours.transformer.executor, model.executor)))
    finally:
        ours.stream_on_cpu, ours.offload_mode, ours.vram_budget_gb = False, "auto", None
    assert torch.equal(streamed, resident)
    main, side = seen[0]
    assert side.plan.streamed and side.copied_bytes >= 2 * side.plan.streamed_bytes  # streamed at both steps
    assert bound(main.plan) + bound(side.plan) <= budget + 1  # (GB rounding)
    assert model.executor is PLAIN and ours.transformer.executor is PLAIN and main.ledger.now == side.ledger.now == 0


def test_cli_control_options(tmp_path, tokenizer_dir):
    """--control IMAGE[:STRENGTH] with --control-model FILE changes the image; strength 0 leaves it as without."""
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image
    from tiny import sample_picture, write_models_dir

    models = tmp_path / "models"
    write_models_dir(str(models))
    cn = diffusers_controlnet("lite")  # tiny main model (2 layers): refiner hint 0 and the hint after layer 0 apply
    path = controlnet_file(cn, tmp_path / "Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite.safetensors", "lite")
    sample_picture(64, 48, seed=4).save(tmp_path / "canny.png")
    root = os.path.join(os.path.dirname(__file__), "..")

    def run(*extra, out):
        args = ["generate", "--models", str(models), "--tokenizer", tokenizer_dir, "--dtype", "fp32", "-p", "x",
                "--width", "64", "--height", "48", "--seed", "3", "-o", str(tmp_path / out), *extra]
        r = subprocess.run([sys.executable, "-m", "zimage_core", *args], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=os.path.abspath(root)), cwd=root)
        assert r.returncode == 0, r.stderr
        return np.asarray(Image.open(tmp_path / out).convert("RGB"), dtype=np.int16)

    plain = run(out="plain.png")
    ctl = run("--control", f"{tmp_path / 'canny.png'}:0.9", "--control-model", path, out="ctl.png")
    off = run("--control", f"{tmp_path / 'canny.png'}:0", "--control-model", path, out="off.png")
    assert np.abs(ctl - plain).mean() > 0.5 and np.array_equal(off, plain)


# ---- ComfyUI's native path ---------------------------------------------------------------------------------
NATIVE = r'''
import sys, torch
comfy, dit_path, cn_path, layout, inp, out = sys.argv[1:7]
sys.path.insert(0, comfy)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.ops, comfy.utils
from comfy.ldm.lumina.model import NextDiT
from comfy.ldm.lumina.controlnet import ZImage_Control
from comfy_extras.nodes_model_patch import ZImageControlPatch, z_image_convert

ops = comfy.ops.manual_cast
dit = NextDiT(patch_size=2, in_channels=16, dim=3840, n_layers=1, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
              multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64,
              axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
              time_scale=1000.0, pad_tokens_multiple=32, operations=ops, dtype=torch.bfloat16, device="cpu")
missing, unexpected = dit.load_state_dict(comfy.utils.load_torch_file(dit_path), strict=False)
assert not unexpected and all("norm_final" in k for k in missing), (missing, unexpected)
sd = z_image_convert(comfy.utils.load_torch_file(cn_path))
# the configuration ModelPatchLoader derives for this layout, with the file's one/two control layers (lite: its three)
n = {"v1": 1, "lite": 3}.get(layout, 2)
cfg = dict(n_control_layers=n) if layout == "v1" else dict(n_control_layers=n, additional_in_dim=17, refiner_control=True,
                                                             broken=layout == "2.0")
cn = ZImage_Control(dtype=torch.bfloat16, device="cpu", operations=ops, **cfg)  # bf16 storage, fp32 compute
cn.load_state_dict(sd, strict=True)

class Vae:  # the control input is given already encoded
    def spacial_compression_encode(self):
        return 8

class Patch:
    model = cn

x, t, cap, ctl = (v.float() for v in torch.load(inp).values())
p = ZImageControlPatch.__new__(ZImageControlPatch)
p.model_patch, p.vae, p.strength, p.temp_data = Patch(), Vae(), 0.7, None
p.encoded_image, p.encoded_image_size = ctl, (x.shape[-2] * 8, x.shape[-1] * 8)
with torch.no_grad():
    v = dit(x, 1.0 - t, cap, cap.shape[1], transformer_options={"patches": {"noise_refiner": [p], "double_block": [p]}})
torch.save({"out": -v}, out)  # native NextDiT returns the velocity −(x0 − noise)
'''


@pytest.mark.comfyui
@pytest.mark.parametrize("layout", ["v1", "2.1", "2.0", "lite"])
def test_comfyui_native_path(tmp_path, layout):
    """ComfyUI's ZImage_Control + NextDiT (it recognises Z-Image only at width 3840) against ours with
    ``caption_in_stream=False``, its variant: equal within 1e-4 (ComfyUI's fp32 attention and RoPE differ in
    rounding, ≈3e-5 on the plain transformer). With the reference's caption stream the results differ: that is
    the one place where ComfyUI's native node departs from VideoX-Fun and diffusers."""
    import subprocess

    from comfy_harness import comfyui_path, comfyui_python
    from tiny import save_comfyui

    comfy = comfyui_path()
    if comfy is None:
        pytest.skip("no ComfyUI found")
    # measured on 2 loaded CPU cores: 6 min for v1, 2.1 and 2.0 (lite alone 4 min), 17 GB peak — beyond the CI budget, like the
    # full-width MODEL parity module (tests/test_comfy_model.py)
    if os.environ.get("ZIMAGE_FULL_WIDTH_TESTS") != "1":
        pytest.skip("full-width ControlNet vs native ZImage_Control (minutes, ≈17 GB RAM): set ZIMAGE_FULL_WIDTH_TESTS=1")
    big = dict(dim=3840, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], cap_feat_dim=64, n_layers=1, n_refiner_layers=2)
    dit_path = save_comfyui(diffusers_transformer(seed=1, **big), str(tmp_path / "dit.safetensors"), dtype=torch.bfloat16)
    # few control layers keep memory low (≈3 GB each side). 2.x: two, at native's spacing round(30 / n) = 15 — with one,
    # native's ZImageControlPatch drops its state after the first refiner block (block 1 / 30 > n − 1) and restarts it
    # lite: all three, at native's spacing round(30 / 3) = 10 (ModelPatchLoader's lite: no control_layers.4)
    places = {"v1": [0], "lite": [0, 10, 20]}.get(layout, [0, 15])
    from diffusers import ZImageControlNetModel
    from tiny import randomize_
    cfg = {**LAYOUTS[layout], "control_layers_places": places}
    cn = randomize_(ZImageControlNetModel(**cfg, control_refiner_layers_places=[0, 1], n_refiner_layers=2, dim=3840,
                                          n_heads=30, n_kv_heads=30), 3)
    cn_path = controlnet_file(cn, tmp_path / "cn.safetensors", layout, dtype=torch.bfloat16)
    del cn
    g = torch.Generator().manual_seed(0)
    x, cap = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 20, 64, generator=g)
    t = torch.tensor([0.4])
    ctl = torch.randn(1, 16 if layout == "v1" else 33, 16, 16, generator=g)
    torch.save({"x": x, "t": t, "cap": cap, "ctl": ctl}, tmp_path / "in.pt")
    r = subprocess.run([comfyui_python(comfy), "-c", NATIVE, comfy, dit_path, cn_path, layout, str(tmp_path / "in.pt"),
                        str(tmp_path / "out.pt")], capture_output=True, text=True, cwd=comfy)
    assert r.returncode == 0, r.stderr[-3000:]
    native = torch.load(tmp_path / "out.pt")["out"]
    ours = load_transformer(dit_path, dtype=torch.float32)
    model = load_controlnet(cn_path, dtype=torch.float32)
    assert model.cfg.places == places
    with torch.no_grad():
        image_only = controlled(ours, x, t, list(cap), [Control(model, ctl, 0.7, caption_in_stream=False)])
        reference = controlled(ours, x, t, list(cap), [Control(model, ctl, 0.7)])
    assert rel_err(image_only, native) < 1e-4, rel_err(image_only, native)
    assert rel_err(reference, native) > 1e-3


# ---- offloading: control blocks streamed like the transformer's ------------------------------------------------
def joint_plans(ours, model, room: int):
    """Plans for the transformer and one control model under one budget: both streamed, ``room`` bytes of resident
    blocks beyond the smallest plan (fixed modules and three blocks in flight each)."""
    def least(m):
        sizes = [module_bytes(b) for b in m.blocks()]
        return module_bytes(m) - sum(sizes) + 3 * max(sizes)

    budget = least(ours) + least(model) + room
    return budget, plan_with_sides(ours, [model], mode="budget", budget=budget, device="cpu")


def bound(plan) -> int:
    return plan.fixed_bytes + plan.resident_bytes + plan.buffer_bytes + plan.activation_bytes


@pytest.mark.parametrize("layout", ["v1", "2.1", "2.0"])
def test_streamed_control_model_equals_resident(dit, tmp_path, layout):
    """A streamed control model beside a streamed transformer gives the resident result bit for bit (on the CPU the
    streamed weights are clones of the same tensors run by the same kernels), within each plan at every moment,
    and leaves nothing placed after detach."""
    _, _, ours = dit
    model = load_controlnet(controlnet_file(diffusers_controlnet(layout), tmp_path / "cn.safetensors", layout),
                            dtype=torch.float32)
    x, t, caps, ctl = inputs(5, [(8, 8), (8, 8)], [5, 40], model.cfg.in_channels)
    controls = [Control(model, torch.stack(ctl), 0.7)]
    with torch.no_grad():
        ref = controlled(ours, x, t, caps, controls)
    budget, (main, side) = joint_plans(ours, model, room=len(ours.layers) // 2 * max(map(module_bytes, ours.layers)))
    assert side.streamed and main.streamed and main.resident and bound(main) + bound(side) <= budget
    ledgers = Ledger(), Ledger()
    st = BlockStreamer(ours, main, ledgers[0]).attach()
    st.sides = [BlockStreamer(model, side, ledgers[1]).attach()]
    try:
        with torch.no_grad():
            runs = [controlled(ours, x, t, caps, controls) for _ in range(2)]  # the second one after a cyclic prefetch
    finally:
        copied = st.sides[0].copied_bytes
        st.detach()
    for got in runs:
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert copied >= 2 * side.streamed_bytes  # every streamed control block was copied in, each forward
    assert ledgers[0].peak <= bound(main) and ledgers[1].peak <= bound(side)
    assert ledgers[0].now == ledgers[1].now == 0 and model.executor is PLAIN and ours.executor is PLAIN


def test_one_budget_streams_control_blocks_first(dit, tmp_path):
    """Everything fits: all resident. Short: the control model streams and the transformer plans with the rest;
    room the transformer does not need goes back to control blocks; the planned peaks never add up past the budget."""
    _, _, ours = dit
    model = load_controlnet(controlnet_file(diffusers_controlnet("2.1"), tmp_path / "cn.safetensors", "2.1"),
                            dtype=torch.float32)
    acts = 10_000
    total = module_bytes(ours) + module_bytes(model) + acts
    big = plan_with_sides(ours, [model], mode="budget", budget=total, activations=acts, device="cpu")
    assert all(not p.streamed for p in big) and sum(map(bound, big)) == total
    sizes = list(map(module_bytes, model.blocks()))
    block = max(sizes)
    few = module_bytes(ours) + acts + module_bytes(model) - sum(sizes) + 5 * block  # 3 in flight, 2 resident
    for budget in (total - 1, total - 4 * block, few, total // 2, total // 4):
        main, side = plan_with_sides(ours, [model], mode="budget", budget=budget, activations=acts, device="cpu")
        assert side.streamed, budget
        assert main.shortfall or bound(main) + bound(side) <= budget, (budget, main.describe(), side.describe())
        if budget >= few:
            assert not main.streamed and side.resident  # the transformer whole, some control blocks resident
        if budget <= total // 2:
            assert main.streamed and not side.resident
    auto = plan_with_sides(ours, [model], mode="auto", free_bytes=total // 2, activations=acts, device="cpu")
    assert auto[1].streamed and bound(auto[0]) + bound(auto[1]) <= total // 2


def test_interrupt_releases_the_control_models_copies(dit, tmp_path):
    """An interrupted sampling leaves control blocks in flight; the sampler node's ``drop_inflight`` on the
    transformer's streamer releases them too, and the next run is right."""
    import zimage_core as zc

    _, _, ours = dit
    model = load_controlnet(controlnet_file(diffusers_controlnet("v1"), tmp_path / "cn.safetensors", "v1"),
                            dtype=torch.float32)
    x, t, caps, ctl = inputs(6, [(8, 8)], [9], 16)
    controls = [Control(model, torch.stack(ctl), 0.8)]
    with torch.no_grad():
        ref = controlled(ours, x, t, caps, controls)
    _, (main, side) = joint_plans(ours, model, room=0)
    st = BlockStreamer(ours, main).attach()
    st.sides = [BlockStreamer(model, side).attach()]
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] == 9  # inside the main layers: control layers 0 and 1 have run

    try:
        with pytest.raises(zc.ZImageInterrupted):
            zc.sample(ours, x[0][None], caps, sigmas=zc.sigmas(2), cancel=cancel, control=controls)
        assert st.sides[0].inflight
        st.drop_inflight()
        assert not st.sides[0].inflight and st.sides[0].ledger.now == side.fixed_bytes + side.resident_bytes
        with torch.no_grad():
            assert torch.equal(controlled(ours, x, t, caps, controls)[0], ref[0])
    finally:
        st.detach()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: copies on a side stream, the host running ahead")
def test_gpu_streamed_control_model_stays_within_the_plan():
    """On a GPU: a 2.1-layout control model (17 blocks, every one run) streamed beside a partly streamed transformer
    (30 main layers, width 1024, bf16) under one budget. Allocated memory stays within both plans' peaks and the copies
    within their weights, the output equals the resident one, and detaching frees every copy."""
    from zimage_core.controlnet import ControlNetConfig, ZImageControlNet
    from zimage_core.offload import GB, activation_bytes, offload
    from zimage_core.transformer import ZImageConfig, ZImageTransformer

    cfg = ZImageConfig(dim=1024, head_dim=128, ffn_hidden=2816, cap_feat_dim=256, axes_dims=ZImageConfig.axes_for_head_dim(128))
    model = ZImageTransformer(cfg, dtype=torch.bfloat16)
    cn = ZImageControlNet(ControlNetConfig(block=cfg, in_channels=33, n_layers=15, refiner="control")).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*model.parameters(), *cn.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    x, caps = torch.randn(1, 16, 64, 64, generator=g).cuda(), [torch.randn(32, 256, generator=g).cuda()]
    t = torch.tensor([0.5], device="cuda")
    controls = [Control(cn, torch.randn(1, 33, 64, 64, generator=g).cuda(), 0.8)]

    def peak_of(run) -> tuple[int, torch.Tensor]:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            outs = [run() for _ in range(3)]
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, outs[-1]

    def forward():
        return model(x, t, caps, run=BlockRun(after=control_hooks(controls, model, t, (64, 64))))

    model.cuda()
    cn.cuda()
    acts, ref = peak_of(forward)
    model.cpu()
    cn.cpu()
    torch.cuda.empty_cache()

    def fixed_and_block(m):
        sizes = [module_bytes(b) for b in m.blocks()]
        return module_bytes(m) - sum(sizes), max(sizes)

    (fm, bm), (fc, bc) = fixed_and_block(model), fixed_and_block(cn)
    budget = fm + fc + activation_bytes(model, 512, 512, controls=1) + 3 * bc + 23 * bm + 2**20
    base = torch.cuda.memory_allocated()
    st = offload(model, mode="budget", budget_gb=budget / GB, device="cuda", width=512, height=512, sides=[cn])
    side = st.sides[0]
    assert side.plan.streamed and not side.plan.resident and 10 <= len(st.plan.streamed) <= 16, st.plan.describe()
    placed = torch.cuda.memory_allocated() - base
    peak, got = peak_of(forward)
    st.detach()
    torch.cuda.synchronize()
    weights = sum(p.fixed_bytes + p.resident_bytes + p.buffer_bytes for p in (st.plan, side.plan))
    # the promise: both plans' peaks (weights plus the activation estimate, counted once); on an H100 the streamed
    # forward measured 35 MiB over weights + the resident forward's activations (the same with the fused q/k kernel off)
    planned = st.plan.peak_bytes + side.plan.peak_bytes
    assert st.ledger.peak + side.ledger.peak <= weights
    assert placed + peak <= planned, f"peak {(placed + peak) / 2**20:.0f} MiB, plans {planned / 2**20:.0f} MiB (weights " \
        f"{weights / 2**20:.0f} MiB; a resident forward's activations {acts / 2**20:.0f} MiB)"
    assert rel_err(got, ref) <= 1e-6
    assert torch.cuda.memory_allocated() <= base + 2**20 and cn.executor is PLAIN  # no device copy left behind
