"""Interleaved median timing shared by the benchmarks (torch-free, so torch-only scripts can import it)."""

from __future__ import annotations

import math
import time


def rounds(fns: dict, repeats: int, sync) -> dict:
    """Seconds of each function in each of ``repeats`` rounds (lists in round order), after one warm-up. Every round
    runs all functions in turn (so drift in machine load hits all alike) and starts one function later than the last,
    so none always runs right after the same other one (what a function leaves behind, e.g. freed memory or busy
    threads, then costs each of them alike)."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    items = list(fns.items())
    for r in range(repeats):
        for k, f in items[r % len(items):] + items[: r % len(items)]:
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            ts[k].append(time.perf_counter() - t0)
    return ts


def medians(ts: dict) -> dict:
    """Each function's median round (the upper one of an even count) from ``rounds``."""
    return {k: sorted(v)[len(v) // 2] for k, v in ts.items()}


def timed(fns: dict, repeats: int, sync) -> dict:
    """Median seconds of each function over interleaved ``rounds``."""
    return medians(rounds(fns, repeats, sync))


def timed_pair(fa, fb, repeats: int, sync) -> tuple[float, float]:
    """``timed`` for two functions: (median of fa, median of fb)."""
    t = timed({"a": fa, "b": fb}, repeats, sync)
    return t["a"], t["b"]


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median of the per-round ratios a/b and its 95% confidence interval (sign test: distribution-free).

    A ratio of two medians moves with load that hits one function's rounds more than the other's; the same round's
    ratio does not, and the interval says whether a difference of a few percent is there at all (upper end below 1:
    ``a`` is faster with 95% confidence). Needs 6 rounds or more for an interval; with fewer it is (nan, nan)."""
    r = sorted(x / y for x, y in zip(a, b))
    n = len(r)
    med = (r[(n - 1) // 2] + r[n // 2]) / 2
    # the largest k with P(Binomial(n, 1/2) < k) <= 2.5%: [r_k, r_(n+1-k)] (1-based) covers the median with >= 95%
    k, below = 0, 0.0
    while below + math.comb(n, k) / 2**n <= 0.025:
        below += math.comb(n, k) / 2**n
        k += 1
    return (med, r[k - 1], r[n - k]) if k else (med, math.nan, math.nan)
