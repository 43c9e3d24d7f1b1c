"""How much memory a training pass keeps for its backward: the measure behind activation
recomputation (`train.recompute`), for tools and a future `megads profile`.

    from megads.train.activation_memory import measure_activation_memory

    def step():
        model.compute_loss(input_ids, labels).loss.backward()

    memory = measure_activation_memory(step)
    memory.kept, memory.peak            # bytes

Method: a ``TorchDispatchMode`` sees every op the pass runs. A tensor an op returns in storage that
none of the op's inputs had is a new allocation; one made in the forward (outside the autograd
backward) or by a recomputation in the backward (megads.model.recompute) is an activation, and a
weak reference with a callback on its storage tracks when it is freed. Live activation bytes are
therefore exact, whoever holds a storage (autograd's saved tensors, a view, a module attribute):
each storage counts once, for its whole size, as long as anything holds it.

* ``kept``: the live activation bytes when the backward starts (the first op inside the autograd
  engine): what the forward keeps for the backward, plus the forward's outputs (the loss).
* ``peak``: the most live activation bytes at any time of the pass: the forward's temporaries
  (e.g. a chunk of logits) and the tensors a recomputation rebuilds in the backward included.

Gradients, and the backward's own temporaries, are not activations and are not counted. Tensors
that existed before the pass (parameters, inputs) are never counted. Not wall-clock, not RSS:
the same pass gives the same bytes on any machine. The mode makes every op slower (a Python call
each), so measure separately from timing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megads.model import recompute

_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


@dataclass
class ActivationMemory:
    kept: int = 0        # bytes alive when the backward starts
    peak: int = 0        # most bytes alive at once during the pass


class _ActivationMeter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, weakref.ref]] = {}     # storage -> (bytes, weak reference)
        self.bytes = 0
        self.memory = ActivationMemory()
        self.in_backward = False

    def _freed(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.bytes -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        backward = _graph_task_id() != -1
        if backward and not self.in_backward:
            self.in_backward = True
            self.memory.kept = self.bytes
        if backward and not recompute.recomputing():
            return out
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if _has_storage(t)}
        for t in tree_leaves(out):
            if not _has_storage(t):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self.live:
                continue
            self.live[key] = (storage.nbytes(), weakref.ref(storage, lambda _, key=key: self._freed(key)))
            self.bytes += storage.nbytes()
        self.memory.peak = max(self.memory.peak, self.bytes)
        return out


def _has_storage(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta"


def measure_activation_memory(run_forward_backward: Callable[[], Any]) -> ActivationMemory:
    """Run one forward and backward pass (`run_forward_backward()`) and return the activation bytes it
    kept for its backward and its peak (module doc). Every op goes through Python while it runs."""
    meter = _ActivationMeter()
    with meter:
        run_forward_backward()
    if not meter.in_backward:
        meter.memory.kept = meter.bytes
    return meter.memory
