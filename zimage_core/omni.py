"""Z-Image Omni / Edit conditioning: reference images as clean tokens, each with its own caption segment.

Sequence per sample: [caption segments | image tokens (references…, target) | SigLIP tokens (optional)].
Caption segment j and image j share a noise flag: references are clean (time 1), the target is noisy
(time t); every modulated block and the final layer pick the clean or noisy modulation per token.
Positions: segment j starts where the previous one ended (+2 slots for its image's VAE and SigLIP
tokens); image j sits at (end of segment j, h, w); its SigLIP grid at (end of segment j + 1, h', w')
rescaled to the image's latent size. All as diffusers' ZImageTransformer2DModel (Omni mode) and
ZImageOmniPipeline compute it, including their quirks: the SigLIP H×W×C grid is flattened through a
C×H×W view (ComfyUI does the same), and caption ids drift by the padding of earlier segments.

This file builds the token runs; ``ZImageTransformer.forward_omni`` runs them through the shared skeleton.
"""

from __future__ import annotations

import torch

from .errors import ZImageError
from .packing import SEQ_MULTIPLE, Tokens, grid_ids


def _empty_slot(pad_token: torch.Tensor, dtype):
    """A missing image (or SigLIP map): one run of pad tokens at ids (0, 0, 0)."""
    return pad_token.to(dtype).expand(SEQ_MULTIPLE, -1), torch.zeros(SEQ_MULTIPLE, 3, dtype=torch.long)


def _captions(model, segments, flags, dev, dtype):
    tok, ids, noisy, cu, ends = [], [], [], 1, []
    for j, c in enumerate(segments):
        ct, ci = model.caption_tokens(c.to(dev, dtype), pos0=cu)
        tok.append(ct), ids.append(ci), noisy.append(torch.full((len(ct),), flags[j] if j < len(flags) else True, device=dev))
        cu += len(c)
        ends.append(cu)
        cu += 2
    # The reference builds each segment's ids over its padded length and then appends its pad ids once
    # more, so from the second segment on the ids drift by the earlier segments' padding. Kept exactly.
    drift = [torch.cat([ci, ci.new_zeros(len(ct) - len(c), 3)]) for ci, ct, c in zip(ids, tok, segments)]
    return torch.cat(tok), torch.cat(drift)[: sum(len(a) for a in tok)], torch.cat(noisy), ends


def _siglip(model, feats, sizes, ends, flags, dev, dtype):
    tok, ids, noisy = [], [], []
    for j, s in enumerate(feats):
        if s is None:
            st, si = _empty_slot(model.siglip_pad_token, dtype)
        else:
            sh, sw, sc = s.shape
            flat = s.to(dev).permute(2, 0, 1).reshape(sh * sw, sc)  # the reference's flattening, kept exactly
            st, si = model.padded(model.siglip_embedder(flat.to(dtype)), grid_ids(sh, sw, ends[j] + 1), model.siglip_pad_token)
            if sizes[j] is not None:
                hx, wx = sizes[j][0], sizes[j][1]
                si = si.float()
                si[:, 1] = si[:, 1] / max(sh - 1, 1) * (hx - 1)
                si[:, 2] = si[:, 2] / max(sw - 1, 1) * (wx - 1)
                si = si.to(torch.int32).long()
        tok.append(st), ids.append(si), noisy.append(torch.full((len(st),), flags[j], device=dev))
    return torch.cat(tok), torch.cat(ids), torch.cat(noisy)


def omni_tokens(model, x, captions, siglip=None, image_noise_mask=None):
    """The token runs of an Omni batch: ({"image", "caption"[, "siglip"]} → Tokens, in execution order) and per
    sample the target (offset in its image run, tokens, H, W). Arguments as ``ZImageTransformer.forward_omni``."""
    cfg, dtype, dev = model.cfg, model.compute_dtype, model.device
    if siglip is not None and any(s is not None for s in siglip) and not cfg.siglip_feat_dim:
        raise ZImageError("SigLIP image features were given, but this model has no SigLIP embedder (it is not an Omni/Edit "
                          "model); connect no CLIP vision model, or load Z-Image-Omni/Edit weights.")
    if image_noise_mask is None:
        image_noise_mask = [[0] * (len(xi) - 1) + [1] for xi in x]
    runs = {k: Tokens([], [], []) for k in ("image", "caption", "siglip")}
    targets = []
    for i in range(len(x)):
        flags = [bool(f) for f in image_noise_mask[i]]
        ct, ci, cn, ends = _captions(model, captions[i], flags, dev, dtype)
        tok, ids, noisy, sizes = [], [], [], []
        for j, im in enumerate(x[i]):
            if im is not None:
                it, ii, n = model.image_tokens(im.to(dev, dtype), ends[j])
                sizes.append((im.shape[-2], im.shape[-1], n))
            else:
                it, ii = _empty_slot(model.x_pad_token, dtype)
                sizes.append(None)
            tok.append(it), ids.append(ii), noisy.append(torch.full((len(it),), flags[j], device=dev))
        k = max(j for j, s in enumerate(sizes) if s is not None)
        hh, ww, n = sizes[k]
        targets.append((sum(len(a) for a in tok[:k]), n, hh, ww))
        parts = [(torch.cat(tok), torch.cat(ids), torch.cat(noisy)), (ct, ci, cn)]
        if siglip is not None and siglip[i] is not None and cfg.siglip_feat_dim:
            parts.append(_siglip(model, siglip[i], sizes, ends, flags, dev, dtype))
        for run, (a, b, c) in zip(runs.values(), parts):
            run.x.append(a), run.ids.append(b), run.noisy.append(c)
    if runs["siglip"].x and len(runs["siglip"].x) != len(x):
        raise ZImageError("within one batch, either every sample or none must have SigLIP features.")
    if not runs["siglip"].x:
        del runs["siglip"]
    return runs, targets
