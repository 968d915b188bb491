"""Fun ControlNet Union for Z-Image (alibaba-pai): a side branch of transformer blocks whose outputs ("hints")
are added to the main stream after chosen blocks.

Reference: VideoX-Fun ``videox_fun/models/z_image_transformer2d_control.py`` and its configs
``config/z_image/z_image_control*.yaml`` (aigc-apps/VideoX-Fun); diffusers ``ZImageControlNetModel`` and
ComfyUI ``comfy/ldm/lumina/controlnet.py`` read the same files. Every published file is one of:

| file                         | control layers | after main layers | in channels | control noise refiner              |
|------------------------------|----------------|-------------------|-------------|------------------------------------|
| Union (v1)                   | 6              | 0, 5, …, 25       | 16          | 2 plain blocks on the control tokens |
| Union 2.0                    | 15             | 0, 2, …, 28       | 33          | the control layers themselves (its own refiner is untrained: all-zero projections) |
| Union 2.1 / 2602 (gray), Tile 2.1 | 15        | 0, 2, …, 28       | 33          | 2 control blocks, hints after noise-refiner blocks 0, 1 |
| lite (2.1, Tile 2.1)         | 3              | 0, 10, 20         | 33          | as 2.1                             |

33 input channels = control latent (16) + keep mask (1) + inpaint latent (16), all in model space.
A control block runs like a main block on its own stream c: the first one starts from
``before_proj(c) + x`` (x = the main stream's input at that point), each returns ``after_proj(c)`` as a hint.
The control stream is [control tokens, caption tokens] with the main sequence's positions, exactly as the
main layers see [image tokens, caption tokens]. (ComfyUI's native node runs the control blocks on the
image tokens alone and adds hints to those only; ``caption_in_stream=False`` reproduces that.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import PLAIN, BlockCall, Executor
from .detect import describe, strip_prefix
from .errors import ZImageError
from .layers import Linear
from .layouts import WRAPPER_PREFIXES
from .loader import Source, fill_module
from .packing import pad_to_multiple
from .quant import layer_formats
from .safetensors_io import open_weights
from .schedule import percent_to_sigma
from .transformer import Block, ZImageConfig
from .transformer_files import internal_shape_fn, weight_plan

ANCHOR = "control_all_x_embedder.2-1.weight"
MAIN_LAYERS = 30  # the hints are spread over Z-Image's 30 main layers (ComfyUI: round(30 / n))
LATENT_CHANNELS = 16


@dataclass
class ControlNetConfig:
    block: ZImageConfig = field(default_factory=ZImageConfig)  # the blocks' sizes (dim, heads, FFN, adaLN)
    in_channels: int = 16
    patch_size: int = 2
    n_layers: int = 6
    n_refiner: int = 2
    refiner: str = "plain"  # "plain" (v1) | "control" (2.1) | "layers" (2.0: control layers double as refiner)

    @property
    def places(self) -> list[int]:
        """Main layer after which hint k is added."""
        step = round(MAIN_LAYERS / self.n_layers)
        return [k * step for k in range(self.n_layers)]

    @property
    def inpaint(self) -> bool:
        return self.in_channels > LATENT_CHANNELS

    @property
    def dim(self) -> int:
        return self.block.dim

    @property
    def name(self) -> str:
        kind = {"plain": "v1", "control": "2.1", "layers": "2.0"}[self.refiner]
        return f"Fun ControlNet Union {kind}, {self.n_layers} layers, {self.in_channels} input channels"

    @classmethod
    def from_weights(cls, shape, keys: list[str], broken: bool) -> ControlNetConfig:
        def count(prefix: str) -> int:
            idx = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
            return max(idx) + 1 if idx else 0

        dim, patch_dim = shape(ANCHOR)
        in_ch = 33 if patch_dim % 33 == 0 else LATENT_CHANNELS
        control_refiner = "control_noise_refiner.0.after_proj.weight" in keys
        block = ZImageConfig(dim=dim, head_dim=shape("control_layers.0.attention.q_norm.weight")[0],
                             ffn_hidden=shape("control_layers.0.feed_forward.w1.weight")[0],
                             adaln_dim=shape("control_layers.0.adaLN_modulation.0.weight")[1])
        return cls(
            block=block,
            in_channels=in_ch,
            patch_size=math.isqrt(patch_dim // in_ch),
            n_layers=count("control_layers."),
            n_refiner=count("control_noise_refiner."),
            refiner="plain" if not control_refiner else ("layers" if broken else "control"),
        )


class ControlBlock(Block):
    """A main block plus zero-initialised projections: in (first block only) and out (the hint)."""

    def __init__(self, cfg: ZImageConfig, first: bool, device=None):
        super().__init__(cfg, True, device)
        self.before_proj = Linear(cfg.dim, cfg.dim, device=device) if first else None
        self.after_proj = Linear(cfg.dim, cfg.dim, device=device)

    def forward(self, c, x, rope, mask, temb):
        if self.before_proj is not None:
            c = self.before_proj(c) + x
        c = super().forward(c, rope, mask, temb)
        return self.after_proj(c), c


class ZImageControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig, device=None):
        super().__init__()
        self.cfg = cfg
        bc = cfg.block
        self.control_all_x_embedder = nn.ModuleDict(
            {"2-1": Linear(cfg.patch_size**2 * cfg.in_channels, cfg.dim, device=device)}
        )
        self.control_layers = nn.ModuleList([ControlBlock(bc, i == 0, device) for i in range(cfg.n_layers)])
        if cfg.refiner == "plain":
            self.control_noise_refiner = nn.ModuleList([Block(bc, True, device) for _ in range(cfg.n_refiner)])
        elif cfg.refiner == "control":
            self.control_noise_refiner = nn.ModuleList([ControlBlock(bc, i == 0, device) for i in range(cfg.n_refiner)])
        self.executor: Executor = PLAIN  # the offload streamer's while it is attached (blocks.py, offload.py)

    def blocks(self) -> list[nn.Module]:
        """Every block, in the order a forward first runs it (what the offload streamer plans and prefetches)."""
        return [*getattr(self, "control_noise_refiner", ()), *self.control_layers]

    def refiner_chain(self) -> Sequence[ControlBlock]:
        """Control blocks run alongside the main noise refiner (2.x); their first hints go after its blocks."""
        if self.cfg.refiner == "plain":
            return []
        return self.control_layers if self.cfg.refiner == "layers" else self.control_noise_refiner


@dataclass
class Control:
    """One control model applied to a generation: ``latent`` B×C×h×w in model space (C = the model's input
    channels; or a function (h, w) → that, asked once per latent size), ``strength`` scales every hint, active
    between ``start`` and ``end`` (ComfyUI's percents of the schedule, see ``schedule.percent_to_sigma``).
    ``caption_in_stream=False`` runs the control blocks on the image tokens alone, as ComfyUI's native node does."""

    model: ZImageControlNet
    latent: torch.Tensor | Callable[[int, int], torch.Tensor]
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    caption_in_stream: bool = True

    def latent_for(self, height: int, width: int) -> torch.Tensor:
        if not callable(self.latent):
            return self.latent
        cached = self.__dict__.get("_cache")
        if cached is None or cached.shape[-2:] != (height, width):
            self._cache = cached = self.latent(height, width)
        return cached

    def active(self, t: torch.Tensor, shift: float) -> bool:
        sigma = 1.0 - float(torch.as_tensor(t).reshape(-1)[0])
        return (self.strength != 0
                and percent_to_sigma(self.end, shift) - 1e-6 <= sigma <= percent_to_sigma(self.start, shift) + 1e-6)


class ControlRun:
    """The control branch during one transformer forward, as a block ``after`` hook (blocks.py). At the first
    noise-refiner block it embeds the control tokens; after noise-refiner block i it adds the refiner hint i
    (2.x); at the first main layer it starts the control stream from the main sequence's input; after main
    layer ``places[k]`` it adds hint k. Each hint is computed just before it is added, so only the running
    control state is kept. Control blocks run through the control model's executor: resident, or streamed by its
    own offload streamer in the model's block order (offload.py ``plan_with_sides``)."""

    def __init__(self, control: Control, transformer, latent: torch.Tensor):
        self.c, self.m, self.strength, self.latent = control, control.model, control.strength, latent
        if self.m.cfg.patch_size != transformer.cfg.patch_size or self.m.cfg.dim != transformer.cfg.dim:
            raise ZImageError(f"the control model ({self.m.cfg.name}, width {self.m.cfg.dim}) does not fit this "
                              f"transformer (width {transformer.cfg.dim}).")
        self.t = transformer
        self.chain = list(self.m.refiner_chain())
        self.done = 0  # blocks of the refiner chain already run
        self.places = {p: k for k, p in enumerate(self.m.cfg.places)}
        self.next = 0  # next control layer

    def __call__(self, call: BlockCall, x: torch.Tensor) -> torch.Tensor:
        if call.stage == "noise_refiner":
            if call.index == 0:
                self._start(call)
            return self._after_refiner(call.index, x)
        if call.stage == "layers":
            if call.index == 0:
                self._layers_start(call)
            return self._after_layer(call.index, x)
        return x

    def _tokens(self, call: BlockCall) -> torch.Tensor:
        """Control tokens laid out as the image run: patches embedded, pads = the transformer's x_pad_token."""
        b = call.x.shape[0]
        lat = self.latent
        if b % lat.shape[0] or lat.shape[1] != self.m.cfg.in_channels:
            raise ZImageError(f"control input of shape {list(lat.shape)} for a batch of {b}; the control "
                              f"model takes {self.m.cfg.in_channels} channels")
        emb = self.m.control_all_x_embedder["2-1"]
        state = call.x.new_zeros(call.x.shape)
        for i, sp in enumerate(call.spans):
            li = lat[i % lat.shape[0]].to(device=call.x.device, dtype=call.x.dtype)  # CFG batches repeat the latents
            tok = emb(self.t.patchify(li))
            if len(tok) != sp["image"].stop - sp["image"].start:
                raise ZImageError(f"the control latent is {li.shape[-1] * 8}×{li.shape[-2] * 8} px but the image has "
                                  f"another size; encode the control image at the output size")
            state[i, : len(tok)] = tok
            n = pad_to_multiple(len(tok))
            state[i, len(tok) : n] = self.t.x_pad_token.to(tok.dtype)
        return state

    # -- noise refiner (2.x) --------------------------------------------------------------------
    def _start(self, call: BlockCall) -> None:
        """A forward begins (hooks are reused by every pass of one step: the state restarts here)."""
        self.done = self.next = 0
        self.m.executor.begin(self.m.blocks())
        self.x0, self.rope, self.mask, self.temb = call.x, call.rope, call.mask, call.temb
        self.img_len = call.x.shape[1]
        self.state = self._tokens(call)

    def _run(self, block, *args):
        return self.m.executor.run(block, block, *args)

    def _refine_one(self) -> torch.Tensor:
        skip, self.state = self._run(self.chain[self.done], self.state, self.x0, self.rope, self.mask, self.temb)
        self.done += 1
        return skip

    def _after_refiner(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if i >= min(self.m.cfg.n_refiner, len(self.chain)):
            return h
        while self.done <= i:
            skip = self._refine_one()
        return h + skip * self.strength

    # -- main layers ----------------------------------------------------------------------------
    def _layers_start(self, call: BlockCall) -> None:
        if self.m.cfg.refiner == "plain":
            for blk in self.m.control_noise_refiner:
                self.state = self._run(blk, self.state, self.rope, self.mask, self.temb)
        while self.done < len(self.chain):
            self._refine_one()
        if self.c.caption_in_stream:  # [control tokens | caption tokens], as the main sequence [image | caption]
            u = call.x.clone()
            for i, sp in enumerate(call.spans):
                n = sp["caption"].start
                u[i, :n] = self.state[i, :n]
            self.state, self.x0, self.rope, self.mask = u, call.x, call.rope, call.mask
        else:  # image tokens only (ComfyUI's native path); the image run leads each sample's sequence
            if self.mask is not None:
                raise ZImageError("caption_in_stream=False needs images of one size in a batch")
            self.x0 = call.x[:, : self.img_len]

    def _after_layer(self, i: int, u: torch.Tensor) -> torch.Tensor:
        k = self.places.get(i)
        if k is None:
            return u
        while self.next <= k:
            skip, self.state = self._run(self.m.control_layers[self.next], self.state, self.x0 if self.next == 0 else None,
                                         self.rope, self.mask, self.temb)
            self.next += 1
        if self.c.caption_in_stream:
            return u + skip * self.strength
        u = u.clone()
        u[:, : self.img_len] += skip * self.strength
        return u


def control_models(controls) -> list[ZImageControlNet]:
    """The distinct control models of ``controls`` (one model may serve several), in order: what offloading plans."""
    return list({id(c.model): c.model for c in controls}.values())


def control_hooks(controls, transformer, t, size: tuple[int, int], shift: float = 3.0) -> list[ControlRun]:
    """Block hooks for one forward at model time ``t`` on latents of ``size`` (h, w): the controls active at that
    time (strength 0 and controls outside their range add nothing and cost nothing)."""
    return [ControlRun(c, transformer, c.latent_for(*size)) for c in controls if c.active(t, shift)]


# ---- loading ----------------------------------------------------------------------------------
def _is_zero(files, key: str) -> bool:
    return key in files and torch.count_nonzero(files.get(key).float()) == 0


def control_plan(files) -> tuple[dict[str, Source], list[str], str]:
    """Internal name → Source; unexpected keys; prefix. Accepts VideoX-Fun's names (split to_q/to_k/to_v,
    ``to_out.0``, ``norm_q``) and ComfyUI's converted ones (fused ``qkv``, ``out``, ``q_norm``)."""
    keys = files.keys()
    prefix = strip_prefix(keys, WRAPPER_PREFIXES, ANCHOR)
    layout = "diffusers" if any(".attention.to_q." in k for k in keys) else "comfyui"
    return (*weight_plan(files, prefix, layout), prefix)


def load_controlnet(path: str, dtype: torch.dtype = torch.bfloat16, device="cpu",
                    storage_dtype: torch.dtype | None = None) -> ZImageControlNet:
    """Load any published Fun ControlNet Union file (config from its weights). fp8 files stay fp8 in memory."""
    files = open_weights(path)
    keys = files.keys()
    if not any(k.endswith(ANCHOR) for k in keys):
        kind = describe(keys, files.shape)
        hint = " (a Z-Image ControlNet has control_all_x_embedder / control_layers tensors)"
        if any("controlnet_blocks." in k or "control_model." in k or "input_hint_block" in k for k in keys):
            kind = "ControlNet for another model family"
        raise ZImageError(f"{files.path} is not a Z-Image Fun ControlNet: it looks like a {kind}{hint}. "
                          "Use Z-Image-Turbo-Fun-Controlnet-Union*.safetensors from alibaba-pai.")
    plan, unexpected, prefix = control_plan(files)
    # 2.0 shipped an untrained control refiner (zero-initialised projections): run the control layers in its
    # place, as it was trained (VideoX-Fun add_control_noise_refiner_correctly=False; ComfyUI 'broken').
    broken = any(_is_zero(files, prefix + f"control_noise_refiner.0.{p}.weight") for p in ("after_proj", "before_proj"))
    try:
        cfg = ControlNetConfig.from_weights(internal_shape_fn(files, plan), list(plan), broken)
    except (KeyError, ValueError, ZeroDivisionError) as e:
        raise ZImageError(f"{files.path}: cannot read the control model's sizes from its weights ({e}); the file "
                          "is incomplete.") from None
    with torch.device("meta"):
        model = ZImageControlNet(cfg)
    names = dict(model.named_parameters())
    if cfg.refiner == "layers":
        plan = {k: v for k, v in plan.items() if not k.startswith("control_noise_refiner.")}
    extra = unexpected + [plan[k].keys[0] for k in plan if k not in names]
    if extra:
        raise ZImageError(f"{files.path}: {len(extra)} tensor(s) do not belong to a Z-Image Fun ControlNet, e.g. "
                          f"{', '.join(sorted(extra)[:4])}.")
    fill_module(model, files, plan, compute_dtype=dtype, storage_dtype=storage_dtype, device=device,
                formats=layer_formats(files), what="Z-Image Fun ControlNet")
    model.source_path = files.path
    return model.eval()


# ---- preparing the control input ------------------------------------------------------------------
@dataclass
class ControlImage:
    """What a user gives for one control model: a (preprocessed) control image and, for 33-channel models, an
    image to inpaint with its mask (white/1 = regenerate). Images B×3×H×W in [0, 1] at the output size."""

    model: ZImageControlNet
    image: torch.Tensor | None = None
    strength: float = 1.0
    inpaint_image: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # B×1×H×W pixels
    start: float = 0.0
    end: float = 1.0


def prepare_control(spec: ControlImage, encode: Callable[[torch.Tensor], torch.Tensor]) -> Control:
    """Encode the images (``encode``: B×3×H×W pixels in [0, 1] → model-space latents) into the model's input, as
    VideoX-Fun's ZImageControlPipeline / diffusers' ZImageControlNetInpaintPipeline do: the mask binarised at
    0.5, the inpaint image mid-gray where it is 1, the keep mask 1 − mask at latent size (nearest)."""
    cfg = spec.model.cfg
    if spec.image is None and (spec.inpaint_image is None or not cfg.inpaint):
        raise ZImageError(f"{cfg.name} needs a control image" + (" or an image to inpaint" if cfg.inpaint else ""))
    control = encode(spec.image) if spec.image is not None else None
    inpaint = mask = None
    if cfg.inpaint and spec.inpaint_image is not None:
        px = spec.inpaint_image  # no mask: everything is regenerated (the reference's default mask is all white)
        m = torch.ones_like(px[:, :1]) if spec.mask is None else (spec.mask.to(px) >= 0.5).to(px)
        inpaint = encode(blank_masked(px, m))
        mask = nn.functional.interpolate(m, size=inpaint.shape[-2:], mode="nearest")
    elif spec.inpaint_image is not None or spec.mask is not None:
        raise ZImageError(f"{cfg.name} has no inpainting input; use a 2.x Union model (33 input channels) to inpaint.")
    return Control(spec.model, control_input(cfg, control, inpaint, mask), spec.strength, spec.start, spec.end)


def control_input(cfg: ControlNetConfig, control: torch.Tensor | None, inpaint: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's input channels from model-space latents: [control latent, keep mask, inpaint latent] for
    33-channel models, the control latent alone for 16. ``mask`` B×1×h×w (1 = regenerate); missing parts are zeros
    (no mask: nothing is kept)."""
    ref = control if control is not None else inpaint
    if ref is None:
        raise ZImageError("a control image or an inpaint image is needed")
    zeros = torch.zeros_like(ref)
    control = zeros if control is None else control
    if not cfg.inpaint:
        return control
    keep = torch.zeros_like(ref[:, :1]) if mask is None else 1.0 - mask.to(ref)
    return torch.cat([control, keep, zeros if inpaint is None else inpaint], dim=1)


def blank_masked(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Image in [0, 1] (B×3×H×W) with the area to repaint (mask ≥ 0.5, B×1×H×W) set to mid-gray (0 in VAE input)."""
    keep = (mask < 0.5).to(image)
    return (image - 0.5) * keep + 0.5
