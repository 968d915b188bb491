"""What bounds the transformer forward on a CPU: its GEMMs and attention, each way they could be called.

    python benchmarks/bench_cpu_kernels.py [--dim 1024] [--hidden 2730] [--tokens 1152 1024 128] [--repeats 21]

For every per-token GEMM of a block (fused qkv, out, w1/w3, w2) at each token count: x·Wᵀ (what F.linear does),
W·xᵀ (tokens as BLAS's leading dimension; the feed-forward uses it, layers.SwiGLU.hidden_major), MKL's packed weight
(what inductor's ``freezing`` would call) and, for qkv, three separate q/k/v GEMMs; GFLOP/s of each. Attention at
the same token counts: SDPA on the strided views the block hands it, on contiguous B×H×S×D copies (copy included),
and as per-head GEMMs with a softmax. Times are interleaved medians; ratios against the first variant are per round
with a 95% interval (timing.paired_ratio). The figures of session 6 are in RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from timing import medians, paired_ratio, rounds  # noqa: E402


def report(title: str, fns: dict, flops: float, repeats: int) -> None:
    with torch.inference_mode():
        ts = rounds(fns, repeats, lambda: None)
    base, med = next(iter(fns)), medians(ts)
    parts = []
    for k, t in ts.items():
        ratio = "" if k == base else " ×{:.3f} [{:.3f}, {:.3f}]".format(*paired_ratio(t, ts[base]))
        parts.append(f"{k} {med[k] * 1e3:.1f} ms {flops / med[k] / 1e9:.0f} GFLOP/s{ratio}")
    print(f"{title:24s} " + " | ".join(parts))


def gemms(s: int, dim: int, hidden: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    for name, (k, n) in {"qkv": (dim, 3 * dim), "out": (dim, dim), "w1/w3": (dim, hidden), "w2": (hidden, dim)}.items():
        x, w = torch.randn(s, k, generator=g), torch.randn(n, k, generator=g) * 0.02
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, s) if torch._C.has_mkl else None
        fns = {"x·Wᵀ": lambda x=x, w=w: F.linear(x, w), "W·xᵀ": lambda x=x, w=w: torch.mm(w, x.t())}
        if packed is not None:
            fns["packed"] = lambda x=x, w=w, p=packed: torch.ops.mkl._mkl_linear(x, p, w, None, s)
        if name == "qkv":
            fns["q,k,v apart"] = lambda x=x, ws=w.split(dim): [F.linear(x, wi) for wi in ws]
        report(f"{s} tokens {name}", fns, 2 * s * k * n, repeats)


def attention(s: int, dim: int, head_dim: int, repeats: int) -> None:
    h = dim // head_dim
    qkv = torch.randn(1, s, 3, h, head_dim, generator=torch.Generator().manual_seed(0))
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # the views Attention.forward passes

    def per_head():
        out = torch.empty(1, h, s, head_dim)
        for i in range(h):
            torch.mm(torch.softmax(torch.mm(q[0, i], k[0, i].t()).mul_(head_dim**-0.5), -1), v[0, i], out=out[0, i])
        return out

    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
           "sdpa contiguous": lambda: F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous()),
           "per-head GEMMs": per_head}
    report(f"{s} tokens attention", fns, 4 * s * s * head_dim * h, repeats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2730)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1152, 1024, 128])
    ap.add_argument("--repeats", type=int, default=21)
    a = ap.parse_args()
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} mkl={torch._C.has_mkl} "
          f"dim={a.dim} hidden={a.hidden} (ratios: per round against the first variant, 95% interval)")
    for s in a.tokens:
        gemms(s, a.dim, a.hidden, a.repeats)
        attention(s, a.dim, a.head_dim, max(5, math.ceil(a.repeats / 3)))


if __name__ == "__main__":
    main()
