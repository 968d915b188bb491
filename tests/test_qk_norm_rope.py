"""The fused q/k RMSNorm + RoPE kernel (zimage_core/qk_norm_rope.py) against float64, and the real-arithmetic RoPE
that compiled CUDA code uses against the complex one.

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1; skipped when the triton package is not
installed), on a GPU compiled. The interpreter rounds fp32 → bf16 toward zero (triton/runtime/interpreter.py,
``cast_impl`` passes no rounding mode to ``_convert_float``) where the GPU rounds to nearest, so on the CPU a bf16
result is held to one unit in the last place and the "closer to float64 than today" claim is checked in fp16 and
fp32 there, in every dtype on the GPU.
"""

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from tiny import randomize_, rel_err

from zimage_core import qk_norm_rope as qr
from zimage_core.attention import apply_rope
from zimage_core.layers import RMSNorm
from zimage_core.packing import Tokens, grid_ids, pack
from zimage_core.transformer import Block, ZImageConfig

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton")
INTERPRETER = pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(), reason=(
    "with a GPU the kernel is tested compiled (and triton 3.7 compiles nothing in a process its interpreter ran in)"
    if HAS_TRITON else "triton is not installed: pip install triton (Linux) to run the kernel in its interpreter"))
# Triton's own jitted functions (tl.sum, tl.split…) are interpreted only if TRITON_INTERPRET=1 was set before triton
# was imported, which other tests may have done: the CPU cases run in a fresh process (test_kernel_interpreted_in_a_fresh_process)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cpu", marks=[INTERPRETER, pytest.mark.skipif(not INTERPRETED, reason="run by test_kernel_interpreted_in_a_fresh_process")]),
           pytest.param("cuda", marks=CUDA)]
AXES = (32, 48, 48)


@pytest.fixture
def kernel_on(monkeypatch):
    monkeypatch.setattr(qr, "ENABLED", True)


@INTERPRETER
@pytest.mark.skipif(INTERPRETED, reason="this is the process it starts")
def test_kernel_interpreted_in_a_fresh_process():
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-k", "cpu", "-p", "no:cacheprovider"],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert r.returncode == 0 and "4 passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-4000:]  # 3 dtypes, a block


def packed_rope(device, fp64=False):
    """The 3-axis table of a real layout: two samples of odd, different lengths (image grid, then caption)."""
    def sample(h, w, n_cap):
        cap = torch.zeros(n_cap, 3, dtype=torch.long)
        cap[:, 0] = torch.arange(1, n_cap + 1)
        return torch.cat([grid_ids(h, w, n_cap + 1), cap])

    ids = [sample(4, 5, 17), sample(3, 3, 14)]  # 37 and 23 tokens
    p = pack(Tokens([torch.zeros(len(i), 1, dtype=torch.float64 if fp64 else torch.float32) for i in ids], ids), AXES, 256.0)
    return p.rope.to(device), None if p.mask is None else p.mask.to(device)


def norms(d, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        n = RMSNorm(d, 1e-5)
        n.weight.data = (1 + 0.2 * torch.randn(d, generator=g)).to(torch.bfloat16).float()  # a bf16 checkpoint's values
        out.append(n.to(device))
    return out


def ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |x| (float64; subnormal spacing near zero)."""
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(fi.tiny)))) * fi.eps


@pytest.mark.usefixtures("kernel_on")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_matches_float64(device, dtype):
    rope, _ = packed_rope(device)
    b, s, h, d = 2, rope.shape[1], 3, 128
    qn, kn = norms(d, device)
    g = torch.Generator().manual_seed(1)
    qkv = (torch.randn(b, s, 3 * h * d, generator=g) * 3).to(device, dtype).view(b, s, 3, h, d)  # a strided q, k, v
    q, k = qr.fused_qk_norm_rope(qkv, qn.weight, kn.weight, 1e-5, rope)
    assert q.shape == k.shape == (b, s, h, d) and q.dtype == dtype and q.is_contiguous()
    for x, n, y in ((qkv[:, :, 0], qn, q), (qkv[:, :, 1], kn, k)):
        truth = apply_rope(torch.nn.functional.rms_norm(x.double(), (d,), n.weight.double(), 1e-5), rope.to(torch.complex128))
        today = apply_rope(n(x), rope)
        if dtype == torch.float32:
            assert rel_err(y, truth) < 1e-6
            continue
        truncating = device == "cpu" and dtype == torch.bfloat16
        err = (y.double() - truth).abs()
        fp32_noise = 1e-6 * truth.abs().amax(-1, keepdim=True)  # the rotation's cancellation, absolute per row
        assert (err <= (1.0 if truncating else 0.5) * ulp(truth, dtype) + fp32_noise).all(), float((err / ulp(truth, dtype)).max())
        if not truncating:  # one rounding instead of two: no further from float64 than the plain path
            assert rel_err(y, truth) <= rel_err(today, truth)


@pytest.mark.usefixtures("kernel_on")
@pytest.mark.parametrize("device", DEVICES)
def test_block_in_bf16_same_with_and_without_the_kernel(device):
    """A time-modulated block (two heads of 128, key mask between samples): fused on/off agree within bf16 rounding."""
    cfg = ZImageConfig(dim=256, head_dim=128, ffn_hidden=512)
    ref = randomize_(Block(cfg, modulated=True), seed=2).double().to(device)
    blk = copy.deepcopy(ref).to(torch.bfloat16)
    rope64, mask = packed_rope(device, fp64=True)
    rope, _ = packed_rope(device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, rope.shape[1], 256, generator=g, dtype=torch.float64).to(device)
    temb = torch.randn(2, 256, generator=g, dtype=torch.float64).to(device)
    with torch.inference_mode():
        truth = ref(x, rope64, mask, temb)
        assert qr.fused_ok(blk.attention.qkv(x.bfloat16()).view(2, -1, 3, 2, 128), blk.attention.q_norm, blk.attention.k_norm, rope)
        fused = blk(x.bfloat16(), rope, mask, temb.bfloat16())
        assert qr.ENABLED  # the kernel ran (a failure would have switched it off)
        qr.ENABLED = False
        plain = blk(x.bfloat16(), rope, mask, temb.bfloat16())
    valid = mask[..., None]  # padding rows between samples are not compared
    rel = lambda a, b: rel_err(a.double() * valid, b.double() * valid)  # noqa: E731
    # two bf16 results whose errors are partly shared lie at most ≈√2 × that error apart (a wrong kernel: ≈1);
    # CPU, interpreter: 6.1e-3 apart, 8.3e-3 and 8.0e-3 from float64
    assert rel(fused, plain) < 1.5 * rel(plain, truth), (rel(fused, plain), rel(plain, truth))
    assert rel(fused, truth) <= 1.05 * rel(plain, truth), (rel(fused, truth), rel(plain, truth))


def test_fused_path_only_where_it_serves(monkeypatch):
    qn, kn = norms(128, "cpu")
    rope, _ = packed_rope("cpu")
    qkv = torch.zeros(2, rope.shape[1], 3, 2, 128, dtype=torch.bfloat16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not qr.fused_ok(qkv, qn, kn, rope)  # CPU without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert qr.fused_ok(qkv, qn, kn, rope) == HAS_TRITON
    for other in (qkv.float(), qkv[..., :96], qkv.transpose(-1, -2)):  # fp32, head dim 96, strided rows
        assert not qr.fused_ok(other, qn, kn, rope)
    monkeypatch.setattr(qr, "ENABLED", False)
    assert not qr.fused_ok(qkv, qn, kn, rope)


def test_a_kernel_that_fails_to_build_leaves_the_plain_path_and_says_so(monkeypatch):
    qn, kn = norms(128, "cpu")
    rope, _ = packed_rope("cpu")
    qkv = torch.randn(2, rope.shape[1], 3, 2, 128).to(torch.bfloat16)
    monkeypatch.setattr(qr, "ENABLED", True)
    monkeypatch.setattr(qr, "fused_ok", lambda *_: qr.ENABLED)

    def broken(*_):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(qr, "fused_qk_norm_rope", broken)
    with pytest.warns(UserWarning, match="PassManager::run failed"):
        q, k = qr.qk_norm_rope(qkv, qn, kn, rope)
    assert not qr.ENABLED and torch.equal(q, apply_rope(qn(qkv[:, :, 0]), rope)) and torch.equal(k, apply_rope(kn(qkv[:, :, 1]), rope))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_real_arithmetic_rope_equals_complex(dtype):
    rope, _ = packed_rope("cpu", fp64=dtype == torch.float64)
    x = torch.randn(2, rope.shape[1], 3, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    real, cplx = apply_rope(x, rope, real=True), apply_rope(x, rope, real=False)
    assert real.dtype == cplx.dtype == dtype
    assert rel_err(real, cplx) <= (1e-6 if dtype != torch.bfloat16 else 4e-3)


_BUILD = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from zimage_core import qk_norm_rope as qr
sig = {"qkv": "*bf16", "out": "*bf16", "wq": "*bf16", "wk": "*fp32", "cs": "*fp32", "S": "i32", "H": "i32",
       **dict.fromkeys(("sb", "ss", "st", "sh", "cb", "cn"), "i32"), "eps": "fp32", "D": "constexpr", "BH": "constexpr"}
aligned = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig) if k in ("qkv", "out", "wq", "wk", "cs") or k[0] in "sc"}
src = ASTSource(qr._kernel(), sig, constexprs={"D": 128, "BH": 32}, attrs=aligned)
print(json.dumps(triton.compile(src, target=GPUTarget("cuda", 89, 32), options={"num_warps": 4, "enable_fp_fusion": True}).asm["ptx"]))
"""


@INTERPRETER
def test_kernel_builds_for_a_gpu_with_vector_accesses_and_nearest_rounding():
    """Without a GPU: the CUDA compile (Triton's bundled ptxas) of the bf16 kernel for sm_89, with the alignment a
    launch specialises on; whole 16-byte loads and stores, and fp32 → bf16 rounding to nearest (cvt.rn). In a fresh
    process, as above."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _BUILD], capture_output=True, text=True, env=env, check=True)
    ptx = json.loads(out.stdout.strip().splitlines()[-1])
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx and ".local" not in ptx
    assert "cvt.rn.bf16" in ptx


@pytest.mark.slow
def test_compiled_real_arithmetic_rope_equals_complex_in_one_kernel():
    """What compiled CUDA code runs, here through CPU inductor: one generated kernel (the complex form gets none)."""
    from torch._inductor.utils import run_and_get_code

    rope, _ = packed_rope("cpu")
    x = torch.randn(2, rope.shape[1], 3, 128, generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(lambda a, f: apply_rope(a, f, real=True), fullgraph=True), x, rope)
    assert rel_err(out, apply_rope(x, rope, real=False)) <= 1e-6
    src = "\n".join(code)
    assert len(re.findall(r"cpp_fused\w+ = ", src)) == 1 and "aten.mul" not in src
