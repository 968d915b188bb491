"""Building blocks shared by the transformer and the text encoder.

``Linear`` keeps its weight in the storage dtype it was loaded with (bf16, fp16, fp32, or fp8 with an
optional per-tensor scale) and casts it to the activation dtype at call time, so an fp8 file costs fp8
memory and a bf16 file can run in fp32 without a second full copy. A weight can also be ``Packed``
(GGUF and other block formats, see packed.py): it is expanded per call on the device it sits on. Run-time
weight patches (LoRA on fp8 or packed storage) hook in here too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_half, int8_mm, scaled_mm
from .packed import Packed

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class StoredWeight(nn.Module):
    """A module whose ``weight`` is a Parameter in a storage dtype or a ``Packed`` (assign either)."""

    def __setattr__(self, name, value):
        if name == "weight" and isinstance(value, Packed):
            self._parameters.pop("weight", None)
            object.__setattr__(self, "weight", value)
            return
        if name == "weight" and isinstance(self.__dict__.get("weight"), Packed):
            del self.__dict__["weight"]
        super().__setattr__(name, value)

    @property
    def patch_only(self) -> bool:
        """Weight changes must stay run-time patches: re-quantising fp8 or packed storage would lose them."""
        return isinstance(self.weight, Packed) or self.weight.dtype in FP8_DTYPES

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight in ``dtype``: packed storage expanded, an fp8 scale applied."""
        w = self.weight
        if isinstance(w, Packed):
            return w.dequantize(dtype)
        if w.dtype != dtype:
            w = w.to(dtype)
        if self.weight_scale is not None:
            w = w * self.weight_scale.to(device=w.device, dtype=dtype)
        return w


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, transposed: bool = False) -> torch.Tensor:
    """``F.linear(x, w, b)``, or with ``transposed`` its transpose computed as W·xᵀ (+ b per row). Half operands on
    a CPU that only emulates half GEMMs are multiplied in fp32 and rounded once (cpu_half.py)."""
    dtype = x.dtype
    if cpu_half.upcast(x):
        x, w, b = x.float(), w.float(), None if b is None else b.float()
    if transposed:
        y = torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())
    else:
        y = F.linear(x, w, b)
    return y.to(dtype)


class Linear(StoredWeight):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        # fp8 checkpoints with a scale: real weight = weight.to(compute) * weight_scale
        self.weight_scale: torch.Tensor | None = None
        # run-time patches: (down [r, in], up [out, r], factor) or (None, ΔW [out, in], factor); see lora.py
        self.patches: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        # quantized compute (set_quant_matmul): e4m3 × e4m3 (scaled_mm.py; input_scale from the file) or
        # int8 × int8 (int8_mm.py) on the tensor cores instead of expanding the weight
        self.quant_matmul = False
        self.input_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        if self.quant_matmul and scaled_mm.can_use(self.weight, x):
            y = scaled_mm.fp8_linear(x, self.weight, self.weight_scale, b, self.input_scale)
        elif self.quant_matmul and int8_mm.can_use(self.weight, x):
            y = int8_mm.int8_linear(x, self.weight, b)
        else:
            y = linear(x, self.compute_weight(x.dtype), b)
        return self._add_patches(x, y)

    def forward_t(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x).T`` for a 2-D ``x`` of [tokens, in], computed as W·xᵀ so that the BLAS GEMM's leading (m)
        dimension is the tokens instead of the outputs (see ``SwiGLU.hidden_major``). Plain or packed weights (no
        quantized compute); run-time patches included, rounded where ``forward`` rounds them."""
        b = self.bias
        y = linear(x, self.compute_weight(x.dtype), None if b is None else b.to(x.dtype), transposed=True)
        return self._add_patches(x, y, transposed=True)

    def _add_patches(self, x: torch.Tensor, y: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """``y`` plus the run-time patches' products with ``x``: low-rank (down, up) or dense (None, ΔW)."""
        for down, up, factor in self.patches:
            h = x if down is None else linear(x, down.to(device=x.device, dtype=x.dtype))
            y = y + linear(h, up.to(device=x.device, dtype=x.dtype), transposed=transposed) * factor
        return y

    def extra_repr(self) -> str:
        return f"{self.in_features}→{self.out_features}, storage={self.weight.fmt.name if isinstance(self.weight, Packed) else self.weight.dtype}"


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm with fp32 (or fp64) accumulation, result in the input dtype.

    On a GPU and under compile ``F.rms_norm`` is one fused kernel. Eager on the CPU it is a chain of five passes
    (square, mean, rsqrt, two products); the sum of squares as a 2-norm reduction (one read, no temporary) and the
    two products take half the time (1152×1024 fp32, 2 threads: 1.1–1.5 ms against 2.0–3.8) with the same error
    against float64 (1024 wide: 7.9e-8 against 6.3e-8).
    """
    w = None if weight is None else weight.to(x.dtype)
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    acc = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    ss = torch.linalg.vector_norm(x, 2, -1, keepdim=True, dtype=acc).square_()
    y = torch.mul(x, ss.div_(x.shape[-1]).add_(eps).rsqrt_())
    return (y if w is None else y.mul_(w)).to(x.dtype)


def quantized_kind(weight) -> str | None:
    """Which quantized matmul can take ``weight`` as stored: "fp8" (e4m3), "int8" (ComfyUI's int8_tensorwise), or None."""
    if isinstance(weight, torch.Tensor) and weight.dtype == scaled_mm.FP8:
        return "fp8"
    return "int8" if int8_mm.int8_parts(weight) is not None else None


def set_quant_matmul(model: nn.Module, enabled: bool, kinds: tuple[str, ...] = ("fp8", "int8")) -> int:
    """Switch the per-token matmuls of the blocks (modules naming them in ``token_gemms``: attention qkv/out,
    feed-forward w1/w2/w3) to quantized compute where their weight is of one of ``kinds``, or back; returns how many
    switched.

    Embedders, the time MLP, adaLN modulation and the final layer stay dequantized: they are a sliver of the time
    (one row, or a narrow K), but quantized activations there shift every token alike. Measured with fp8 on random
    weights (dim 768, 2+1+1 blocks, CPU _scaled_mm): every layer in fp8 gave 6.8e-2 relative error against fp32,
    the block matmuls alone 3.4e-2, dequantize 1.1e-2.
    """
    count = 0
    for m in model.modules():
        for name in getattr(m, "token_gemms", ()):
            lin = getattr(m, name)
            lin.quant_matmul = bool(enabled) and quantized_kind(lin.weight) in kinds
            count += lin.quant_matmul
    return count


class Embedding(StoredWeight):
    """Token embedding whose table keeps its storage dtype (like ``Linear``); rows are cast on lookup."""

    def __init__(self, num: int, dim: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim, device=device), requires_grad=False)
        self.weight_scale: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(self.weight, Packed):  # expand only the rows looked up
            w, flat = self.weight, ids.reshape(-1).to(self.weight.device)
            rows = w.rows(flat).dequantize(dtype) if w.fmt.rowwise else w.dequantize(dtype)[flat]
            return rows.reshape(*ids.shape, -1)
        rows = F.embedding(ids.to(self.weight.device), self.weight).to(dtype)
        if self.weight_scale is not None:
            rows = rows * self.weight_scale.to(device=rows.device, dtype=dtype)
        return rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): the feed-forward of both Z-Image and Qwen3 (gate=w1, up=w3, down=w2)."""

    token_gemms = ("w1", "w2", "w3")  # what quantized compute may run (set_quant_matmul)

    def __init__(self, dim: int, hidden: int, device=None):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False, device=device)
        self.w2 = Linear(hidden, dim, bias=False, device=device)
        self.w3 = Linear(dim, hidden, bias=False, device=device)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``scale`` multiplies w2's input (and so the output) exactly: fp16 headroom, see precision.py."""
        major = self.hidden_major(x)  # then gate and up come as hidden × tokens
        x2 = x.reshape(-1, x.shape[-1]) if major else x
        gate, up = (lin.forward_t(x2) if major else lin(x2) for lin in (self.w1, self.w3))
        h = F.silu(gate, inplace=True).mul_(up if scale == 1.0 else up * scale)
        h = h.t() if major else h
        if h.dtype == torch.float16:  # ComfyUI clamps this product (comfy/ldm/lumina/model.py)
            h = torch.nan_to_num(h, nan=0.0, posinf=65504.0, neginf=-65504.0)
        return self.w2(h).reshape(x.shape)

    def hidden_major(self, x: torch.Tensor) -> bool:
        """Whether w1/w3 should run as W·xᵀ (hidden × tokens) rather than x·Wᵀ: on the CPU in fp32 GEMMs, when
        the token count is a multiple of 16 and the hidden width is not.

        MKL's sgemm slows down when its leading (m) dimension, the output width of x·Wᵀ, is not a multiple of its
        register tile; W·xᵀ makes the tokens that dimension. Z-Image pads every sequence to a multiple of 32, while a
        hidden width such as 2730 (dim 1024 × 8/3) is unaligned. Whole feed-forward, fp32, AVX2 EPYC, 2 threads:
        1152 tokens, 1024 → 2730: 0.79× the time; with aligned widths the order matters little either way (4096
        tokens, 3840 → 10240, the real model: within 3%) but unaligned tokens in m cost (1100 tokens, 1024 → 2048:
        1.15×), hence the rule. The dot products are the same (bit-equal there); w2 reads the transposed
        activations as they are, BLAS takes either order.
        """
        tokens = x.numel() // x.shape[-1]
        return (x.device.type == "cpu" and (x.dtype == torch.float32 or cpu_half.upcast(x))
                and tokens % 16 == 0 and self.w1.out_features % 16 != 0
                and not (self.w1.quant_matmul or self.w3.quant_matmul))
