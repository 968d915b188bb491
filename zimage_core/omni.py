"""Z-Image Omni / Edit conditioning: reference images as clean tokens, each with its own caption segment.

Sequence per sample: [caption segments | image tokens (references…, target) | SigLIP tokens (optional)].
Caption segment j and image j share a noise flag: references are clean (time 1), the target is noisy
(time t); every modulated block and the final layer pick the clean or noisy modulation per token.
Positions: segment j starts where the previous one ended (+2 slots for its image's VAE and SigLIP
tokens); image j sits at (end of segment j, h, w); its SigLIP grid at (end of segment j + 1, h', w')
rescaled to the image's latent size. All as diffusers' ZImageTransformer2DModel (Omni mode) and
ZImageOmniPipeline compute it, including their quirks: the SigLIP H×W×C grid is flattened through a
C×H×W view (ComfyUI does the same), and caption ids drift by the padding of earlier segments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import ZImageError
from .transformer import SEQ_MULTIPLE, pack, pad_to_multiple

TEMPLATE_HEAD = "<|im_start|>user\n<|vision_start|>"
TEMPLATE_BETWEEN = "<|vision_end|><|vision_start|>"
TEMPLATE_PROMPT = "<|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"
TEMPLATE_TAIL = "<|vision_end|><|im_end|>"


def reference_segments(n_images: int) -> list[str]:
    """The caption segments around ``n_images`` reference images that do not depend on the prompt: head, between…, tail."""
    return [TEMPLATE_HEAD] + [TEMPLATE_BETWEEN] * (n_images - 1) + [TEMPLATE_TAIL]


def assemble_segments(others: list, prompt_segment) -> list:
    """The reference's order: head, between…, the prompt's segment, tail (strings or their encodings alike)."""
    return [*others[:-1], prompt_segment, others[-1]]


def prompt_segments(prompt: str, n_images: int) -> list[str]:
    """The strings the reference encodes separately for a prompt with ``n_images`` reference images."""
    if n_images == 0:
        return ["<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n"]
    return assemble_segments(reference_segments(n_images), TEMPLATE_PROMPT.format(prompt))


def prepare_reference_image(img: Image.Image, target_area: int | None = None) -> Image.Image:
    """Shrink to ``target_area`` (default 1024²) when larger (Lanczos), then centre-crop to multiples of 16."""
    img = img.convert("RGB")
    w, h = img.size
    if w * h > 1024 * 1024:
        s = math.sqrt((target_area or 1024 * 1024) / (w * h))
        img = img.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS)
        w, h = img.size
    w16, h16 = w // 16 * 16, h // 16 * 16
    if w16 < 16 or h16 < 16:
        raise ZImageError(f"a reference image of {w}×{h} is too small; it needs at least 16 pixels per side.")
    left, top = (w - w16) // 2, (h - h16) // 2
    return img.crop((left, top, left + w16, top + h16))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


@dataclass
class Sequence:
    """One sample's tokens of one kind (captions, images or SigLIP), their position ids and noise flags."""

    tokens: torch.Tensor
    ids: torch.Tensor
    noisy: torch.Tensor  # bool per token: True = noisy (target), False = clean (reference)


def _grid(h: int, w: int, first: int, device) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([torch.full_like(yy, first), yy, xx], -1).reshape(h * w, 3)


def omni_forward(model, x, t, captions, siglip=None, image_noise_mask=None):
    """``x``: per sample a list of latents C×H×W (references…, target; None for an empty slot); ``captions``: per
    sample a list of caption segments; ``siglip``: per sample a list of H×W×C features (or None), or None;
    ``image_noise_mask``: per sample, 1 (noisy) or 0 (clean) per image. Returns the target predictions."""
    cfg, dtype = model.cfg, model.compute_dtype
    dev = model.device
    b = len(x)
    if siglip is not None and any(s is not None for s in siglip) and not cfg.siglip_feat_dim:
        raise ZImageError("SigLIP image features were given, but this model has no SigLIP embedder (it is not an Omni/Edit "
                          "model); connect no CLIP vision model, or load Z-Image-Omni/Edit weights.")
    if image_noise_mask is None:
        image_noise_mask = [[0] * (len(xi) - 1) + [1] for xi in x]
    t = torch.as_tensor(t, device=dev).float().reshape(-1).expand(b)
    t_noisy = model.t_embedder(t * cfg.t_scale, dtype)
    t_clean = model.t_embedder(torch.ones_like(t) * cfg.t_scale, dtype)
    caps, imgs, sigs, targets = [], [], [], []
    for i in range(b):
        nm = image_noise_mask[i]
        # caption segments
        tok, ids, noisy, cu, ends = [], [], [], 1, []
        for j, c in enumerate(captions[i]):
            flag = bool(nm[j]) if j < len(nm) else True
            ct, ci = model.caption_tokens(c.to(dev, dtype), pos0=cu)
            tok.append(ct), ids.append(ci), noisy.append(torch.full((len(ct),), flag, device=dev))
            cu += len(c)
            ends.append(cu)
            cu += 2
        # The reference builds each segment's ids over its padded length and then appends its pad ids once
        # more, so from the second segment on the ids drift by the earlier segments' padding. Kept exactly.
        drift = [torch.cat([ci, ci.new_zeros(len(ct) - len(c), 3)]) for ci, ct, c in zip(ids, tok, captions[i])]
        caps.append(Sequence(torch.cat(tok), torch.cat(drift)[: sum(len(a) for a in tok)], torch.cat(noisy)))
        # images (references, then the target)
        tok, ids, noisy, sizes = [], [], [], []
        for j, im in enumerate(x[i]):
            flag = bool(nm[j])
            if im is not None:
                it, ii, n = model.image_tokens(im.to(dev, dtype), ends[j])
                sizes.append((im.shape[-2], im.shape[-1], n))
            else:
                it = model.x_pad_token.to(dtype).expand(SEQ_MULTIPLE, -1)
                ii = torch.zeros(SEQ_MULTIPLE, 3, dtype=torch.long, device=dev)
                sizes.append(None)
            tok.append(it), ids.append(ii), noisy.append(torch.full((len(it),), flag, device=dev))
        imgs.append(Sequence(torch.cat(tok), torch.cat(ids), torch.cat(noisy)))
        targets.append((sizes, [len(a) for a in tok]))
        # SigLIP tokens
        if siglip is not None and siglip[i] is not None:
            tok, ids, noisy = [], [], []
            for j, s in enumerate(siglip[i]):
                flag = bool(nm[j])
                if s is not None:
                    sh, sw, sc = s.shape
                    flat = s.to(dev).permute(2, 0, 1).reshape(sh * sw, sc)  # the reference's flattening, kept exactly
                    st = model.siglip_embedder(flat.to(dtype))
                    si = _grid(sh, sw, ends[j] + 1, dev)
                    pad = pad_to_multiple(len(st)) - len(st)
                    if pad:
                        st = torch.cat([st, model.siglip_pad_token.to(dtype).expand(pad, -1)])
                        si = torch.cat([si, si.new_zeros(pad, 3)])
                    if sizes[j] is not None:
                        hx, wx = sizes[j][0], sizes[j][1]
                        si = si.float()
                        si[:, 1] = si[:, 1] / max(sh - 1, 1) * (hx - 1)
                        si[:, 2] = si[:, 2] / max(sw - 1, 1) * (wx - 1)
                        si = si.to(torch.int32).long()
                else:
                    st = model.siglip_pad_token.to(dtype).expand(SEQ_MULTIPLE, -1)
                    si = torch.zeros(SEQ_MULTIPLE, 3, dtype=torch.long, device=dev)
                tok.append(st), ids.append(si), noisy.append(torch.full((len(st),), flag, device=dev))
            sigs.append(Sequence(torch.cat(tok), torch.cat(ids), torch.cat(noisy)))
        else:
            sigs.append(None)
    use_sig = sigs[0] is not None and cfg.siglip_feat_dim
    if use_sig and any(s is None for s in sigs):
        raise ZImageError("within one batch, either every sample or none must have SigLIP features.")

    def temb(noisy_mask):
        return (t_noisy, t_clean, noisy_mask)

    # refiners: images (time-modulated per token), captions and SigLIP (no modulation)
    px = pack([s.tokens for s in imgs], [s.ids for s in imgs], cfg.axes_dims, cfg.rope_theta)
    xm = _pack_flags([s.noisy for s in imgs], px.x.shape[1])
    h = px.x
    for blk in model.noise_refiner:
        h = model.run_block(blk, h, px.rope, px.mask, temb(xm))
    pc = pack([s.tokens for s in caps], [s.ids for s in caps], cfg.axes_dims, cfg.rope_theta)
    c = pc.x
    for blk in model.context_refiner:
        c = model.run_block(blk, c, pc.rope, pc.mask)
    sig_out = None
    if use_sig:
        ps = pack([s.tokens for s in sigs], [s.ids for s in sigs], cfg.axes_dims, cfg.rope_theta)
        sgo = ps.x
        for blk in model.siglip_refiner:
            sgo = model.run_block(blk, sgo, ps.rope, ps.mask)
        sig_out = ps.unpack(sgo)

    # the unified sequence: [captions, images, SigLIP]
    seqs, ids, flags = [], [], []
    for i, (cs, xs) in enumerate(zip(pc.unpack(c), px.unpack(h))):
        parts = [cs, xs] + ([sig_out[i]] if use_sig else [])
        seqs.append(torch.cat(parts))
        ids.append(torch.cat([caps[i].ids, imgs[i].ids] + ([sigs[i].ids] if use_sig else [])))
        flags.append(torch.cat([caps[i].noisy, imgs[i].noisy] + ([sigs[i].noisy] if use_sig else [])))
    pu = pack(seqs, ids, cfg.axes_dims, cfg.rope_theta)
    um = _pack_flags(flags, pu.x.shape[1])
    u = pu.x
    for blk in model.layers:
        u = model.run_block(blk, u, pu.rope, pu.mask, temb(um))
    u = model.final_layer(u, temb(um))

    out = []
    for i in range(b):
        start = len(caps[i].tokens)
        sizes, lens = targets[i]
        offsets = np.cumsum([0] + lens)
        k = max(j for j, s in enumerate(sizes) if s is not None)
        hh, ww, n = sizes[k]
        tok = u[i, start + offsets[k]: start + offsets[k] + n]
        out.append(model.unpatchify(tok, hh, ww))
    return out


def _pack_flags(flags: list[torch.Tensor], n: int) -> torch.Tensor:
    out = torch.zeros(len(flags), n, dtype=torch.bool, device=flags[0].device)
    for i, f in enumerate(flags):
        out[i, : len(f)] = f
    return out
