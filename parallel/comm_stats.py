"""Count what torch.distributed collectives move: calls and bytes per collective, measured, not modelled.

    from parallel.comm_stats import count_collectives

    with count_collectives(group_labels={topo.tp_group: "tp", topo.dp_group: "dp"}) as stats:
        train_step(model, optimizer, cfg, step, batches, topo)
    stats.bytes("all_reduce")          # this rank's all-reduce payload during the block
    stats.by_kind()                    # {"all_reduce": OpStats(calls, bytes, seconds), "all_gather": ...}
    print(stats.table())

How: for the duration of the block every collective function of torch.distributed listed in
`COLLECTIVES` is replaced by a counting wrapper that calls the original. Code that calls
`dist.all_reduce(...)` (attribute access, as parallel/*.py does) is counted. Code that bound the
function to a name of its own before the block (`from torch.distributed import all_reduce`, or
`_all_gather_single = dist.all_gather_single` as parallel/tensor.py and parallel/data.py do at
import time) would bypass a patch of `torch.distributed` alone, so on entry every loaded module
outside `torch` is scanned and module-level names bound to an original are re-pointed to its
wrapper too (and restored on exit). References held elsewhere (in a dict, a closure, an object
attribute) are not found: such calls are not counted.

Bytes, per call, from the calling rank's point of view (the collective's payload, not an estimate
of what an algorithm puts on the wire; element size x number of elements):

- all_reduce, broadcast, reduce: the tensor (`tensor.nbytes`);
- all_gather_single / all_gather_into_tensor: the gathered output (group size x the input);
  all_gather (list form): the sum of the output list;
- reduce_scatter_single / reduce_scatter_tensor: the input being reduced (group size x the
  output); reduce_scatter (list form): the sum of the input list;
- all_to_all_single: the whole input, i.e. the sum of the input splits this rank sends, its own
  split included; all_to_all (list form): the sum of the input list;
- gather, scatter: this rank's tensor (its contribution / its share);
- send / isend: the tensor sent; recv / irecv: the tensor received;
- batch_isend_irecv: each P2POp in the list is counted as one isend or irecv call (with its
  tensor's bytes) and the batch itself as one `batch_isend_irecv` call of 0 bytes, so summing
  bytes over all names never counts anything twice;
- barrier: 0 bytes.

With these definitions a ring all-reduce of n bytes puts about 2(p-1)/p * n bytes on each rank's
wire, an all-gather or reduce-scatter (p-1)/p * n, an all-to-all n minus the rank's own split.

A call is counted when it returns (async_op calls when issued); a call that raises is not. A
collective that torch.distributed implements by calling another public one (the deprecated
all_gather_into_tensor calls all_gather_single) counts once, under the name that was called.
`seconds` is the wall time spent inside the call: for async_op calls and for NCCL (asynchronous
with respect to the host) it is the issue time only, not the transfer time.

The wrappers are created once and stay valid after the block (they then just call the original),
so a reference taken inside the block keeps working. Point-to-point: torch checks `P2POp.op`
against its own `isend` / `irecv`, so those are patched in torch.distributed.distributed_c10d as
well; P2POps created before the block and committed inside it (or the reverse) are handled.
Nested blocks each see the calls made while they are open. Thread-safe counting (NCCL backward
runs collectives on autograd's device threads).
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

# Every name torch.distributed may define that this module counts (those it lacks are skipped).
COLLECTIVES = (
    "all_reduce", "broadcast", "reduce",
    "all_gather", "all_gather_into_tensor", "all_gather_single",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
    "all_to_all", "all_to_all_single",
    "gather", "scatter",
    "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "barrier",
)

# Collective names -> kind (the operation, whatever API spelling was used).
KIND = {
    "all_reduce": "all_reduce", "broadcast": "broadcast", "reduce": "reduce",
    "all_gather": "all_gather", "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
    "reduce_scatter": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "all_to_all": "all_to_all", "all_to_all_single": "all_to_all",
    "gather": "gather", "scatter": "scatter",
    "send": "send", "isend": "send", "recv": "recv", "irecv": "recv",
    "batch_isend_irecv": "p2p_batch", "barrier": "barrier",
}

# Which argument's size counts, per name: (parameter name, "tensor" | "list").
_SIZE_ARG = {
    "all_reduce": ("tensor", "tensor"), "broadcast": ("tensor", "tensor"), "reduce": ("tensor", "tensor"),
    "all_gather": ("tensor_list", "list"),
    "all_gather_into_tensor": ("output_tensor", "tensor"), "all_gather_single": ("output_tensor", "tensor"),
    "reduce_scatter": ("input_list", "list"),
    "reduce_scatter_tensor": ("input", "tensor"), "reduce_scatter_single": ("input", "tensor"),
    "all_to_all": ("input_tensor_list", "list"), "all_to_all_single": ("input", "tensor"),
    "gather": ("tensor", "tensor"), "scatter": ("tensor", "tensor"),
    "send": ("tensor", "tensor"), "recv": ("tensor", "tensor"),
    "isend": ("tensor", "tensor"), "irecv": ("tensor", "tensor"),
}

WORLD_LABEL = "world"


@dataclass
class OpStats:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def __iadd__(self, other: "OpStats") -> "OpStats":
        self.calls += other.calls
        self.bytes += other.bytes
        self.seconds += other.seconds
        return self


class CollectiveStats:
    """What the collectives of a block moved on this rank. Picklable (plain numbers and strings).

    `records[(name, group_label)]` -> OpStats. The group label is the one given in
    count_collectives(group_labels=...), "world" for the default group, else "size<N>".
    """

    def __init__(self, records: Optional[dict[tuple[str, str], OpStats]] = None):
        self.records: dict[tuple[str, str], OpStats] = dict(records or {})
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"records": self.records}

    def __setstate__(self, state):
        self.records = state["records"]
        self._lock = threading.Lock()

    def _add(self, name: str, label: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            entry = self.records.get((name, label))
            if entry is None:
                entry = self.records[(name, label)] = OpStats()
            entry.calls += 1
            entry.bytes += nbytes
            entry.seconds += seconds

    # ------------------------------------------------------------ views

    def _grouped(self, key: Callable[[str, str], Any]) -> dict[Any, OpStats]:
        out: dict[Any, OpStats] = {}
        for (name, label), s in sorted(self.records.items()):
            out.setdefault(key(name, label), OpStats()).__iadd__(s)
        return out

    def by_name(self) -> dict[str, OpStats]:
        """Per torch.distributed function name (e.g. "all_gather_single")."""
        return self._grouped(lambda name, label: name)

    def by_kind(self) -> dict[str, OpStats]:
        """Per operation ("all_gather" covers all_gather_single, all_gather_into_tensor, all_gather)."""
        return self._grouped(lambda name, label: KIND.get(name, name))

    def by_group(self) -> dict[tuple[str, str], OpStats]:
        """Per (kind, group label)."""
        return self._grouped(lambda name, label: (KIND.get(name, name), label))

    def calls(self, name: Optional[str] = None, label: Optional[str] = None) -> int:
        """Calls of `name` (a function name or a kind; None: all), on group `label` (None: any)."""
        return sum(s.calls for (n, l), s in self.records.items() if _match(n, l, name, label))

    def bytes(self, name: Optional[str] = None, label: Optional[str] = None) -> int:
        """Bytes of `name` (a function name or a kind; None: all), on group `label` (None: any)."""
        return sum(s.bytes for (n, l), s in self.records.items() if _match(n, l, name, label))

    @property
    def total_bytes(self) -> int:
        return self.bytes()

    def merge(self, other: "CollectiveStats") -> "CollectiveStats":
        """Add `other`'s counts to this one (e.g. the steps of a run); returns self."""
        for key, s in other.records.items():
            self.records.setdefault(key, OpStats()).__iadd__(s)
        return self

    def as_dict(self) -> dict[str, dict[str, float]]:
        """{name: {"calls", "bytes", "seconds"}} (JSON-friendly)."""
        return {name: vars(s).copy() for name, s in self.by_name().items()}

    def table(self, per: float = 1.0, title: str = "") -> str:
        """A text table per (kind, group): calls, MB, seconds, each divided by `per` (e.g. steps)."""
        rows = [f"{title}" if title else None,
                f"{'collective':<16}{'group':<10}{'calls':>10}{'MB':>12}{'seconds':>10}"]
        for (kind, label), s in self.by_group().items():
            rows.append(f"{kind:<16}{label:<10}{s.calls / per:>10.1f}{s.bytes / per / 1e6:>12.3f}"
                        f"{s.seconds / per:>10.4f}")
        rows.append(f"{'total':<26}{self.calls() / per:>10.1f}{self.total_bytes / per / 1e6:>12.3f}"
                    f"{sum(s.seconds for s in self.records.values()) / per:>10.4f}")
        return "\n".join(r for r in rows if r is not None)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}: {s.calls} calls, {s.bytes} B" for n, s in self.by_name().items())
        return f"CollectiveStats({inner})"


def _match(name: str, label: str, want_name: Optional[str], want_label: Optional[str]) -> bool:
    return ((want_name is None or want_name == name or want_name == KIND.get(name))
            and (want_label is None or want_label == label))


# ============================================================================ patching machinery

_state_lock = threading.RLock()
_active: list["_Counter"] = []  # open count_collectives blocks, outermost first
_depth = threading.local()  # per thread: > 0 while inside a wrapped call (nested calls are not counted)
_originals: dict[str, Callable] = {}  # name -> the torch.distributed function wrapped
_wrappers: dict[str, Callable] = {}  # name -> its counting wrapper (created once, kept)
_signatures: dict[str, inspect.Signature] = {}
_patches: list[tuple[Any, str, Callable]] = []  # (namespace, attribute, previous value) to restore


class _Counter:
    def __init__(self, stats: CollectiveStats, group_labels: Optional[Mapping[Any, str]]):
        self.stats = stats
        # ProcessGroups are hashable, but a mapping keyed by identity is what we mean.
        self.labels: dict[int, str] = {}
        for group, label in (group_labels or {}).items():
            if group is None:
                continue
            key = id(group)
            self.labels[key] = label if key not in self.labels or self.labels[key] == label \
                else f"{self.labels[key]}/{label}"  # one group object in two roles

    def label(self, group) -> str:
        if group is None:
            group = dist.GroupMember.WORLD  # what torch.distributed uses for group=None
        found = self.labels.get(id(group))
        if found is not None:
            return found
        if group is None or group is dist.GroupMember.WORLD:
            return WORLD_LABEL
        try:
            return f"size{dist.get_world_size(group)}"
        except Exception:  # noqa: BLE001 - a group this rank is not in
            return "other"


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _payload(name: str, bound: inspect.BoundArguments) -> int:
    spec = _SIZE_ARG.get(name)
    if spec is None:
        return 0
    arg, form = spec
    value = bound.arguments.get(arg)
    if form == "list":
        return sum(_nbytes(t) for t in (value or ()))
    return _nbytes(value)


def _record(name: str, group, nbytes: int, seconds: float) -> None:
    for counter in list(_active):
        counter.stats._add(name, counter.label(group), nbytes, seconds)


def _make_wrapper(name: str, original: Callable) -> Callable:
    signature = _signatures[name] = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if name == "isend" and "group_src" in kwargs and "group_dst" not in kwargs:
            # torch's batch_isend_irecv keys the peer by `op.op is isend`; a P2POp holding this
            # wrapper committed outside a counting block would get group_src: it means group_dst.
            kwargs["group_dst"] = kwargs.pop("group_src")
        depth = getattr(_depth, "value", 0)
        if not _active or depth:
            return original(*args, **kwargs)
        _depth.value = depth + 1
        try:
            if name == "batch_isend_irecv":
                return _batch_isend_irecv(original, *args, **kwargs)
            started = time.perf_counter()
            result = original(*args, **kwargs)
            elapsed = time.perf_counter() - started
        finally:
            _depth.value = depth
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # the call worked, so this cannot happen; never break a collective over it
            return result
        _record(name, bound.arguments.get("group"), _payload(name, bound), elapsed)
        return result

    wrapper.__comm_stats_original__ = original
    return wrapper


def _batch_isend_irecv(original: Callable, p2p_op_list, *args, **kwargs):
    """Count each P2POp as an isend / irecv, run the batch, count the batch as one call of 0 bytes."""
    iswrap, irwrap = _wrappers.get("isend"), _wrappers.get("irecv")
    isorig, irorig = _originals.get("isend"), _originals.get("irecv")
    ops = list(p2p_op_list) if isinstance(p2p_op_list, (list, tuple)) else []
    # torch compares op.op with distributed_c10d.isend (our wrapper while counting): re-point
    # P2POps created before the block at the wrappers for this call, and put them back after.
    swapped = []
    for op in ops:
        current = getattr(op, "op", None)
        if current is isorig and iswrap is not None:
            swapped.append((op, current))
            op.op = iswrap
        elif current is irorig and irwrap is not None:
            swapped.append((op, current))
            op.op = irwrap
    started = time.perf_counter()
    try:
        result = original(p2p_op_list, *args, **kwargs)
    finally:
        for op, previous in swapped:
            op.op = previous
    elapsed = time.perf_counter() - started
    for op in ops:
        kind = "isend" if getattr(op, "op", None) in (isorig, iswrap) else "irecv"
        _record(kind, getattr(op, "group", None), _nbytes(getattr(op, "tensor", None)), 0.0)
    group = getattr(ops[0], "group", None) if ops else None
    _record("batch_isend_irecv", group, 0, elapsed)
    return result


def _ensure_wrappers() -> None:
    for name in COLLECTIVES:
        if name in _wrappers or not hasattr(dist, name):
            continue
        original = getattr(dist, name)
        original = getattr(original, "__comm_stats_original__", original)
        _originals[name] = original
        _wrappers[name] = _make_wrapper(name, original)


def _patch_all() -> None:
    _ensure_wrappers()
    by_id = {id(orig): _wrappers[name] for name, orig in _originals.items()}

    def patch(namespace, attr: str, value) -> None:
        wrapper = by_id.get(id(value))
        if wrapper is not None and value is not wrapper:
            _patches.append((namespace, attr, value))
            setattr(namespace, attr, wrapper)

    for name in _originals:
        patch(dist, name, getattr(dist, name, None))
    # P2POp validates op against distributed_c10d's own isend / irecv.
    c10d = sys.modules.get("torch.distributed.distributed_c10d")
    if c10d is not None:
        for name in ("isend", "irecv"):
            patch(c10d, name, getattr(c10d, name, None))
    # Module-level aliases (`from torch.distributed import x`, `_f = dist.x`) outside torch itself.
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name == __name__ or module_name == "torch" or module_name.startswith("torch."):
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            if callable(value) and id(value) in by_id:
                patch(module, attr, value)


def _unpatch_all() -> None:
    while _patches:
        namespace, attr, previous = _patches.pop()
        if getattr(getattr(namespace, attr, None), "__comm_stats_original__", None) is previous:
            setattr(namespace, attr, previous)
        # else: someone replaced our wrapper inside the block; leave theirs in place


def patched_names() -> list[str]:
    """`module.attribute` names currently re-pointed at counting wrappers (for checks and debugging)."""
    with _state_lock:
        return [f"{getattr(ns, '__name__', type(ns).__name__)}.{attr}" for ns, attr, _ in _patches]


@contextmanager
def count_collectives(group_labels: Optional[Mapping[Any, str]] = None) -> Iterator[CollectiveStats]:
    """Count the torch.distributed collectives this process calls inside the block.

    `group_labels`: {ProcessGroup: label} to tell groups apart in the records (e.g. the
    Topology's tp/dp/ep groups); the default group is "world", others "size<N>". Yields a
    CollectiveStats that is filled while the block runs and final when it exits.
    """
    stats = CollectiveStats()
    counter = _Counter(stats, group_labels)
    with _state_lock:
        if not _active:
            _patch_all()
        _active.append(counter)
    try:
        yield stats
    finally:
        with _state_lock:
            _active.remove(counter)
            if not _active:
                _unpatch_all()


def topology_group_labels(topo) -> dict[Any, str]:
    """{group: label} for a parallel.topology.Topology's groups (a group in several roles gets "a/b")."""
    labels: dict[Any, str] = {}
    pairs = [("tp", topo.tp_group), ("pp", topo.pp_group), ("dp", topo.dp_group), ("ep", topo.ep_group),
             ("edp", topo.edp_group), ("stage", topo.stage_group)]
    by_id: dict[int, tuple[Any, list[str]]] = {}
    for label, group in pairs:
        if group is not None:
            by_id.setdefault(id(group), (group, []))[1].append(label)
    for group, names in by_id.values():
        labels[group] = "/".join(names)
    return labels
