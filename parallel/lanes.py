"""Lanes: twin process groups, so that two threads of one rank can run collectives at the same time.

A process group requires its ranks to issue their collectives in the same order. One thread per
rank gives that for free; two threads issuing collectives on one group (the forward and the
backward halves of an overlapped F&B pair, `parallel.pipeline.overlap`) interleave differently on
different ranks, and the ranks then pair the wrong collectives (wrong data, or a hang). So each
thread gets a *lane* and each lane its own copy of every group it communicates on:

* lane 0 (`FORWARD_LANE`) uses the groups themselves;
* lane 1 (`BACKWARD_LANE`) uses their *twins*: groups with the same ranks in the same order,
  created by `create_lane_twins` (a collective over the whole world, see there).

Within one lane each group still sees one thread's collectives, in the same order on every rank
(the executor runs the same ops in the same order on all ranks of a TP or EP group, which all sit
in one pipeline stage), so each group -- base or twin -- is ordered on its own.

Every collective in ``parallel/tensor.py`` and ``parallel/expert.py`` passes its group through
`lane_group`, *when it is issued*: an autograd Function stores the base group in ``ctx`` and
resolves it in its backward, which runs in whatever lane the backward runs in.

Which lane a thread is in (`current_lane`):

1. the lane set with `use_lane` in this thread, if any (the overlap runner sets lane 0 around the
   forward half and lane 1 around the backward half);
2. otherwise, while an overlap window is open (`overlap_window`: the runner opens one for the
   duration of an F&B pair) and the thread is executing an autograd backward: lane 1. This
   matters on CUDA, where the autograd engine runs the backward of CUDA ops on its own per-device
   threads, which never saw ``use_lane``; on CPU the thread that calls ``autograd.grad`` runs the
   whole graph itself and rule 1 already applies. (During a window only the backward half runs
   a backward, so "in a backward" means "the backward half".)
3. otherwise lane 0.

Outside overlap windows everything therefore runs on the base groups, exactly as without lanes.

In lane 1 a multi-rank group without a twin is an error (raised, not a silent fallback that
could interleave with lane 0 on the same group); size-1 groups never communicate and need none.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["FORWARD_LANE", "BACKWARD_LANE", "lane_group", "current_lane", "use_lane", "overlap_window",
           "create_lane_twins", "twin_of"]

FORWARD_LANE = 0
BACKWARD_LANE = 1

# base group -> its lane-1 twin (process-wide: every thread resolves through the same table)
_twins: Dict[dist.ProcessGroup, dist.ProcessGroup] = {}
_twin_set: set = set()             # the twins themselves (lane_group(twin) is the twin)
_state = threading.local()         # .lane: the lane set by use_lane in this thread (None: not set)
_windows = 0                       # open overlap windows (process-wide; opened by one thread at a time)
_windows_lock = threading.Lock()

# The id of the autograd graph task this thread is executing, -1 outside a backward (a private
# binding; without it rule 2 of the module doc is off, which only matters on CUDA).
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def current_lane() -> int:
    """The lane of the calling thread (see the module doc for the rules)."""
    lane = getattr(_state, "lane", None)
    if lane is not None:
        return lane
    if _windows and _graph_task_id() != -1:
        return BACKWARD_LANE
    return FORWARD_LANE


def lane_group(group):
    """The group to issue a collective on in the calling thread's lane: ``group`` itself in lane 0
    (and for None, size-1 groups and twins), its twin in lane 1."""
    if group is None or not _twins:        # no twins anywhere: the common, non-overlapped case
        return group
    if current_lane() == FORWARD_LANE:
        return group
    twin = _twins.get(group)
    if twin is not None:
        return twin
    if group in _twin_set or dist.get_world_size(group) == 1:
        return group
    raise RuntimeError(f"a collective on a group of ranks {dist.get_process_group_ranks(group)} was issued in "
                       f"lane {current_lane()} (the backward half of an overlapped F&B pair), but the group has "
                       "no twin: it would interleave with the forward half's collectives on the same group. "
                       "Pass it to create_lane_twins (make_overlap_runner's `groups`).")


def twin_of(group) -> Optional[dist.ProcessGroup]:
    """The lane-1 twin of ``group``, or None if it has none."""
    return _twins.get(group) if group is not None else None


@contextmanager
def use_lane(lane: int) -> Iterator[None]:
    """Run the block in ``lane`` (this thread only); restores the previous setting on exit."""
    if lane not in (FORWARD_LANE, BACKWARD_LANE):
        raise ValueError(f"lane must be {FORWARD_LANE} or {BACKWARD_LANE}, got {lane!r}.")
    previous = getattr(_state, "lane", None)
    _state.lane = lane
    try:
        yield
    finally:
        _state.lane = previous


@contextmanager
def overlap_window() -> Iterator[None]:
    """While open, a thread with no lane of its own that executes an autograd backward is in lane 1
    (rule 2 of the module doc). The overlap runner opens one around each F&B pair."""
    global _windows
    with _windows_lock:
        _windows += 1
    try:
        yield
    finally:
        with _windows_lock:
            _windows -= 1


def _ordered_ranks(group) -> Tuple[int, ...]:
    """The group's global ranks in group-rank order."""
    ranks = dist.get_process_group_ranks(group)
    return tuple(sorted(ranks, key=lambda r: dist.get_group_rank(group, r)))


def create_lane_twins(groups: Iterable) -> Dict[dist.ProcessGroup, dist.ProcessGroup]:
    """Create (and register for `lane_group`) a twin of each multi-rank group in ``groups``.

    A collective over the whole world, which every rank must call at the same point: creating a
    group (``dist.new_group``) is one, and every rank must create every group, members or not, in
    the same order. Ranks know only their own groups, so each rank's memberships (ranks in
    group-rank order, backend) are all-gathered, de-duplicated and sorted, and every rank then
    creates the same list of groups. Groups with equal membership share one twin: lane 1 is one
    thread, whose collectives on them are ordered anyway (e.g. an EP group equal to the TP group).
    None and size-1 groups get no twin. Returns ``{group: twin}`` for this rank's groups.
    A group twinned before gets a new twin (the old one stays valid for calls already in flight).
    Twins take ``new_group``'s defaults (timeout, backend options), not the base group's.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("create_lane_twins needs torch.distributed to be initialised.")
    mine: Dict[Tuple[Tuple[int, ...], str], List] = {}
    for group in groups:
        if group is None or dist.get_world_size(group) < 2:
            continue
        key = (_ordered_ranks(group), str(dist.get_backend(group)))
        mine.setdefault(key, []).append(group)
    gathered: List[Optional[list]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(mine))
    everyone = sorted({(tuple(ranks), backend) for part in gathered for ranks, backend in part})
    created = {}
    me = dist.get_rank()
    for ranks, backend in everyone:
        twin = dist.new_group(list(ranks), backend=backend)       # every rank, same order
        if me in ranks:
            created[(ranks, backend)] = twin
    result = {}
    for key, originals in mine.items():
        twin = created[key]
        if _ordered_ranks(twin) != key[0]:
            # new_group numbers the ranks in ascending order; a base group that does not would
            # give its twin different group ranks (and so different shards) on the same process.
            raise RuntimeError(f"cannot twin a group whose ranks {list(key[0])} are not in ascending group-rank "
                               f"order (its twin has {list(_ordered_ranks(twin))}).")
        for group in originals:
            result[group] = twin
    _twins.update(result)
    _twin_set.update(result.values())
    return result
