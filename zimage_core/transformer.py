"""The Z-Image S3-DiT: a single-stream diffusion transformer over [image tokens, caption tokens].

Names follow the ComfyUI single-file layout (fused ``attention.qkv``, ``x_embedder``, ``final_layer``),
so that file loads without renaming; the diffusers layout is mapped in ``layouts.py``. Every size is
read from the weights (``ZImageConfig.from_weights``), so Turbo, Base, fine-tunes and tiny test
models are the same code.

Sequence (per sample): image patches padded to a multiple of 32 with ``x_pad_token``, then caption
tokens padded the same way with ``cap_pad_token``. Pads are attended to (they change the output);
only the padding between samples of different lengths is masked. Position ids: caption token k →
(k+1, 0, 0) (its pads included), image token (h, w) → (padded caption length + 1, h, w), image
pads → (0, 0, 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import apply_rope, attention, rope_angles, rope_freqs
from .layers import Linear, RMSNorm, SwiGLU

SEQ_MULTIPLE = 32


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
    def __init__(self, dim: int, head_dim: int, eps: float, device=None):
        super().__init__()
        self.n_heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = Linear(dim, 3 * dim, bias=False, device=device)
        self.out = Linear(dim, dim, bias=False, device=device)
        self.q_norm = RMSNorm(head_dim, eps, device=device)
        self.k_norm = RMSNorm(head_dim, eps, device=device)
        self.backend = "sdpa"

    def forward(self, x, rope, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).transpose(1, 3).unbind(2)
        q = apply_rope(self.q_norm(q), rope)
        k = apply_rope(self.k_norm(k), rope)
        o = attention(q, k, v, mask, self.backend)
        return self.out(o.transpose(1, 2).reshape(b, s, -1))


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
        if self.modulated:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation(temb)
            x = torch.addcmul(x, gate_msa, self.attention_norm2(self.attention(self.attention_norm1(x) * scale_msa, rope, mask)))
            return torch.addcmul(x, gate_mlp, self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp)))
        x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


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


@dataclass
class Packed:
    """Sequences of different lengths stacked into one B×S×D batch, with their rope and key mask."""

    x: torch.Tensor
    rope: torch.Tensor
    mask: torch.Tensor | None
    lengths: list[int]

    def unpack(self, x: torch.Tensor | None = None) -> list[torch.Tensor]:
        x = self.x if x is None else x
        return [x[i, :n] for i, n in enumerate(self.lengths)]


def pack(seqs: list[torch.Tensor], ids: list[torch.Tensor], axes_dims, theta: float, extra: list | None = None) -> Packed:
    """Stack per-sample token sequences (Lᵢ×D) and their position ids (Lᵢ×3); mask only between-sample padding."""
    lengths = [len(s) for s in seqs]
    n = max(lengths)
    same = all(length == n for length in lengths)
    if same:
        x, pid = torch.stack(seqs), torch.stack(ids)
        mask = None
    else:
        x = seqs[0].new_zeros(len(seqs), n, seqs[0].shape[-1])
        pid = ids[0].new_zeros(len(seqs), n, ids[0].shape[-1])
        mask = torch.zeros(len(seqs), n, dtype=torch.bool, device=x.device)
        for i, (s, p) in enumerate(zip(seqs, ids)):
            x[i, : len(s)], pid[i, : len(s)], mask[i, : len(s)] = s, p, True
    ang = rope_angles(pid, axes_dims, theta, torch.float64 if x.dtype == torch.float64 else torch.float32)
    rope = rope_freqs(ang)[:, None]
    return Packed(x, rope, mask, lengths)


def pad_to_multiple(n: int, m: int = SEQ_MULTIPLE) -> int:
    return n + (-n) % m


class ZImageTransformer(nn.Module):
    """Call as ``model(x, t, captions)``: x B×C×H×W (or a list of C×Hᵢ×Wᵢ), t B model times in [0, 1]
    (0 = pure noise), captions a list of Lᵢ×cap_dim tensors. Returns the raw prediction (x0 − noise),
    same shape (or list) as x, in the compute dtype."""

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
        if cfg.siglip_feat_dim:
            self.siglip_embedder = nn.Sequential(
                RMSNorm(cfg.siglip_feat_dim, cfg.norm_eps, device=device), Linear(cfg.siglip_feat_dim, d, device=device)
            )
            self.siglip_refiner = nn.ModuleList([Block(cfg, False, device) for _ in range(cfg.n_siglip_refiner)])
            self.siglip_pad_token = nn.Parameter(torch.empty(1, d, device=device), requires_grad=False)
        # The offload executor replaces this to stream blocks; it must call block(*args).
        self.run_block: Callable = lambda block, *args: block(*args)

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where compute runs: the offload executor's device while it is attached, else where the weights are."""
        return self.__dict__.get("compute_device") or self.x_pad_token.device

    def blocks(self) -> list[Block]:
        """All transformer blocks in execution order (what offloading streams)."""
        sig = list(getattr(self, "siglip_refiner", []))
        return [*self.noise_refiner, *self.context_refiner, *sig, *self.layers]

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

    def image_tokens(self, img: torch.Tensor, pos0: int):
        """Embedded, padded image tokens and their ids (pos0, h, w); pads get the learned token and (0, 0, 0)."""
        p = self.cfg.patch_size
        _, h, w = img.shape
        ht, wt = h // p, w // p
        n = ht * wt
        tok = self.x_embedder(self.patchify(img))
        grid = torch.stack(
            torch.meshgrid(torch.arange(ht, device=img.device), torch.arange(wt, device=img.device), indexing="ij"), -1
        ).reshape(n, 2)
        ids = torch.cat([torch.full((n, 1), pos0, device=img.device, dtype=grid.dtype), grid], dim=1)
        pad = pad_to_multiple(n) - n
        if pad:
            tok = torch.cat([tok, self.x_pad_token.to(tok.dtype).expand(pad, -1)])
            ids = torch.cat([ids, ids.new_zeros(pad, 3)])
        return tok, ids, n

    def caption_tokens(self, cap: torch.Tensor, pos0: int = 1):
        """Embedded, padded caption tokens; every slot (pads included) gets id (pos0 + k, 0, 0)."""
        n = len(cap)
        tok = self.cap_embedder(cap)
        total = pad_to_multiple(n)
        if total > n:
            tok = torch.cat([tok, self.cap_pad_token.to(tok.dtype).expand(total - n, -1)])
        ids = torch.zeros(total, 3, dtype=torch.long, device=cap.device)
        ids[:, 0] = torch.arange(pos0, pos0 + total, device=cap.device)
        return tok, ids

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x, t, captions, **omni):
        """Basic mode as documented above; with nested lists (per sample: reference latents…, target) and
        caption segments it runs the Omni/Edit mode (see omni.py)."""
        if omni or (isinstance(x, (list, tuple)) and isinstance(x[0], (list, tuple))):
            from .omni import omni_forward

            return omni_forward(self, x, t, captions, **omni)
        dtype, cfg = self.compute_dtype, self.cfg
        images = list(x) if isinstance(x, (list, tuple)) else list(x.unbind(0))
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} latents but {len(captions)} captions")
        dev = self.device
        images = [img.to(device=dev, dtype=dtype) for img in images]
        t = torch.as_tensor(t, device=dev).float().reshape(-1).expand(len(images))
        temb = self.t_embedder(t * cfg.t_scale, dtype)

        caps, cap_ids = zip(*(self.caption_tokens(c.to(device=dev, dtype=dtype)) for c in captions))
        xs, x_ids, n_img = zip(*(self.image_tokens(img, len(ci) + 1) for img, ci in zip(images, cap_ids)))

        px = pack(list(xs), list(x_ids), cfg.axes_dims, cfg.rope_theta)
        h = px.x
        for blk in self.noise_refiner:
            h = self.run_block(blk, h, px.rope, px.mask, temb)
        pc = pack(list(caps), list(cap_ids), cfg.axes_dims, cfg.rope_theta)
        c = pc.x
        for blk in self.context_refiner:
            c = self.run_block(blk, c, pc.rope, pc.mask)

        seqs = [torch.cat([a, b]) for a, b in zip(px.unpack(h), pc.unpack(c))]
        ids = [torch.cat([a, b]) for a, b in zip(x_ids, cap_ids)]
        pu = pack(seqs, ids, cfg.axes_dims, cfg.rope_theta)
        u = pu.x
        for blk in self.layers:
            u = self.run_block(blk, u, pu.rope, pu.mask, temb)
        u = self.final_layer(u, temb)

        out = [self.unpatchify(u[i, :n], img.shape[1], img.shape[2]) for i, (n, img) in enumerate(zip(n_img, images))]
        if isinstance(x, (list, tuple)):
            return out
        return torch.stack(out)
