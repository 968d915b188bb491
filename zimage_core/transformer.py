"""The Z-Image S3-DiT: a single-stream diffusion transformer over [image tokens, caption tokens].

Names follow the ComfyUI single-file layout (fused ``attention.qkv``, ``x_embedder``, ``final_layer``),
so that file loads without renaming; the diffusers layout is mapped in ``transformer_files.py``. Every size is
read from the weights (``ZImageConfig.from_weights``), so Turbo, Base, fine-tunes and tiny test
models are the same code.

Sequence (per sample): image patches padded to a multiple of 32 with ``x_pad_token``, then caption
tokens padded the same way with ``cap_pad_token``. Pads are attended to (they change the output);
only the padding between samples of different lengths is masked. Position ids: caption token k →
(k+1, 0, 0) (its pads included), image token (h, w) → (padded caption length + 1, h, w), image
pads → (0, 0, 0). Packing the runs into a batch: packing.py; running blocks: blocks.py.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .blocks import PLAIN, BlockCall, BlockRun, Executor
from .cuda_graphs import CudaGraphs
from .layers import Linear, RMSNorm, SwiGLU
from .omni import omni_tokens
from .packing import Packed, Tokens, grid_ids, join, pack, pad_to_multiple
from .precision import post_norm, sublayer_scale
from .qk_norm_rope import qk_norm_rope

if TYPE_CHECKING:
    from .lora import LoraPatcher


@dataclass
class ZImageConfig:
    dim: int = 3840
    n_layers: int = 30
    n_noise_refiner: int = 2
    n_context_refiner: int = 2
    head_dim: int = 128
    ffn_hidden: int = 10240
    cap_feat_dim: int = 2560
    in_channels: int = 16
    patch_size: int = 2
    adaln_dim: int = 256
    t_hidden: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, int, int] = (32, 48, 48)
    siglip_feat_dim: int | None = None
    n_siglip_refiner: int = 0

    @property
    def n_heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @staticmethod
    def axes_for_head_dim(head_dim: int) -> tuple[int, int, int]:
        """Z-Image splits each head as 1/4 (sequence axis) + 3/8 (height) + 3/8 (width): 128 → 32/48/48."""
        a = head_dim // 4
        if a % 2 or (head_dim - a) % 4:
            raise ValueError(f"head dim {head_dim} cannot be split into Z-Image's three RoPE axes")
        return (a, (head_dim - a) // 2, (head_dim - a) // 2)

    @classmethod
    def from_weights(cls, shape: Callable[[str], tuple[int, ...]], keys: list[str]) -> ZImageConfig:
        """Sizes from internal-layout key names and shapes (no config file needed)."""

        def count(prefix: str) -> int:
            idx = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
            return max(idx) + 1 if idx else 0

        dim, cap_dim = shape("cap_embedder.1.weight")
        head_dim = shape("layers.0.attention.q_norm.weight")[0]
        patch_dim = shape("x_embedder.weight")[1]
        out_dim = shape("final_layer.linear.weight")[0]
        in_ch = 16 if patch_dim % 16 == 0 and patch_dim // 16 in (1, 4, 9, 16) else patch_dim
        patch = int(math.isqrt(patch_dim // in_ch))
        if out_dim != patch_dim:
            raise ValueError(f"x_embedder takes {patch_dim} values per patch but final_layer returns {out_dim}")
        sig = "siglip_embedder.1.weight"
        return cls(
            dim=dim,
            n_layers=count("layers."),
            n_noise_refiner=count("noise_refiner."),
            n_context_refiner=count("context_refiner."),
            head_dim=head_dim,
            ffn_hidden=shape("layers.0.feed_forward.w1.weight")[0],
            cap_feat_dim=cap_dim,
            in_channels=in_ch,
            patch_size=patch,
            adaln_dim=shape("t_embedder.mlp.2.weight")[0],
            t_hidden=shape("t_embedder.mlp.0.weight")[0],
            axes_dims=cls.axes_for_head_dim(head_dim),
            siglip_feat_dim=shape(sig)[1] if sig in keys else None,
            n_siglip_refiner=count("siglip_refiner."),
        )


class Attention(nn.Module):
    token_gemms = ("qkv", "out")  # what quantized compute may run (layers.set_quant_matmul)

    def __init__(self, dim: int, head_dim: int, eps: float, device=None):
        super().__init__()
        self.n_heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = Linear(dim, 3 * dim, bias=False, device=device)
        self.out = Linear(dim, dim, bias=False, device=device)
        self.q_norm = RMSNorm(head_dim, eps, device=device)
        self.k_norm = RMSNorm(head_dim, eps, device=device)
        self.backend = "sdpa"

    def forward(self, x, rope, mask, scale: float = 1.0):
        """``scale`` multiplies the output projection's input (fp16 headroom, see precision.py)."""
        b, s, _ = x.shape
        # norm and rotate per token in the B×S×H×D layout the fused projection gives (no strided copies; one
        # kernel on a GPU, see qk_norm_rope.py), then hand SDPA its B×H×S×D views
        qkv = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim)
        q, k = qk_norm_rope(qkv, self.q_norm, self.k_norm, rope)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2), mask, self.backend)
        o = o.transpose(1, 2).reshape(b, s, -1)
        return self.out(o if scale == 1.0 else o * scale)


class Block(nn.Module):
    """Pre/post-RMSNorm attention + SwiGLU; with ``modulated`` the time embedding scales and (tanh-)gates both."""

    def __init__(self, cfg: ZImageConfig, modulated: bool, device=None):
        super().__init__()
        d, eps = cfg.dim, cfg.norm_eps
        self.attention = Attention(d, cfg.head_dim, 1e-5, device=device)
        self.feed_forward = SwiGLU(d, cfg.ffn_hidden, device=device)
        self.attention_norm1 = RMSNorm(d, eps, device=device)
        self.attention_norm2 = RMSNorm(d, eps, device=device)
        self.ffn_norm1 = RMSNorm(d, eps, device=device)
        self.ffn_norm2 = RMSNorm(d, eps, device=device)
        self.modulated = modulated
        if modulated:
            self.adaLN_modulation = nn.ModuleList([Linear(cfg.adaln_dim, 4 * d, device=device)])

    def modulation(self, temb):
        """temb B×256 → (scale_msa, gate_msa, scale_mlp, gate_mlp), B×1×dim. Per-token time (Omni) comes as
        (t_noisy, t_clean, noisy B×S): both modulations are computed and picked per token."""
        if isinstance(temb, tuple):
            noisy, clean, mask = temb
            m = mask[..., None]
            return tuple(torch.where(m, a, b) for a, b in zip(self.modulation(noisy), self.modulation(clean)))
        mod = self.adaLN_modulation[0](temb)[:, None]
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)
        return 1.0 + scale_msa, gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()

    def forward(self, x, rope, mask, temb=None):
        s = sublayer_scale(x.dtype)  # fp16: sublayer outputs computed 2^-6 smaller, renormalised exactly
        if self.modulated:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation(temb)
            attn = self.attention(self.attention_norm1(x).mul_(scale_msa), rope, mask, s)
            x = torch.addcmul(x, gate_msa, post_norm(self.attention_norm2, attn, s))
            ffn = self.feed_forward(self.ffn_norm1(x).mul_(scale_mlp), s)
            return torch.addcmul(x, gate_mlp, post_norm(self.ffn_norm2, ffn, s))
        x = x + post_norm(self.attention_norm2, self.attention(self.attention_norm1(x), rope, mask, s), s)
        return x + post_norm(self.ffn_norm2, self.feed_forward(self.ffn_norm1(x), s), s)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: ZImageConfig, device=None):
        super().__init__()
        self.freq_dim = 256
        self.mlp = nn.Sequential(
            Linear(self.freq_dim, cfg.t_hidden, device=device), nn.SiLU(), Linear(cfg.t_hidden, cfg.adaln_dim, device=device)
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Sinusoid (cos first, then sin; max period 10000) computed in fp32, then the MLP in ``dtype``."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[..., None] * freqs
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: ZImageConfig, device=None):
        super().__init__()
        self.linear = Linear(cfg.dim, cfg.patch_dim, device=device)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(cfg.adaln_dim, cfg.dim, device=device))

    def forward(self, x, temb):
        if isinstance(temb, tuple):  # per-token time (Omni): pick the noisy or clean scale per token
            noisy, clean, mask = temb
            scale = torch.where(mask[..., None], 1.0 + self.adaLN_modulation(noisy)[:, None], 1.0 + self.adaLN_modulation(clean)[:, None])
        else:
            scale = 1.0 + self.adaLN_modulation(temb)[:, None]
        return self.linear(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * scale)


class ZImageTransformer(nn.Module):
    """Two explicit paths over one skeleton (refiners → unified layers → final layer):

    * ``model(x, t, captions)``: x B×C×H×W (or a list of C×Hᵢ×Wᵢ), t B model times in [0, 1] (0 = pure
      noise), captions a list of Lᵢ×cap_dim tensors. Returns the raw prediction (x0 − noise), same shape
      (or list) as x, in the compute dtype.
    * ``model.forward_omni(...)``: Omni/Edit conditioning (reference images, caption segments, SigLIP; see omni.py).

    Both take ``run``, the per-call block hooks (blocks.py); where blocks run is ``self.executor``'s business.
    """

    def __init__(self, cfg: ZImageConfig, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.cfg, self.compute_dtype = cfg, dtype
        d = cfg.dim
        self.x_embedder = Linear(cfg.patch_dim, d, device=device)
        self.t_embedder = TimestepEmbedder(cfg, device=device)
        self.cap_embedder = nn.Sequential(
            RMSNorm(cfg.cap_feat_dim, cfg.norm_eps, device=device), Linear(cfg.cap_feat_dim, d, device=device)
        )
        self.x_pad_token = nn.Parameter(torch.empty(1, d, device=device), requires_grad=False)
        self.cap_pad_token = nn.Parameter(torch.empty(1, d, device=device), requires_grad=False)
        self.noise_refiner = nn.ModuleList([Block(cfg, True, device) for _ in range(cfg.n_noise_refiner)])
        self.context_refiner = nn.ModuleList([Block(cfg, False, device) for _ in range(cfg.n_context_refiner)])
        self.layers = nn.ModuleList([Block(cfg, True, device) for _ in range(cfg.n_layers)])
        self.final_layer = FinalLayer(cfg, device=device)
        self.siglip_embedder = self.siglip_refiner = self.siglip_pad_token = None
        if cfg.siglip_feat_dim:
            self.siglip_embedder = nn.Sequential(
                RMSNorm(cfg.siglip_feat_dim, cfg.norm_eps, device=device), Linear(cfg.siglip_feat_dim, d, device=device)
            )
            self.siglip_refiner = nn.ModuleList([Block(cfg, False, device) for _ in range(cfg.n_siglip_refiner)])
            self.siglip_pad_token = nn.Parameter(torch.empty(1, d, device=device), requires_grad=False)
        self.executor: Executor = PLAIN  # owned by the offload streamer while it is attached (blocks.py)
        self.lora_patcher: LoraPatcher | None = None  # created by LoraPatcher.of on the first LoRA
        self.source_path: str | None = None  # set by the loader: the file or folder the weights came from
        self.source_layout: str | None = None  # "comfyui" or "diffusers"
        self.cuda_graphs = CudaGraphs(self)  # off unless use_cuda_graphs() or a call's run.cuda_graphs asks

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where compute runs: the executor's device, else where the weights are."""
        return self.executor.device or self.x_pad_token.device

    def blocks(self) -> list[Block]:
        """All transformer blocks in execution order (what offloading streams)."""
        return [*self.noise_refiner, *self.context_refiner, *(self.siglip_refiner or ()), *self.layers]

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` every block in place (names, weights and streaming unchanged); each new shape compiles once."""
        for blk in self.blocks():
            blk.compile(**options)

    def set_attention_backend(self, name: str) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = name

    def patchify(self, img: torch.Tensor) -> torch.Tensor:
        """C×H×W → (H/p·W/p)×(p·p·C), row-major over the token grid, channels fastest within a patch."""
        c, h, w = img.shape
        p = self.cfg.patch_size
        return img.view(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape((h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.cfg.patch_size, self.cfg.in_channels
        return tokens.view(h // p, w // p, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, h, w)

    @staticmethod
    def padded(tok: torch.Tensor, ids: torch.Tensor, pad_token: torch.Tensor, pad_ids: bool = True):
        """A run padded to a multiple of 32 with ``pad_token``; pad ids (0, 0, 0) unless ``pad_ids`` is False."""
        pad = pad_to_multiple(len(tok)) - len(tok)
        if not pad:
            return tok, ids
        tok = torch.cat([tok, pad_token.to(tok.dtype).expand(pad, -1)])
        return tok, torch.cat([ids, ids.new_zeros(pad, 3)]) if pad_ids else ids

    def image_tokens(self, img: torch.Tensor, pos0: int):
        """Embedded, padded image tokens and their ids (pos0, h, w); pads get the learned token and (0, 0, 0)."""
        p = self.cfg.patch_size
        _, h, w = img.shape
        ids = grid_ids(h // p, w // p, pos0)
        tok, ids = self.padded(self.x_embedder(self.patchify(img)), ids, self.x_pad_token)
        return tok, ids, (h // p) * (w // p)

    def caption_tokens(self, cap: torch.Tensor, pos0: int = 1):
        """Embedded, padded caption tokens; every slot (pads included) gets id (pos0 + k, 0, 0)."""
        tok = self.cap_embedder(cap)
        total = pad_to_multiple(len(cap))
        ids = torch.zeros(total, 3, dtype=torch.long)
        ids[:, 0] = torch.arange(pos0, pos0 + total)
        return self.padded(tok, ids, self.cap_pad_token, pad_ids=False)

    def time_embedding(self, t, n: int, value: float | None = None) -> torch.Tensor:
        """n×adaln_dim embedding of model time ``t`` (scalar or n values; ``value`` overrides it, e.g. 1 = clean)."""
        t = torch.as_tensor(t, device=self.device).float().reshape(-1).expand(n)
        if value is not None:
            t = torch.full_like(t, value)
        return self.t_embedder(t * self.cfg.t_scale, self.compute_dtype)

    def use_cuda_graphs(self, on: bool = True) -> None:
        """By default, replay the plain forward as CUDA graphs where it can (resident on an NVIDIA GPU, no block hooks;
        see cuda_graphs.py); elsewhere, and with ``on`` False, it runs eagerly. A call's ``run.cuda_graphs`` overrides
        the default (ComfyUI: per MODEL, from the loader's option)."""
        self.cuda_graphs.enabled = on
        if not on:
            self.cuda_graphs.drop()

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x, t, captions, run: BlockRun | None = None):
        """The plain path (text-to-image): per sample [image tokens | caption tokens]. Replayed as a CUDA graph
        where ``use_cuda_graphs`` (or ``run.cuda_graphs``) asks for it and the call allows it, else eager."""
        g = self.cuda_graphs
        if (g.enabled if run is None or run.cuda_graphs is None else run.cuda_graphs) and g.applies(x, captions, run):
            return g(x, t, captions, run)
        return self.forward_eager(x, t, captions, run)

    def forward_eager(self, x, t, captions, run: BlockRun | None = None):
        dtype, dev = self.compute_dtype, self.device
        images = list(x) if isinstance(x, (list, tuple)) else list(x.unbind(0))
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} latents but {len(captions)} captions")
        if images and isinstance(images[0], (list, tuple)):
            raise ValueError("nested lists of latents are Omni inputs; call forward_omni")
        images = [img.to(device=dev, dtype=dtype) for img in images]
        temb = self.time_embedding(t, len(images))
        caps = [self.caption_tokens(c.to(device=dev, dtype=dtype)) for c in captions]
        imgs = [self.image_tokens(img, len(ci) + 1) for img, (_, ci) in zip(images, caps)]
        out = self.backbone(
            {"image": Tokens([a for a, _, _ in imgs], [b for _, b, _ in imgs]),
             "caption": Tokens([a for a, _ in caps], [b for _, b in caps])},
            ("image", "caption"), temb, [(0, n, img.shape[1], img.shape[2]) for (_, _, n), img in zip(imgs, images)], run,
        )
        return out if isinstance(x, (list, tuple)) else torch.stack(out)

    def forward_omni(self, x, t, captions, siglip=None, image_noise_mask=None, run: BlockRun | None = None):
        """The Omni/Edit path: ``x`` per sample a list of latents (references…, target), ``captions`` per sample a
        list of caption segments, ``siglip`` per sample a list of H×W×C features (or None), ``image_noise_mask``
        per sample 1 (noisy) / 0 (clean) per image. Returns the target predictions (a list). See omni.py."""
        runs, targets = omni_tokens(self, x, captions, siglip, image_noise_mask)
        temb = (self.time_embedding(t, len(x)), self.time_embedding(t, len(x), 1.0))
        return self.backbone(runs, ("caption", "image", "siglip") if "siglip" in runs else ("caption", "image"),
                             temb, targets, run)

    def backbone(self, runs: dict[str, Tokens], order: tuple[str, ...], temb, targets, run: BlockRun | None):
        """The skeleton both paths share. ``runs``: image, caption (and siglip) tokens per sample; ``order``: their
        order in the unified sequence; ``temb``: the time embedding, or (noisy, clean) for per-token time;
        ``targets``: per sample (offset in its image run, tokens, H, W) of the image to predict."""
        run = run or BlockRun()
        stages = {"image": "noise_refiner", "caption": "context_refiner", "siglip": "siglip_refiner"}
        self.executor.begin([b for kind in runs for b in getattr(self, stages[kind])] + list(self.layers))
        refined = {}
        for kind, tok in runs.items():
            p = pack(tok, self.cfg.axes_dims, self.cfg.rope_theta)
            spans = [{"image": slice(o, o + n)} if kind == "image" else {"caption": slice(0, m)} if kind == "caption" else {}
                     for (o, n, _, _), m in zip(targets, p.lengths)]
            h = self._stage(stages[kind], p, temb if kind == "image" else None, run, spans)
            refined[kind] = Tokens(p.unpack(h), tok.ids, tok.noisy)
        spans = []
        for i, (o, n, _, _) in enumerate(targets):
            starts = dict(zip(order, [0, *itertools.accumulate(len(refined[k].x[i]) for k in order)]))
            spans.append({"image": slice(starts["image"] + o, starts["image"] + o + n),
                          "caption": slice(starts["caption"], starts["caption"] + len(refined["caption"].x[i]))})
        pu = pack(join([refined[k] for k in order]), self.cfg.axes_dims, self.cfg.rope_theta)
        mod = self._modulation(temb, pu)
        u = self.final_layer(self._stage("layers", pu, temb, run, spans), mod)
        return [self.unpatchify(u[i, s["image"]], hh, ww) for i, (s, (_, _, hh, ww)) in enumerate(zip(spans, targets))]

    @staticmethod
    def _modulation(temb, p: Packed):
        return temb if p.noisy is None else (*temb, p.noisy)

    def _stage(self, name: str, p: Packed, temb, run: BlockRun, spans) -> torch.Tensor:
        mod = None if temb is None else self._modulation(temb, p)
        x = p.x
        for i, blk in enumerate(getattr(self, name)):
            x = run(self.executor, BlockCall(name, i, blk, x, p.rope, p.mask, mod, spans))
        return x
