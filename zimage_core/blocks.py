"""How a model runs its blocks: one path that offloading, cancellation and block patches all go through.

Two parts with two owners:

* ``Executor`` — *where* blocks run. Every model owns exactly one in ``model.executor`` (the plain one by
  default). The offload streamer is the only other owner: ``BlockStreamer.attach()`` installs itself and
  ``detach()`` puts the plain one back. It places a block's weights around the block's computation, so
  LoRA run-time patches travel with the weights they patch. ``executor.device`` is where compute runs.
* ``BlockRun`` — *what happens around each block* during one forward call; the caller owns it and passes
  it in (``model(x, t, captions, run=...)``). ``cancel`` is checked before every block (the sampler's
  interrupt). ``wraps`` replace or wrap a block's computation, inside the executor's placement (ComfyUI's
  ``patches_replace`` and block wrappers): ``wrap(call, x, inner=...) -> x`` where ``inner(x)`` runs the
  original block on the call's other inputs. ``after`` hooks see each block's output:
  ``hook(call, x) -> x`` (ControlNet hints, ComfyUI's ``double_block``/``noise_refiner`` patches).

A ``BlockCall`` names the block by its stage (``noise_refiner``, ``context_refiner``, ``siglip_refiner``
or ``layers``, the model's own module names) and index, and says where each sample's image and caption
tokens sit in ``x``, so a hook never has to know the packing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .errors import ZImageInterrupted


class Executor:
    """The plain executor: blocks run where their weights are."""

    device: torch.device | None = None
    static = True  # a call places nothing: a CUDA graph of the forward stays valid (cuda_graphs.py)

    def begin(self, blocks: Sequence[nn.Module]) -> None:  # noqa: ARG002 (a streamer plans its copies)
        """A forward call starts and will run exactly ``blocks``, in this order."""

    def run(self, block: nn.Module, fn: Callable, *args):  # noqa: ARG002 (a streamer places ``block``)
        """Run ``fn(*args)`` — ``block``'s computation — with ``block``'s weights where compute happens."""
        return fn(*args)


PLAIN = Executor()


@dataclass
class BlockCall:
    """One block about to run: its stage and index, its inputs, and per sample the row slices of ``x`` that
    hold the target image's patch tokens (``"image"``) and the caption tokens (``"caption"``), where the
    stage has them."""

    stage: str
    index: int
    block: nn.Module
    x: torch.Tensor
    rope: torch.Tensor
    mask: torch.Tensor | None
    temb: object
    spans: list[dict[str, slice]]

    def original(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.rope, self.mask, self.temb)


Wrap = Callable[[BlockCall, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]
After = Callable[[BlockCall, torch.Tensor], torch.Tensor]


@dataclass
class BlockRun:
    """Per-call block hooks (see the module docstring). The default runs every block as it is."""

    cancel: Callable[[], bool] | None = None
    wraps: Sequence[Wrap] = ()
    after: Sequence[After] = ()
    cuda_graphs: bool | None = None  # may this call replay as a CUDA graph (cuda_graphs.py); None: the model's default

    def __call__(self, executor: Executor, call: BlockCall) -> torch.Tensor:
        if self.cancel is not None and self.cancel():
            raise ZImageInterrupted("sampling was interrupted")
        fn = call.original
        for w in reversed(self.wraps):  # the first wrap is the outermost
            fn = partial(w, call, inner=fn)
        x = executor.run(call.block, fn, call.x)
        for hook in self.after:
            x = hook(call, x)
        return x
