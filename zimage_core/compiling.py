"""``torch.compile`` of the transformer, per block: whether this machine can, and doing it.

Per block rather than the whole forward: offloading places each block's weights around its call, LoRA patches and
ControlNet hooks act between blocks, and every block of a stage shares one compiled graph (three graphs in all), so a
new image size costs seconds, not a recompile of 30 layers. Inductor writes Triton kernels for NVIDIA GPUs and C++
for the CPU; without those tools it fails at the first step with a long traceback, so we ask first.
"""

from __future__ import annotations

import torch

from .errors import ZImageError


def compile_problem(device) -> str | None:
    """Why inductor cannot compile for ``device`` here, or None when it can."""
    kind = torch.device(device).type
    if kind == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return ("torch.compile needs Triton for NVIDIA GPUs and this PyTorch has none (Linux: it comes with "
                    "PyTorch's CUDA wheels; Windows: pip install triton-windows)")
    elif kind == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 (inductor raises several types for a missing or unusable compiler)
            return f"torch.compile on the CPU needs a C++ compiler (g++ or clang++; set CXX to it): {e}"
    elif kind != "xpu":
        return f"torch.compile (inductor) does not generate code for {kind} devices"
    return None


def require_compile(device, what: str) -> None:
    """Raise a clear error before ``what`` is loaded when it could not be compiled for ``device``."""
    problem = compile_problem(device)
    if problem:
        raise ZImageError(f"cannot compile {what}: {problem}. Turn compile off to run uncompiled.")
