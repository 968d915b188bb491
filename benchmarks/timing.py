"""Interleaved median timing shared by the benchmarks (torch-free, so torch-only scripts can import it)."""

from __future__ import annotations

import time


def timed(fns: dict, repeats: int, sync) -> dict:
    """Median seconds of each function, run in turn (so drift in machine load hits all alike), after one warm-up.
    Each round starts one function later than the last, so none always runs right after the same other one (what
    a function leaves behind, e.g. freed memory or busy threads, then costs each of them alike)."""
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
    return {k: sorted(v)[repeats // 2] for k, v in ts.items()}


def timed_pair(fa, fb, repeats: int, sync) -> tuple[float, float]:
    """``timed`` for two functions: (median of fa, median of fb)."""
    t = timed({"a": fa, "b": fb}, repeats, sync)
    return t["a"], t["b"]
