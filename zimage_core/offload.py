"""VRAM-aware block streaming: a planner that decides which transformer blocks stay on the GPU, and an
executor that streams the others from pinned host memory, ahead of use, on a separate CUDA stream.

A Z-Image block holds 177 M parameters (354 MB in bf16, 177 MB in fp8) and costs about 1.5 TFLOP at
1024×1024, so its copy over PCIe takes about as long as its compute: with prefetching, streamed blocks
cost little more than resident ones. Streamed blocks travel in their storage form (fp8 stays fp8, a ``Packed``
GGUF weight travels as its blocks), and the planner counts those bytes.

The same plan logic runs on a CPU-only machine: there the "device" copy is a real clone, every byte
placed for compute is recorded in a ledger, and tests check the ledger against the plan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import PLAIN, Executor
from .errors import ZImageError
from .packed import Packed

log = logging.getLogger("zimage")
GB = 1024**3
MODES = ("auto", "budget", "resident", "min_vram")


def tensor_bytes(t: torch.Tensor | Packed | None) -> int:
    return 0 if t is None else t.nbytes if isinstance(t, Packed) else t.numel() * t.element_size()


def module_bytes(m: nn.Module) -> int:
    """Bytes of a module's weights in their storage form (plus fp8 scales, packed weights and run-time patches)."""
    total = sum(tensor_bytes(p) for p in m.parameters()) + sum(tensor_bytes(b) for b in m.buffers())
    for sub in m.modules():
        total += tensor_bytes(getattr(sub, "weight_scale", None)) + tensor_bytes(_packed(sub))
        for down, up, _ in getattr(sub, "patches", ()):
            total += tensor_bytes(down) + tensor_bytes(up)
    return total


def activation_bytes(model, width: int, height: int, batch: int = 1, cfg: bool = False, caption_tokens: int = 512,
                     controls: int = 0) -> int:
    """Peak activation memory of one transformer forward (one block's intermediates + the sequences), with margin.
    Each control model adds its running stream, its hint and its input tokens (its blocks run between the main ones,
    so their intermediates are the main blocks')."""
    cfg_ = model.cfg
    b = batch * (2 if cfg else 1)
    s = (height // 16) * (width // 16) + caption_tokens + 64
    item = torch.finfo(model.compute_dtype).bits // 8
    # x, residual, qkv (3), attention out, norms + w1, w3, silu·w3
    per_token = cfg_.dim * (8 + 3 * controls) + cfg_.ffn_hidden * 3
    return int(1.25 * b * s * per_token * item) + 64 * 1024**2


@dataclass
class OffloadPlan:
    """Which blocks stay on the compute device; the rest stream in ``prefetch`` blocks ahead."""

    mode: str
    device: torch.device
    budget: int | None
    resident: list[int]
    streamed: list[int]
    fixed_bytes: int  # embedders, final layer, pad tokens: always on the device
    resident_bytes: int
    streamed_bytes: int  # bytes copied per forward pass
    buffer_bytes: int  # device room for blocks in flight
    activation_bytes: int
    prefetch: int = 2
    notes: list[str] = field(default_factory=list)
    shortfall: int = 0  # bytes the budget lacks for the smallest plan (fixed modules, activations, blocks in flight)

    @property
    def peak_bytes(self) -> int:
        return self.fixed_bytes + self.resident_bytes + self.buffer_bytes + self.activation_bytes

    def summary(self) -> dict:
        return {
            "mode": self.mode, "device": str(self.device),
            "budget_gb": None if self.budget is None else round(self.budget / GB, 4),
            "resident_gb": round((self.fixed_bytes + self.resident_bytes) / GB, 4),
            "streamed_gb_per_step": round(self.streamed_bytes / GB, 4),
            "resident_blocks": len(self.resident), "streamed_blocks": len(self.streamed),
            "activations_gb": round(self.activation_bytes / GB, 4), "peak_gb": round(self.peak_bytes / GB, 4),
            "prefetch": self.prefetch,
        }

    def describe(self) -> str:
        s = self.summary()
        text = (f"{s['resident_gb']:.2f} GB resident ({s['resident_blocks']} blocks), {s['streamed_gb_per_step']:.2f} GB "
                f"streamed per model call ({s['streamed_blocks']} blocks, prefetch {self.prefetch}), peak ≈ {s['peak_gb']:.2f} GB")
        return text + ("; " + "; ".join(self.notes) if self.notes else "")


def spread(n: int, k: int) -> list[int]:
    """k of n indices, evenly spread (so every streamed block has resident neighbours to hide its copy)."""
    if k <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def plan_offload(model, *, mode: str = "auto", budget: int | None = None, free_bytes: int | None = None,
                 activations: int = 0, prefetch: int = 2, device: torch.device | str | None = None) -> OffloadPlan:
    """Plan for ``model`` (anything with ``blocks()``): ``budget``/``free_bytes`` in bytes for weights and activations.

    auto: use ``free_bytes`` (what the device has free); budget: use ``budget``; resident: everything on
    the device; min_vram: only the small fixed modules resident, every block streamed one ahead.
    """
    if mode not in MODES:
        raise ZImageError(f"unknown offload mode {mode!r}; choose one of {', '.join(MODES)}.")
    blocks = model.blocks()
    sizes = [module_bytes(b) for b in blocks]
    fixed = sum(_bytes(_get(*slot)) for slot in fixed_slots(model, blocks))  # packed weights, fp8 scales, buffers
    total = sum(sizes)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    biggest = max(sizes, default=0)
    n = len(blocks)
    if mode == "resident" or (mode == "auto" and free_bytes is None):
        return OffloadPlan(mode, dev, budget, list(range(n)), [], fixed, total, 0, 0, activations, 0)
    shortfall = 0
    if mode == "min_vram":
        cap, prefetch, resident = None, 1, []
    else:
        cap = budget if mode == "budget" else free_bytes
        if cap is None:
            raise ZImageError("offload mode 'budget' needs a budget in GB.")
        if cap - fixed - activations >= total:
            return OffloadPlan(mode, dev, cap, list(range(n)), [], fixed, total, 0, 0, activations, 0)
        room = cap - fixed - activations - (prefetch + 1) * biggest
        if room < 0 and prefetch > 1:
            prefetch = 1
            room = cap - fixed - activations - 2 * biggest
            notes.append("prefetch lowered to 1 to fit the budget")
        shortfall = max(0, -room)
        if room < 0:
            notes.append(f"the budget of {cap / GB:.2f} GB is below the minimum of about "
                         f"{(fixed + activations + 2 * biggest) / GB:.2f} GB (fixed modules, activations, two blocks in "
                         "flight): this plan needs more than the budget, and may run out of memory")
        k = 0
        while k < n and sum(sizes[i] for i in spread(n, k + 1)) <= room:
            k += 1
        resident = spread(n, k)
    streamed = [i for i in range(len(blocks)) if i not in set(resident)]
    res_bytes = sum(sizes[i] for i in resident)
    buf = (prefetch + 1) * max((sizes[i] for i in streamed), default=0) if streamed else 0
    return OffloadPlan(mode, dev, cap, resident, streamed, fixed, res_bytes, sum(sizes[i] for i in streamed), buf,
                       activations, prefetch, notes, shortfall)


def plan_with_sides(model, sides, *, mode: str = "auto", budget: int | None = None, free_bytes: int | None = None,
                    activations: int = 0, prefetch: int = 2, device=None) -> list[OffloadPlan]:
    """Plans for ``model`` and its side models (Fun ControlNets: anything with ``blocks()``) under ONE budget, in that
    order. Everything resident when it fits. Else the side models stream first: a control block runs at most once a
    forward, and not at all outside its start/end range, so its copy is paid only when used, while a transformer
    block runs every forward. Each side keeps its fixed modules and room for its blocks in flight; the transformer
    plans with what is left, and room it does not need goes back to the sides' blocks. The peaks add up to at most
    the budget (activations counted once, with the transformer's), unless the transformer's plan has a shortfall."""
    if mode not in MODES:
        raise ZImageError(f"unknown offload mode {mode!r}; choose one of {', '.join(MODES)}.")
    cap = budget if mode == "budget" else free_bytes

    def at(m, c, acts=0, mode=mode):
        return plan_offload(m, mode=mode, budget=c, free_bytes=c, activations=acts, prefetch=prefetch, device=device)

    if not sides or mode in ("resident", "min_vram") or cap is None:
        return [at(m, cap, activations if m is model else 0) for m in (model, *sides)]
    whole = [at(m, None, mode="resident") for m in (model, *sides)]
    if sum(p.peak_bytes for p in whole) + activations <= cap:
        return [at(m, cap, activations if m is model else 0) for m in (model, *sides)]
    side = []
    for m, p in zip(sides, whole[1:]):  # streamed: fixed modules and prefetch + 1 blocks in flight (fewer stay resident)
        side.append(at(m, p.fixed_bytes + (prefetch + 1) * max((module_bytes(b) for b in m.blocks()), default=0)))
    main = at(model, cap - sum(p.peak_bytes for p in side), activations)
    left = cap - main.peak_bytes - sum(p.peak_bytes for p in side) if not main.streamed else 0
    for i, m in enumerate(sides):
        if left > 0:
            more = at(m, side[i].peak_bytes + left)
            left -= more.peak_bytes - side[i].peak_bytes
            side[i] = more
    return [main, *side]


class Ledger:
    """Bytes currently placed on the compute device by the executor, and the peak (the test instrument)."""

    def __init__(self):
        self.now = 0
        self.peak = 0

    def add(self, n: int):
        self.now += n
        self.peak = max(self.peak, self.now)

    def sub(self, n: int):
        self.now -= n


def _packed(m: nn.Module) -> Packed | None:
    w = m.__dict__.get("weight")
    return w if isinstance(w, Packed) else None


def _slots(module: nn.Module, recurse: bool = True):
    """(module, name, kind) for every tensor a module holds: parameters, buffers, packed weights, fp8 scales,
    LoRA patches."""
    for m in module.modules() if recurse else [module]:
        if _packed(m) is not None:
            yield m, "weight", "attr"
        for name, p in m._parameters.items():
            if p is not None:
                yield m, name, "param"
        for name, b in m._buffers.items():
            if b is not None:
                yield m, name, "buffer"
        if getattr(m, "weight_scale", None) is not None:
            yield m, "weight_scale", "attr"
        if getattr(m, "patches", None):
            yield m, "patches", "attr"


def fixed_slots(model, blocks):
    """The slots of everything outside the streamed blocks and the host-only modules: always on the device."""
    inside = {id(m) for b in blocks for m in b.modules()}
    inside |= {id(m) for h in getattr(model, "host_modules", list)() for m in h.modules()}
    for m in model.modules():
        if id(m) not in inside:
            yield from _slots(m, recurse=False)


def _get(m, name, kind):
    return m._parameters[name] if kind == "param" else m._buffers[name] if kind == "buffer" else getattr(m, name)


def _set(m, name, kind, value):
    if kind == "param":
        m._parameters[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    elif kind == "buffer":
        m._buffers[name] = value
    else:
        setattr(m, name, value)


def _bytes(v) -> int:
    if isinstance(v, list):  # LoRA patches: [(down or None, up, factor)]
        return sum(tensor_bytes(d) + tensor_bytes(u) for d, u, _ in v)
    return tensor_bytes(v)


def _tensors(v) -> list[torch.Tensor]:
    """The tensors one slot value holds (for record_stream)."""
    if isinstance(v, list):
        return [t for d, u, _ in v for t in (d, u) if t is not None]
    return list(v.tensors.values()) if isinstance(v, Packed) else [v]


def _move(v, device: torch.device, non_blocking: bool = False):
    """A copy of v on ``device`` (a real clone when the device is the CPU, so the CPU ledger counts real bytes)."""
    if isinstance(v, list):
        return [(None if d is None else _move(d, device, non_blocking), _move(u, device, non_blocking), f) for d, u, f in v]
    if isinstance(v, Packed):
        return v.map(lambda t: _move(t, device, non_blocking))
    if device.type == "cpu" and v.device.type == "cpu":
        return v.clone()
    return v.to(device, non_blocking=non_blocking)


def _to_host(v, pin: bool):
    if isinstance(v, list):
        return [(None if d is None else _to_host(d, pin), _to_host(u, pin), f) for d, u, f in v]
    if isinstance(v, Packed):
        return v.map(lambda t: _to_host(t, pin))
    v = v if v.device.type == "cpu" else v.cpu()
    return v.pin_memory() if pin and not v.is_pinned() else v


class BlockStreamer(Executor):
    """Executes a plan. Fixed modules and resident blocks live on the device; streamed blocks live in (pinned)
    host memory and are copied in ``prefetch`` blocks ahead of use on a side stream, then released.

    ``attach()`` installs it as the model's executor (blocks.py); ``detach()`` returns every tensor to the host
    and gives the model its plain executor back.
    """

    def __init__(self, model, plan: OffloadPlan, ledger: Ledger | None = None, cyclic: bool = True):
        self.model, self.plan = model, plan
        self.device = plan.device
        self.ledger = ledger or Ledger()
        self.blocks = model.blocks()
        self.index = {id(b): i for i, b in enumerate(self.blocks)}
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.cyclic = cyclic  # prefetch the first streamed blocks of the next call while the last ones run
        self.inflight: dict[int, tuple[list, object]] = {}
        # released copies whose memory the GPU may still be reading (record_stream keeps it allocated until then)
        self.retiring: list[torch.cuda.Event] = []
        self.order: list[int] | None = None  # the streamed blocks the current forward runs, in order
        self.finished = True  # the last forward ran its last streamed block (else its copies are stale)
        self.host: dict[int, list] = {}  # streamed block → its host tensors, in slot order
        self.copied_bytes = 0
        self.attached = False
        self.sides: list[BlockStreamer] = []  # the control models' streamers (plan_with_sides): detached with this one

    def _fixed_slots(self):
        return fixed_slots(self.model, self.blocks)

    def _place(self, slots) -> None:
        for m, n, k in slots:
            v = _get(m, n, k)
            if isinstance(v, (list, Packed)) or v.device != self.device or self.device.type == "cpu":
                v = _move(v, self.device)
                _set(m, n, k, v)
            self.ledger.add(_bytes(v))

    def attach(self) -> BlockStreamer:
        self._place(list(self._fixed_slots()))
        streamed = set(self.plan.streamed)
        for i, blk in enumerate(self.blocks):
            if i in streamed:
                self._demote(i, count=False)
            else:
                self._place(list(_slots(blk)))
        self.model.executor = self
        self.attached = True
        return self

    def _demote(self, i: int, count: bool = True) -> None:
        host = []
        for m, n, k in _slots(self.blocks[i]):
            v = _get(m, n, k)
            if count:
                self.ledger.sub(_bytes(v))
            h = _to_host(v, self.cuda)
            _set(m, n, k, h)
            host.append(h)
        self.host[i] = host

    def _promote(self, i: int) -> None:
        self.host.pop(i)
        self._place(list(_slots(self.blocks[i])))

    def replan(self, plan: OffloadPlan) -> None:
        """Switch plans in place (ComfyUI asked for memory back, or gave more)."""
        self.drop_inflight()
        old = set(self.plan.streamed)
        new = set(plan.streamed)
        self.plan = plan
        for i in range(len(self.blocks)):
            if i in new and i not in old:
                self._demote(i)
            elif i in old and i not in new:
                self._promote(i)

    def detach(self) -> None:
        """Every tensor back to host memory (the side models' too); the model's executor is the plain one again."""
        if not self.attached:
            return
        for side in self.sides:
            side.detach()
        self.sides = []
        self.drop_inflight()
        for m, n, k in _slots(self.model):
            _set(m, n, k, _to_host(_get(m, n, k), False))
        self.ledger.sub(self.ledger.now)
        self.host.clear()
        self.model.executor = PLAIN
        self.attached = False

    @property
    def static(self) -> bool:
        """Nothing streamed: blocks run where they sit, as with the plain executor."""
        return not self.host

    @property
    def placed_bytes(self) -> int:
        return self.ledger.now + sum(s.placed_bytes for s in self.sides)

    # ---- streaming --------------------------------------------------------------------------------
    def begin(self, blocks) -> None:
        """A forward starts: only the blocks it runs are prefetched, and copies an interrupted forward left in
        flight (or prefetched for blocks this one skips, such as an Omni model's SigLIP refiners) are released
        first, so the device never holds more than the plan's blocks in flight."""
        order = [i for i in (self.index.get(id(b)) for b in blocks) if i is not None and i in self.host]
        keep = set(order[: self.plan.prefetch + 1]) if self.finished and self.cyclic else set()
        for i in [i for i in self.inflight if i not in keep]:
            self._release(i)
        self.order, self.finished = order, not order

    def _prefetch(self, i: int) -> None:
        if i in self.inflight or i not in self.host or len(self.inflight) > self.plan.prefetch:
            return
        if self.cuda:
            self._bound_retiring()
            # No wait on the compute stream: the host copies are never written, and the device memory a copy
            # lands in is handed out by the allocator only after record_stream'd compute on it has finished.
            with torch.cuda.stream(self.copy_stream):
                dev = [_move(v, self.device, non_blocking=True) for v in self.host[i]]
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
        else:
            dev, ev = [_move(v, self.device) for v in self.host[i]], None
        n = sum(_bytes(v) for v in dev)
        self.copied_bytes += n
        self.ledger.add(n)
        self.inflight[i] = (dev, ev)

    def _release(self, i: int) -> None:
        dev, _ = self.inflight.pop(i)
        self.ledger.sub(sum(_bytes(v) for v in dev))

    def _bound_retiring(self) -> None:
        """Before a new copy is allocated: copies released on the host stay allocated until the GPU has run the
        compute that reads them, and the host runs ahead of the GPU by many blocks; wait (host side) for the oldest
        until no more than ``prefetch + 1`` copies are alive, counting the new one. (H100, full model at 1024²: the
        12 GB plan peaks at 11.71 GB against 11.86 planned, the 8 GB plan at 7.64 against 7.82.)"""
        self.retiring = [e for e in self.retiring if not e.query()]
        while self.retiring and len(self.retiring) + len(self.inflight) > self.plan.prefetch:
            self.retiring.pop(0).synchronize()

    def drop_inflight(self) -> None:
        for side in self.sides:
            side.drop_inflight()
        for i in list(self.inflight):
            self._release(i)

    def run(self, block, fn, *args):
        i = self.index.get(id(block))
        if i is None or i not in self.host:
            return fn(*args)
        order = self.order if self.order is not None and i in self.order else self.plan.streamed
        pos = order.index(i)
        ahead = (order + order)[pos : pos + 1 + self.plan.prefetch] if self.cyclic else order[pos : pos + 1 + self.plan.prefetch]
        for j in ahead:
            self._prefetch(j)
        while i not in self.inflight:  # blocks run out of the announced order: make room for this one
            self._release(next(iter(self.inflight))) if len(self.inflight) > self.plan.prefetch else self._prefetch(i)
        dev, ev = self.inflight[i]
        self.finished = pos == len(order) - 1
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        slots = list(_slots(block))
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        for (m, n, k), v in zip(slots, dev):
            if stream is not None:  # keep each copy's memory from reuse until the compute using it is done
                for tensor in _tensors(v):
                    tensor.record_stream(stream)
            _set(m, n, k, v)
        try:
            return fn(*args)
        finally:
            for (m, n, k), v in zip(slots, self.host[i]):
                _set(m, n, k, v)
            self._release(i)
            if stream is not None:
                done = torch.cuda.Event()
                done.record(stream)
                self.retiring.append(done)


def offload(model, *, mode: str = "auto", budget_gb: float | None = None, device=None, width: int = 1024,
            height: int = 1024, batch: int = 1, cfg: bool = False, prefetch: int = 2,
            free_bytes: Callable[[torch.device], int] | int | None = None, ledger: Ledger | None = None,
            sides=()) -> BlockStreamer:
    """Plan and attach streaming for ``model`` in one call (the standalone pipeline and tests use this). ``sides``:
    its control models, planned under the same budget (``plan_with_sides``) and attached as ``streamer.sides``."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    acts = activation_bytes(model, width, height, batch, cfg, controls=len(sides)) \
        if hasattr(model, "cfg") and hasattr(model.cfg, "ffn_hidden") else 0
    free = free_bytes(dev) if callable(free_bytes) else free_bytes
    if free is None and mode == "auto" and dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0] - 512 * 1024**2
    plan, *side = plan_with_sides(model, list(sides), mode=mode, budget=None if budget_gb is None else int(budget_gb * GB),
                                  free_bytes=free, activations=acts, prefetch=prefetch, device=dev)
    for m, p in zip((model, *sides), (plan, *side)):
        (log.warning if p.shortfall else log.info)("Z-Image offload plan (%s): %s", type(m).__name__, p.describe())
    st = BlockStreamer(model, plan, ledger).attach()
    st.sides = [BlockStreamer(m, p).attach() for m, p in zip(sides, side)]
    return st
