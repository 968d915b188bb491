"""CUDA graphs of the whole transformer forward, one per input layout (optional; resident models on NVIDIA GPUs).

A step launches ~2000 kernels (60 per block) and runs the Python between them (packing, RoPE lookup, hooks); one
graph replays all of it with a single launch. Where the GPU already never waits on the host (H100, 1024²) that changes
nothing; at smaller sizes, or with a slower host, the step is shorter (H100, 512²: 0.71–0.95× the eager step, by host).

A graph bakes in what the capture read: the storage addresses of the weights, their LoRA run-time patches and the
per-layout RoPE tables, Python numbers (patch factors, the attention backend) and global switches (autocast, TF32,
SDPA backends). So each graph is keyed by the input layout and those switches, and checked against a fingerprint of
the model before every replay: ComfyUI patching a LoRA in, or weights moving, recaptures instead of replaying stale
addresses. The RoPE tables a graph read are held by it, so the layout cache cannot free them under it. Inputs are
copied into the graph's static buffers and the output is cloned out, so callers may keep results across calls (a
CFG pair). A layout is captured on its second call (a layout seen once, such as a single img2img step, costs
nothing): the first runs eagerly and builds what capture cannot (Triton's JIT, the RoPE table); the capture then
runs one warm-up forward on its side stream, which also refuses any host sync (a sync would break the capture).
Only the plain path is graphed, and only without per-block hooks (ControlNet, model patches) or streaming; anything
else runs eagerly as before. Graph memory (one forward's activations per layout, 0.74 GB at 1024²) is outside
ComfyUI's count until the model is unloaded.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import packing, qk_norm_rope
from .errors import ZImageInterrupted
from .packed import Packed

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    state: tuple  # the fingerprint it was captured under
    x: torch.Tensor
    t: torch.Tensor
    captions: list[torch.Tensor]
    out: torch.Tensor
    keep: list[torch.Tensor]  # tensors made outside the graph that it reads (RoPE tables, masks)


_PLAIN = (bool, str, type(None), torch.dtype)


def _print(v):
    """The part of a value a graph bakes in: tensors by storage address, plain values as they are."""
    if isinstance(v, torch.Tensor):
        return v.data_ptr(), v.dtype, v.shape
    if isinstance(v, (*_PLAIN, int, float)):
        return v
    if isinstance(v, (list, tuple)):
        return tuple(_print(e) for e in v)
    if isinstance(v, Packed):
        return (v.fmt.name, *(_print(t) for t in v.tensors.values()))
    return type(v).__name__  # executors, configs, patchers: not read by the forward's kernels


_is_tensor = functools.partial(operator.is_not, None)
_dtype, _shape = operator.attrgetter("dtype"), operator.attrgetter("shape")


class Fingerprint:
    """Everything the forward reads that a graph would bake in, as one comparable tuple: every parameter's and
    buffer's storage address, dtype and shape (a replaced tensor, or one given new ``.data``, differs; values changed
    in place are read where they are), and every module's public attributes (weights held as ``Packed``, fp8 scales,
    LoRA run-time patches with their factors, the attention backend, flags) but for plain numbers set at
    construction (widths, eps). Built once per model, then C-level iteration (0.58 ms a call for the full model on
    a 2.45 GHz EPYC core, 0.53–0.55 ms on an H100 host); a module gaining or losing an attribute, or a submodule
    replaced, rebuilds the walk."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._walk()

    def _walk(self) -> None:
        self.modules = list(self.model.modules())
        self.children = [m._modules for m in self.modules if m._modules]
        self.structure = self._structure()
        self.tensors = [d for m in self.modules for d in (m._parameters, m._buffers) if d]
        self.getters = []
        for m in self.modules:
            names = [k for k, v in m.__dict__.items() if not k.startswith("_") and k != "training" and type(v) not in (int, float)]
            if names:
                self.getters.append((m, operator.attrgetter(*names, "training")))  # always a tuple

    def _structure(self) -> tuple:
        """Attribute counts and submodule identities (held by ``self.modules``, so an id is never reused)."""
        return (*map(len, (m.__dict__ for m in self.modules)),
                *map(id, itertools.chain.from_iterable(map(dict.values, self.children))))

    def __call__(self) -> tuple:
        if self._structure() != self.structure:
            self._walk()
        ts = list(filter(_is_tensor, itertools.chain.from_iterable(map(dict.values, self.tensors))))
        values = itertools.chain.from_iterable([get(m) for m, get in self.getters])
        return (qk_norm_rope.ENABLED, *map(torch.Tensor.data_ptr, ts), *map(_dtype, ts), *map(_shape, ts),
                *[v if type(v) in _PLAIN else _print(v) for v in values])


def switches(device: torch.device) -> tuple:
    """Process-wide settings a capture bakes in: autocast, reduced-precision GEMMs, the SDPA backends allowed."""
    b = torch.backends
    return (device.index, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cuda.matmul.allow_bf16_reduced_precision_reduction,
            b.cuda.matmul.allow_fp16_reduced_precision_reduction, b.cuda.flash_sdp_enabled(),
            b.cuda.mem_efficient_sdp_enabled(), b.cuda.cudnn_sdp_enabled(), b.cuda.math_sdp_enabled())


class CudaGraphs:
    """Per transformer: captured graphs by layout (the ``max_graphs`` most recent), sharing one memory pool and one
    side stream (free blocks of a private pool are reused only on the stream that freed them)."""

    def __init__(self, model, max_graphs: int = 4):
        self.model, self.max_graphs = model, max_graphs
        self.enabled = False  # the model's default (use_cuda_graphs); a call's run.cuda_graphs overrides it
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.seen: set[tuple] = set()  # layouts that ran once eagerly
        self.failed: set[tuple] = set()  # layouts whose forward cannot be captured (a host sync): eager
        self.broken: str | None = None  # a capture CUDA abandoned: no more captures in this process for this model
        self.pool = self.stream = None
        self.fingerprint: Fingerprint | None = None
        self.captures = self.replays = 0
        self.warned = False

    def drop(self) -> int:
        """Release every graph and its memory (the model leaves the GPU, or ComfyUI wants the memory back); returns
        the bytes given back to the device."""
        had = bool(self.graphs)
        self.graphs.clear()
        self.seen.clear()
        self.failed.clear()
        self.pool = self.fingerprint = None
        if not had or not torch.cuda.is_available():
            return 0
        before = torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        return max(0, before - torch.cuda.memory_reserved())

    def applies(self, x, captions, run) -> bool:
        """Whether this call can replay a graph: a plain batch tensor on a resident CUDA model, no per-block hooks,
        no autograd, not inside another capture or a compile trace."""
        m = self.model
        cuda, static = m.device.type == "cuda", m.executor.static
        if not (isinstance(x, torch.Tensor) and cuda and static):
            if self.graphs:
                self.drop()  # streamed or moved off the GPU: hold no memory for graphs that cannot replay
            if cuda and not static and not self.warned:
                self.warned = True
                log.warning("Z-Image: CUDA graphs need the transformer resident on the GPU; blocks are streamed "
                            "(offloading), so steps run without them.")
            return False
        if self.broken or (run is not None and (run.wraps or run.after)):
            return False
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(c.requires_grad for c in captions)))

    def __call__(self, x, t, captions, run=None):
        m = self.model
        t = torch.as_tensor(t, dtype=torch.float32, device=m.device).reshape(-1).expand(len(x))
        layout = (tuple(x.shape), x.dtype, tuple((tuple(c.shape), c.dtype) for c in captions),
                  torch.is_inference_mode_enabled(), switches(m.device))
        if layout in self.failed or layout not in self.seen:
            self.seen.add(layout)
            return m.forward_eager(x, t, captions, run)  # per-block interrupt checks as without graphs
        if run is not None and run.cancel is not None and run.cancel():  # once per replayed forward
            raise ZImageInterrupted("sampling was interrupted")
        self.fingerprint = self.fingerprint or Fingerprint(m)
        state = self.fingerprint()
        g = self.graphs.get(layout)
        if g is None or g.state != state:
            g = self._capture(layout, state, x, t, captions)
            if g is None:
                return m.forward_eager(x, t, captions, run)
        else:
            self.graphs.move_to_end(layout)
            g.x.copy_(x)
            g.t.copy_(t)
            for s, c in zip(g.captions, captions):
                s.copy_(c)
        g.graph.replay()
        self.replays += 1
        return g.out.clone()

    def _capture(self, layout, state, x, t, captions) -> _Graph | None:
        m = self.model
        self.graphs.pop(layout, None)
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        dev = m.device
        sx, st, *scaps = (torch.empty(v.shape, dtype=v.dtype, device=dev).copy_(v) for v in (x, t, *captions))
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        self.stream = self.stream or torch.cuda.Stream(dev)
        main, side = torch.cuda.current_stream(dev), self.stream
        side.wait_stream(main)
        try:  # the warm-up on the capture's stream, where any host sync raises instead of breaking the capture
            with torch.no_grad(), torch.cuda.stream(side):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    m.forward_eager(sx, st, scaps)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        except RuntimeError as e:
            main.wait_stream(side)
            self.failed.add(layout)
            log.warning("Z-Image: this input layout runs without CUDA graphs: its forward waits for the GPU (%s)", e)
            return None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool, stream=side, capture_error_mode="thread_local"):
                out = m.forward_eager(sx, st, scaps)
        except Exception as e:  # noqa: BLE001 (whatever CUDA refused inside the capture)
            self._abandon(dev, main, e)
            return None
        main.wait_stream(side)
        self.captures += 1
        g = _Graph(graph, state, sx, st, scaps, out, list(packing._TABLES.values()))
        self.graphs[layout] = g
        return g

    def _abandon(self, dev, main, e: Exception) -> None:
        """A capture CUDA gave up on: end its allocation to the pool (capture_end may have thrown before doing it,
        and ComfyUI's next empty_cache would then fail), put the caller's stream back, and stop capturing."""
        try:
            torch._C._cuda_endAllocateToPool(dev.index, self.pool)
        except Exception:  # noqa: BLE001 (already ended by capture_end: nothing to do)
            pass
        torch.cuda.set_stream(main)
        main.wait_stream(self.stream)
        self.graphs.clear()
        self.pool = None
        self.broken = f"{type(e).__name__}: {e}"
        log.warning("Z-Image: CUDA graphs are off for this model: a capture failed (%s). Steps run without them.",
                    self.broken)
