"""Twin process groups, so that two threads of one rank can run collectives at the same time.

A process group requires its ranks to issue their collectives in the same order. One thread per
rank gives that for free; two threads issuing collectives on one group (the forward and the
backward halves of an overlapped F&B pair, `parallel.pipeline.overlap`) interleave differently on
different ranks, and the ranks then pair the wrong collectives (wrong data, or a hang). So each
thread runs in a *lane*, and the backward lane communicates on *twins*: groups with the same ranks
in the same order, created by `create_twins` (a collective over the whole world, see there) and
kept on each `Group` (``Group.twin``), which picks the one of the calling thread's lane when a
collective is issued (autograd Functions keep the Group and resolve it again in their backward).

Within one lane each group still sees one thread's collectives, in the same order on every rank
(the executor runs the same ops in the same order on all ranks of a TP or EP group, which all sit
in one pipeline stage), so each process group -- base or twin -- is ordered on its own.

Which lane a thread is in (`Lanes.in_backward_lane`):

1. the lane set with `Lanes.use` in this thread, if any (the overlap runner sets the forward lane
   around the forward half and the backward lane around the backward half);
2. otherwise, while an overlap window is open (`Lanes.window`: the runner opens one for the
   duration of an F&B pair) and the thread is executing an autograd backward: the backward lane.
   This matters on CUDA, where the autograd engine runs the backward of CUDA ops on its own
   per-device threads, which never saw `use`; on CPU the thread that calls ``autograd.grad`` runs
   the whole graph itself and rule 1 already applies. (During a window only the backward half
   runs a backward, so "in a backward" means "the backward half".)
3. otherwise the forward lane.

Outside overlap windows everything therefore runs on the base groups, exactly as without lanes.
The lane state belongs to one `ParallelContext` (its ``lanes``), shared by its groups.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

FORWARD_LANE = 0
BACKWARD_LANE = 1

# The id of the autograd graph task this thread is executing, -1 outside a backward (a private
# binding; without it rule 2 of the module doc is off, which only matters on CUDA).
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


class Lanes:
    """Which lane each thread of this process is in (see the module doc)."""

    def __deepcopy__(self, memo):
        # A handle on process-wide communication state, not data: a copied model shares it.
        return self

    def __init__(self):
        self._local = threading.local()       # .lane: set by `use` in this thread (None: not set)
        self._windows = 0                     # open overlap windows
        self._lock = threading.Lock()

    def in_backward_lane(self) -> bool:
        lane = getattr(self._local, "lane", None)
        if lane is not None:
            return lane == BACKWARD_LANE
        return self._windows > 0 and _graph_task_id() != -1

    @contextmanager
    def use(self, lane: int) -> Iterator[None]:
        """Run the block in `lane` (this thread only); restores the previous setting on exit."""
        if lane not in (FORWARD_LANE, BACKWARD_LANE):
            raise ValueError(f"lane must be {FORWARD_LANE} or {BACKWARD_LANE}, got {lane!r}.")
        previous = getattr(self._local, "lane", None)
        self._local.lane = lane
        try:
            yield
        finally:
            self._local.lane = previous

    @contextmanager
    def window(self) -> Iterator[None]:
        """While open, a thread with no lane of its own that executes an autograd backward is in the
        backward lane (rule 2 of the module doc). The overlap runner opens one around each F&B pair."""
        with self._lock:
            self._windows += 1
        try:
            yield
        finally:
            with self._lock:
                self._windows -= 1


def create_twins(groups: Iterable) -> None:
    """Give each multi-rank `Group` in `groups` a twin (``group.twin``).

    A collective over the whole world, which every rank must call at the same point: creating a
    process group (``dist.new_group``) is one, and every rank must create every group, members or
    not, in the same order. Ranks know only their own groups, so each rank's memberships (ranks in
    group-rank order, backend) are all-gathered, de-duplicated and sorted, and every rank then
    creates the same list of groups. Groups with equal membership share one twin: the backward
    lane is one thread, whose collectives on them are ordered anyway (e.g. an EP group equal to
    the TP group). Size-1 groups get none. A group twinned before gets a new twin. Twins take
    ``new_group``'s defaults (timeout, backend options), not the base group's.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("create_twins needs torch.distributed to be initialised.")
    mine: dict[tuple[tuple[int, ...], str], list] = {}
    for group in groups:
        if group.size < 2:
            continue
        mine.setdefault((tuple(group.ranks()), str(dist.get_backend(group.pg))), []).append(group)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(mine))
    everyone = sorted({(tuple(ranks), backend) for part in gathered for ranks, backend in part})
    for ranks, backend in everyone:
        twin = dist.new_group(list(ranks), backend=backend)       # every rank, same order
        if (ranks, backend) not in mine:
            continue
        # new_group numbers the ranks in ascending order; a base group that does not would give its
        # twin different group ranks (and so different shards) on the same process.
        if sorted(ranks) != list(ranks):
            raise RuntimeError(f"cannot twin a group whose ranks {list(ranks)} are not in ascending group-rank order.")
        for group in mine[(ranks, backend)]:
            group.twin = twin
