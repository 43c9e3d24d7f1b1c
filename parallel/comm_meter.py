"""Count what the runtime's collectives move: calls, bytes and seconds per kind and per group, measured.

    from parallel.comm_meter import count_collectives

    with count_collectives(ctx) as stats:       # a ParallelContext, a Group, or Groups
        train_step(model, optimizer, cfg, step, batches)
    stats.bytes("all_reduce")                   # this rank's all-reduce payload during the block
    stats.bytes("all_gather", "dp")             # ... of one kind on one group (by the Group's name)
    stats.by_kind()                             # {"all_reduce": OpStats(calls, bytes, seconds), ...}
    print(stats.table())

How: every collective of the runtime is a method of a `parallel.group.Group`, which calls its
``observer`` (if set) after the collective with ``(kind, nbytes, seconds, group)``. For the
duration of the block each Group given gets an observer that records into the yielded
`CollectiveStats` and then calls the observer the Group had before (so blocks nest: an inner
block's collectives are seen by the outer one too); on exit the previous observer is put back.
Nothing in torch.distributed is patched, and nothing here is global: only the observers of the
Groups given change, only while the block is open.

What is counted: the collectives issued through the Groups given (for a ParallelContext, its
groups tp, pp, dp, ep, edp, stage and model, and whatever holds them: the model's layers, the
optimizer, the pipeline executor). A Group built elsewhere, or a direct call of torch.distributed,
is not counted; the backward lane of an overlapped F&B pair issues through the same Group objects
(on their twins), so it is.

Kinds are the Group's: "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast",
"gather", "all_gather_object", "barrier", "send_recv". Bytes are the payload as the calling rank
sees it (parallel/group.py: the tensor for all-reduce and broadcast, the gathered output for
all-gather, the reduced input for reduce-scatter, the whole input for all-to-all, the tensors of a
point-to-point batch), not an estimate of the wire: a ring all-reduce of n bytes puts about
2(p-1)/p * n on each rank's wire, an all-gather or reduce-scatter (p-1)/p * n, an all-to-all n
minus the rank's own split. `seconds` is the wall time of the call: for async calls (the ZeRO-1
reduce-scatters) and under NCCL (asynchronous to the host) the issue time only.

Groups are labelled by their ``name`` (a ParallelContext's are "tp", "pp", ...; an unnamed Group
is "unnamed"); two Groups given with one name share its records. Counting is thread-safe (under
NCCL backward collectives run on autograd's device threads).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from parallel.group import Group

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "gather", "all_gather_object",
         "barrier", "send_recv")


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

    `records[(kind, group_label)]` -> OpStats; the label is the Group's name.
    """

    def __init__(self, records: Optional[dict[tuple[str, str], OpStats]] = None):
        self.records: dict[tuple[str, str], OpStats] = dict(records or {})
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"records": self.records}

    def __setstate__(self, state):
        self.records = state["records"]
        self._lock = threading.Lock()

    def add(self, kind: str, label: str, nbytes: int, seconds: float) -> None:
        """Record one call."""
        with self._lock:
            entry = self.records.get((kind, label))
            if entry is None:
                entry = self.records[(kind, label)] = OpStats()
            entry.calls += 1
            entry.bytes += nbytes
            entry.seconds += seconds

    # ------------------------------------------------------------ views

    def _grouped(self, key: Callable[[str, str], Any]) -> dict[Any, OpStats]:
        out: dict[Any, OpStats] = {}
        for (kind, label), s in sorted(self.records.items()):
            out.setdefault(key(kind, label), OpStats()).__iadd__(s)
        return out

    def by_kind(self) -> dict[str, OpStats]:
        """Per kind ("all_reduce", "all_gather", ...), over all groups."""
        return self._grouped(lambda kind, label: kind)

    def by_label(self) -> dict[str, OpStats]:
        """Per group label, over all kinds."""
        return self._grouped(lambda kind, label: label)

    def by_group(self) -> dict[tuple[str, str], OpStats]:
        """Per (kind, group label)."""
        return self._grouped(lambda kind, label: (kind, label))

    def _sum(self, field: str, kind: Optional[str], label: Optional[str]):
        return sum(getattr(s, field) for (k, l), s in self.records.items()
                   if (kind is None or kind == k) and (label is None or label == l))

    def calls(self, kind: Optional[str] = None, label: Optional[str] = None) -> int:
        """Calls of `kind` (None: all) on the group labelled `label` (None: any)."""
        return self._sum("calls", kind, label)

    def bytes(self, kind: Optional[str] = None, label: Optional[str] = None) -> int:
        """Bytes of `kind` (None: all) on the group labelled `label` (None: any)."""
        return self._sum("bytes", kind, label)

    def seconds(self, kind: Optional[str] = None, label: Optional[str] = None) -> float:
        """Seconds inside calls of `kind` (None: all) on the group labelled `label` (None: any)."""
        return self._sum("seconds", kind, label)

    @property
    def total_bytes(self) -> int:
        return self.bytes()

    def merge(self, other: "CollectiveStats") -> "CollectiveStats":
        """Add `other`'s counts to this one (e.g. the steps of a run); returns self."""
        for key, s in other.records.items():
            self.records.setdefault(key, OpStats()).__iadd__(s)
        return self

    def as_dict(self) -> dict[str, dict[str, float]]:
        """{kind: {"calls", "bytes", "seconds"}} (JSON-friendly)."""
        return {kind: vars(s).copy() for kind, s in self.by_kind().items()}

    def table(self, per: float = 1.0, title: str = "") -> str:
        """A text table per (kind, group): calls, MB, seconds, each divided by `per` (e.g. steps)."""
        rows = [f"{title}" if title else None,
                f"{'collective':<18}{'group':<10}{'calls':>10}{'MB':>12}{'seconds':>10}"]
        for (kind, label), s in self.by_group().items():
            rows.append(f"{kind:<18}{label:<10}{s.calls / per:>10.1f}{s.bytes / per / 1e6:>12.3f}"
                        f"{s.seconds / per:>10.4f}")
        rows.append(f"{'total':<28}{self.calls() / per:>10.1f}{self.total_bytes / per / 1e6:>12.3f}"
                    f"{self.seconds() / per:>10.4f}")
        return "\n".join(r for r in rows if r is not None)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}[{l}]: {s.calls} calls, {s.bytes} B" for (k, l), s in self.by_group().items())
        return f"CollectiveStats({inner})"


GroupsArg = Union[Group, Iterable[Group], Any]  # Any: an object with .groups() (a ParallelContext)


def _groups_of(groups: GroupsArg) -> list[Group]:
    """The distinct Groups of a ParallelContext (anything with ``groups()``), one Group, or an iterable of them."""
    if isinstance(groups, Group):
        found = [groups]
    elif hasattr(groups, "groups") and callable(groups.groups):
        found = list(groups.groups())
    else:
        found = list(groups)
    out, seen = [], set()
    for g in found:
        if not isinstance(g, Group):
            raise TypeError(f"count_collectives counts parallel.group.Groups, got {type(g).__name__}.")
        if id(g) not in seen:
            seen.add(id(g))
            out.append(g)
    return out


def _observer(stats: CollectiveStats, label: str, previous: Optional[Callable]) -> Callable:
    def observe(kind: str, nbytes: int, seconds: float, group: Group) -> None:
        stats.add(kind, label, nbytes, seconds)
        if previous is not None:
            previous(kind, nbytes, seconds, group)
    return observe


@contextmanager
def count_collectives(groups: GroupsArg) -> Iterator[CollectiveStats]:
    """Count the collectives issued through `groups` (a ParallelContext, a Group or an iterable of
    Groups) inside the block. Yields a CollectiveStats that fills while the block runs and is final
    when it exits; each Group's previous observer keeps being called, and is restored on exit."""
    stats = CollectiveStats()
    installed: list[tuple[Group, Optional[Callable], Callable]] = []
    try:
        for group in _groups_of(groups):
            previous = group.observer
            mine = _observer(stats, group.name or "unnamed", previous)
            group.observer = mine
            installed.append((group, previous, mine))
        yield stats
    finally:
        for group, previous, mine in reversed(installed):
            if group.observer is mine:
                group.observer = previous
            # else: someone replaced our observer inside the block; leave theirs in place
