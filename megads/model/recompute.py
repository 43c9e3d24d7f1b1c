"""Activation recomputation (`train.recompute`): keep fewer activations for the backward pass and
recompute the others from what was kept, when the backward needs them.

* ``none``: autograd keeps every tensor an op saves for its backward until that backward ran.
* ``selective`` (DeepSeek-V3 report, section 3.2.3): "We recompute all RMSNorm operations and MLA
  up-projections during back-propagation, thereby eliminating the need to persistently store their
  output activations." The norms (norm.py) and MLA's up-projections (mla.py: from the latents c_q,
  c_kv and the rotated rope key to the per-head queries, keys and values that enter attention) are
  recomputed, and so are the SwiGLU activations of the dense FFNs, shared and routed experts
  (mlp.py, moe.py; section 3.3.2: "we cache the inputs of the SwiGLU operator and recompute its
  output in the backward pass"); attention itself and the GEMMs keep theirs.
* ``full``: each transformer block (block.py, MTP's included) keeps only its input and recomputes
  its whole forward in backward.

The model marks the functions: ``recompute.selective(fn, *args)`` (the norms, the up-projections, the
SwiGLUs) and
``recompute.full(fn, *args)`` (a block's forward) call ``fn(*args)`` plainly unless the forward runs
under that mode (`policy`, entered by the model's stage forward) with autograd recording. Then the
call is a *region*:

1. Inside the region every tensor autograd saves is replaced by a slot number (a
   ``saved_tensors_hooks`` pair): nothing is kept but the region's inputs.
2. Outside, under ``selective``, consumers save the region's output too: a linear saves its
   input, attention saves q, k and v, the router and the shared experts their tokens. So the policy's
   scope watches every tensor saved during the forward, and one that shares storage with a
   region's output (the output itself or a view of it) is saved as a reference to that output.
   Without this, recomputing a norm would only drop its internal tensors: its output would stay
   alive in its consumers' saved tensors. A region's input that is another region's output is
   held the same way (the up-projections' latents are the latent norms' outputs).
3. In backward, the first unpack of a slot or of an output reference reruns ``fn`` on the kept
   inputs, with autograd recording and the forward's autocast state, capturing the tensors it
   saves in order (checked against the forward's shapes and dtypes) and its outputs. Each is
   handed out once; a second request for one (the B/W split's weight pass runs the same nodes
   again, in other autograd calls) reruns ``fn``. One rerun per backward pass serves everything.

Why not ``torch.utils.checkpoint``: its non-reentrant checkpoint does steps 1 and 3, but drops the
rerun's outputs, so a norm's output saved by its consumers could not be served from the same rerun
(step 2); its selective policies (``create_selective_checkpoint_contexts``) cache ops by their
outputs inside one region, which would have to span whole blocks, with their collectives and
MoE bookkeeping, and they cache every non-recomputed op's output, also those no backward needs.

What a recomputation must respect
---------------------------------
* **Collectives.** Selective regions contain none (the SP gather of MLA's latents sits between
  the latent norms and the up-projections). A full block reissues its forward collectives (TP,
  SP, EP all-to-all) in backward, in the backward's node order, which is the same on every rank
  of a group; under DualPipe's overlap the backward half, and so the rerun, runs in the backward
  lane (twin groups). The B/W split's weight pass reruns blocks too, in creation order
  (`parallel.pipeline.weight_grad_split`), the same on every rank.
* **MoE side effects.** A rerun routes every token to the experts the forward chose (`remember`,
  `remembered`: the choices are kept with the region), and does not count expert loads, record
  or replay routing tapes, or replace the layer's balance loss (`recomputing`).
* **Determinism.** The model draws no random numbers in its forward (no dropout), so a rerun
  needs no saved RNG state and gives the forward's values exactly.

Limits: under bf16 autocast or FP8 a linear saves its own bf16 cast or FP8 codes of a norm's output,
made outside the norm's region, and those stay (tiny.yaml under bf16, measured before the SwiGLUs were
recomputed too: 27% saved where fp32 saved 29%); FP8 layers' statistics count a rerun's quantizations and GEMMs
too. Cost on tiny.yaml (fp32, 8 x 256): selective keeps 47% fewer activation bytes for about 3% more
step time, full 89% fewer for about 20% more (tools/bench_recompute.py).

Saved-tensor hooks the caller installed around the forward (an activation meter, offloading) still
see what autograd saves outside the regions (the selective scope passes it on); the regions' own
slots and the inputs they hold they do not see.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

MODES = ("none", "selective", "full")

_local = threading.local()      # per thread: .mode, .scope (the selective scope), .region (running), .rerun


def _mode() -> str:
    return getattr(_local, "mode", "none")


def recomputing() -> bool:
    """True while a region's forward reruns in backward (a layer skips its bookkeeping)."""
    return getattr(_local, "rerun", False)


def remember(key: Any, value: torch.Tensor) -> None:
    """Keep `value` (e.g. a MoE layer's expert choices, key: the layer) with the running region, for
    its rerun; nothing outside a region."""
    region = getattr(_local, "region", None)
    if region is not None and not recomputing():
        region.memory[id(key)] = value.detach()


def remembered(key: Any) -> Optional[torch.Tensor]:
    """In a rerun: what the forward remembered under `key`; else None."""
    region = getattr(_local, "region", None)
    return region.memory.get(id(key)) if region is not None and recomputing() else None


def selective(fn: Callable, *args):
    """fn(*args), recomputed in backward under ``selective`` (DeepSeek-V3's norms, up-projections, SwiGLUs)."""
    if _mode() != "selective" or not torch.is_grad_enabled():
        return fn(*args)
    region, out = _Region.run(fn, args)
    _local.scope.register(region, out)
    return out


def full(fn: Callable, *args):
    """fn(*args), recomputed in backward under ``full`` (a transformer block)."""
    if _mode() != "full" or not torch.is_grad_enabled():
        return fn(*args)
    return _Region.run(fn, args)[1]


@contextmanager
def policy(mode: str) -> Iterator[None]:
    """Run a forward under recomputation `mode` (none, selective, full): the model's stage forward
    enters it around its layers."""
    if mode not in MODES:
        raise ValueError(f"recompute mode must be one of {', '.join(MODES)}, got {mode!r}.")
    previous, previous_scope = _mode(), getattr(_local, "scope", None)
    _local.mode = mode
    try:
        _local.scope = _Scope() if mode == "selective" else None
        if _local.scope is None:
            yield
        else:
            with _local.scope.hooks():
                yield
    finally:
        _local.mode, _local.scope = previous, previous_scope


# ----------------------------------------------------------------------------- mechanism


def _tensors(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def _storage_key(t: torch.Tensor) -> Optional[int]:
    if t.layout != torch.strided or t.numel() == 0:
        return None
    return t.untyped_storage()._cdata


class _Kept:
    """A region input held as is (detached: the region never keeps the forward's graph alive)."""

    def __init__(self, t: torch.Tensor):
        self.tensor, self.requires_grad, self.version = t.detach(), t.requires_grad, t._version

    def get(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError("activation recomputation: an input of a recomputed function was modified in place "
                               "after the forward, so the recomputation would not see the forward's values.")
        return self.tensor


class _OutputRef:
    """A saved tensor that is (a view of) a region's output: recomputed, not kept."""

    def __init__(self, region: "_Region", index: int, t: torch.Tensor):
        self.region, self.index = region, index
        self.geometry = (tuple(t.shape), t.stride(), t.storage_offset())
        self.requires_grad = t.requires_grad
        region.uses[index] += 1

    def get(self) -> torch.Tensor:
        size, stride, offset = self.geometry
        return self.region.output(self.index).as_strided(size, stride, offset)


class _Rerun:
    """What one recomputation produced: the saved tensors by slot, and the outputs with their uses left."""

    def __init__(self, slots: dict[int, torch.Tensor], outputs: list[torch.Tensor], uses: list[int]):
        self.slots, self.outputs, self.uses_left = slots, outputs, list(uses)


class _Region:
    """One call of a recomputed function (module doc): its inputs, what the forward saved (shapes,
    dtypes), what layers remembered for the rerun, and the last rerun's unused results."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn = fn
        self.args = [_hold(a) if isinstance(a, torch.Tensor) else a for a in args]
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        self.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                         for d in dict.fromkeys((device, "cpu"))]
        self.autocast_cache = torch.is_autocast_cache_enabled()
        self.saved: list[tuple[torch.Size, torch.dtype]] = []
        self.memory: dict[int, torch.Tensor] = {}
        self.out_geometry: list[tuple] = []
        self.uses: list[int] = []
        self.last: Optional[_Rerun] = None

    @classmethod
    def run(cls, fn: Callable, args: tuple):
        region = cls(fn, args)
        with region._inside(rerun=False), torch.autograd.graph.saved_tensors_hooks(region._pack, region._unpack):
            out = fn(*args)
        outputs = _tensors(out)
        region.out_geometry = [(tuple(t.shape), t.stride(), t.storage_offset(), t.dtype) for t in outputs]
        region.uses = [0] * len(outputs)          # references to each output, counted as consumers save them
        return region, out

    @contextmanager
    def _inside(self, rerun: bool):
        """While the function runs (forward or rerun): nested marks run plainly, layers see the region."""
        saved = (_mode(), getattr(_local, "region", None), recomputing())
        _local.mode, _local.region, _local.rerun = "none", self, rerun
        try:
            yield
        finally:
            _local.mode, _local.region, _local.rerun = saved

    def _pack(self, t: torch.Tensor) -> int:
        self.saved.append((t.shape, t.dtype))
        return len(self.saved) - 1

    def _unpack(self, slot: int) -> torch.Tensor:
        last = self.last
        if last is None or slot not in last.slots:
            last = self._recompute()
        return last.slots.pop(slot)

    def output(self, index: int) -> torch.Tensor:
        last = self.last
        if last is None or last.uses_left[index] == 0:
            last = self._recompute()
        last.uses_left[index] -= 1
        out = last.outputs[index]
        if last.uses_left[index] == 0:
            last.outputs[index] = None
        return out

    def _recompute(self) -> _Rerun:
        args = [_unhold(a) for a in self.args]
        slots: dict[int, torch.Tensor] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            slot = len(slots)
            if slot >= len(self.saved) or (t.shape, t.dtype) != self.saved[slot]:
                raise RuntimeError(f"activation recomputation of {_name(self.fn)}: the rerun saved tensor {slot} as "
                                   f"{_describe(t)}, the forward {_describe_saved(self.saved, slot)}; the recomputed "
                                   f"function must do the same work as its forward.")
            slots[slot] = t = t.detach()
            return t          # detached: a saved output holding its own grad_fn would be a reference cycle

        with ExitStack() as stack:
            for device, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled,
                                                   cache_enabled=self.autocast_cache))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(self._inside(rerun=True))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            outputs = [t.detach() for t in _tensors(self.fn(*args))]
        if len(slots) != len(self.saved):
            raise RuntimeError(f"activation recomputation of {_name(self.fn)}: the rerun saved {len(slots)} tensors, "
                               f"the forward {len(self.saved)}; the recomputed function must do the same work.")
        for t, (shape, stride, offset, dtype) in zip(outputs, self.out_geometry):
            if (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype) != (shape, stride, offset, dtype):
                raise RuntimeError(f"activation recomputation of {_name(self.fn)}: an output changed layout.")
        self.last = _Rerun(slots, [t if uses else None for t, uses in zip(outputs, self.uses)], self.uses)
        return self.last


def _hold(t: torch.Tensor):
    """How a region keeps an input: by reference when it is a selective region's output, else as is."""
    scope = getattr(_local, "scope", None)
    ref = scope.reference(t) if scope is not None and _mode() == "selective" else None
    return ref if ref is not None else _Kept(t)


def _unhold(a):
    """A held input as the rerun takes it: a fresh leaf that requires grad as the forward's did (so
    that every op saves the same tensors)."""
    if isinstance(a, (_Kept, _OutputRef)):
        return a.get().detach().requires_grad_(a.requires_grad)
    return a


class _Scope:
    """Under ``selective``: the live outputs of the forward's regions, and the saved-tensor hooks that
    turn a saved tensor sharing storage with one of them into a reference (module doc, step 2).
    Other tensors go to the hooks that were active when the scope began (or are kept as is)."""

    def __init__(self):
        # storage -> (weak reference to the storage, region, output index, dtype, version)
        self.outputs: dict[int, tuple[weakref.ref, _Region, int, torch.dtype, int]] = {}
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)

    def register(self, region: _Region, out) -> None:
        for index, t in enumerate(_tensors(out)):
            key = _storage_key(t)
            if key is not None and self._live(key) is None:
                self.outputs[key] = (weakref.ref(t.untyped_storage()), region, index, t.dtype, t._version)

    def _live(self, key: int):
        """The entry of the output whose storage `key` is, while that storage lives (a storage freed
        since may have been reused for another tensor)."""
        entry = self.outputs.get(key)
        if entry is not None and entry[0]() is None:
            del self.outputs[key]
            return None
        return entry

    def reference(self, t: torch.Tensor) -> Optional[_OutputRef]:
        key = _storage_key(t)
        entry = self._live(key) if key is not None else None
        if entry is None:
            return None
        _, region, index, dtype, version = entry
        # Modified in place since (views share the version counter): the rerun would not give it.
        if t.dtype != dtype or t._version != version:
            return None
        return _OutputRef(region, index, t)

    @contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield
        self.outputs.clear()

    def _pack(self, t: torch.Tensor):
        ref = self.reference(t)
        if ref is not None:
            return ref
        if self.outer is not None:
            return self.outer[1], self.outer[0](t)
        # Detached: a saved output holding its own grad_fn would be a reference cycle.
        return t.detach() if t.requires_grad else t

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, _OutputRef):
            return packed.get()
        if isinstance(packed, tuple):
            unpack, value = packed
            return unpack(value)
        return packed


def _name(fn: Callable) -> str:
    owner = getattr(fn, "__self__", None)
    return f"{type(owner).__name__}.{fn.__name__}" if owner is not None else getattr(fn, "__qualname__", repr(fn))


def _describe(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {t.dtype}"


def _describe_saved(saved: list, slot: int) -> str:
    return f"as {list(saved[slot][0])} {saved[slot][1]}" if slot < len(saved) else f"only {len(saved)} tensors"
