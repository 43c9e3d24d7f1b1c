"""Run a function on N local processes joined in one process group: the harness of multi-rank tests.

    from tools.harness.distributed import run_distributed

    def check_all_reduce(scale):          # module level, so child processes can import it
        x = torch.ones(2) * scale
        dist.all_reduce(x)
        return x.tolist()

    assert run_distributed(check_all_reduce, world_size=2, args=(3.0,)) == [[6.0, 6.0]] * 2

Each rank runs `fn(*args, **kwargs)` with the default process group initialised (gloo on CPU:
nothing needs a GPU), `torch.set_num_threads(num_threads)` applied, and returns its value, which
comes back to the caller in rank order. Failures are loud and bounded:

- an exception on any rank raises DistributedTestError in the caller with that rank's traceback
  (the first failure first; ranks that then fail or hang in a collective waiting for the dead
  rank are reported after it and stopped);
- a rank that runs longer than `timeout_s` prints every thread's Python stack and exits, and the
  caller raises with those stacks, so a deadlock fails the test instead of blocking CI;
- a rank that dies without a word (segfault, os._exit) is reported with its exit code.

Rendezvous is race-free: the caller hosts the TCPStore on a port the OS picks (port 0) and
children connect to it, so there is no "find a free port, then hope nobody takes it" window.
Children start from a fork server that has already imported torch, so starting N ranks costs a
fork each rather than N fresh torch imports (seconds each on a small machine). As with any
non-fork start method, `fn` must be importable (defined at module level) and a script calling
run_distributed needs the `if __name__ == "__main__":` guard (pytest modules need nothing).
"""

from __future__ import annotations

import faulthandler
import importlib.util
import multiprocessing
import os
import pickle
import queue
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

_HOST = "127.0.0.1"
_STARTUP_ALLOWANCE_S = 30.0  # process start and imports, on top of timeout_s, before the caller gives up
_FAILURE_GRACE_S = 5.0  # after one rank fails, how long the others get to finish or report


class DistributedTestError(AssertionError):
    """One or more ranks failed, crashed or timed out. `failures` maps rank -> what happened.

    An AssertionError so that test runners report it as a test failure, like the assertion inside
    the child that usually causes it.
    """

    def __init__(self, message: str, failures: dict[int, str]):
        super().__init__(message)
        self.failures = failures


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple = (), kwargs: dict | None = None, *,
                    timeout_s: float = 60.0, backend: str = "gloo", num_threads: int = 1,
                    start_method: str = "forkserver") -> list[Any]:
    """Run fn(*args, **kwargs) on `world_size` new processes in one process group; their results by rank.

    `fn`, its arguments and its results must be picklable (fn defined at module level).
    `timeout_s` bounds each rank's run (process-group set-up plus fn).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}.")
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # Takes effect when the fork server starts (the first run in this process); harmless after.
        ctx.set_forkserver_preload(_preload_modules())

    # The caller hosts the rendezvous store: the OS picks a free port and it stays ours.
    store = dist.TCPStore(_HOST, 0, None, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as tmp:
        messages = ctx.Queue()
        hang_files = [os.path.join(tmp, f"rank{rank}.stacks") for rank in range(world_size)]
        procs = [ctx.Process(target=_child_main, name=f"rank{rank}", daemon=True,
                             args=(fn, args, kwargs or {}, rank, world_size, store.port, backend, timeout_s,
                                   num_threads, messages, hang_files[rank]))
                 for rank in range(world_size)]
        try:
            for p in procs:
                p.start()
            _collect(procs, hang_files, messages, results, failures, timeout_s)
        finally:
            _stop(procs)
            messages.close()
        # Ranks that never reported: say why, with the stacks they printed if they timed out.
        for rank, p in enumerate(procs):
            if rank not in results and rank not in failures:
                failures[rank] = _silent_rank(p, hang_files[rank], timeout_s, others_failed=bool(failures))
    del store

    if failures:
        # Root causes first: when one rank dies or hangs, its peers fail in their next collective
        # with gloo's "connection closed/reset by peer", which only says that someone else failed.
        order = sorted(failures, key=lambda rank: _is_peer_failure(failures[rank]))
        name = getattr(fn, "__qualname__", repr(fn))
        parts = [f"run_distributed({name}, world_size={world_size}): rank(s) {order} failed "
                 f"(likely cause first)."]
        for rank in order:
            parts.append(f"\n---------------- rank {rank} ----------------\n{failures[rank].rstrip()}")
        raise DistributedTestError("\n".join(parts), failures)
    return [results[rank] for rank in range(world_size)]


def _preload_modules() -> list[str]:
    """Modules the fork server imports once so that no child pays for them.

    torch.fx.experimental.symbolic_shapes (and sympy with it, ~2 s) is imported lazily by the first
    `tensor.backward(gradient)` / `torch.autograd.backward(outputs, grads)` in a process: every
    child that runs such a backward would pay it. pytest is what test modules import first.
    """
    modules = ["torch", "torch.distributed", "torch.fx.experimental.symbolic_shapes"]
    # megatron-core's parallel_state (process-group layout) takes seconds to import.
    if importlib.util.find_spec("megatron") is not None:
        modules.append("megatron.core.parallel_state")
    return modules + [name for name in ("pytest",) if name in sys.modules]


def _collect(procs, hang_files, messages, results, failures, timeout_s):
    """Read the ranks' reports until all arrived, the deadline passed, or a failure stopped the run."""
    deadline = time.monotonic() + timeout_s + _STARTUP_ALLOWANCE_S
    first_failure_at = None
    dead_since: dict[int, float] = {}
    while len(results) + len(failures) < len(procs):
        now = time.monotonic()
        if now > deadline or (first_failure_at is not None and now - first_failure_at > _FAILURE_GRACE_S):
            return
        try:
            rank, ok, payload = messages.get(timeout=0.1)
        except queue.Empty:
            # A rank that exited without a report (timed out, killed by a signal): give the queue a
            # moment, since its last message may still be in flight, then count it as failed.
            for rank, p in enumerate(procs):
                if rank in results or rank in failures or p.is_alive():
                    continue
                if now - dead_since.setdefault(rank, now) > 1.0:
                    failures[rank] = _silent_rank(p, hang_files[rank], timeout_s, others_failed=bool(failures))
                    first_failure_at = first_failure_at or now
            continue
        if ok:
            results[rank] = pickle.loads(payload)
        else:
            failures[rank] = payload
            first_failure_at = first_failure_at or time.monotonic()


def _silent_rank(p, hang_file: str, timeout_s: float, others_failed: bool) -> str:
    """Why a rank sent no report."""
    stacks = _read(hang_file)
    if stacks:
        return f"timed out after {timeout_s:g} s; its threads were at:\n{stacks}"
    if p.exitcode not in (None, 0):
        return f"died with exit code {p.exitcode} without reporting (a crash, a signal or os._exit)"
    if others_failed:
        return "stopped after another rank failed (probably waiting for it in a collective)"
    return f"did not finish within {timeout_s:g} s (+{_STARTUP_ALLOWANCE_S:g} s to start) and printed no stacks"


def _stop(procs, grace_s: float = 2.0):
    """Let finishing children exit (within grace_s in all); terminate, then kill, the rest."""
    procs = [p for p in procs if p.pid is not None]  # p.start() may have failed part-way
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=grace_s)
        if p.is_alive():
            p.kill()
            p.join()


_PEER_FAILURE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "stopped after another rank failed")


def _is_peer_failure(text: str) -> bool:
    """Whether a failure report looks like a consequence of another rank failing."""
    return any(marker in text for marker in _PEER_FAILURE_MARKERS)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _child_main(fn, args, kwargs, rank, world_size, port, backend, timeout_s, num_threads, messages, hang_file):
    # If this rank is still running after timeout_s, print every thread's stack to a file the
    # caller reads, and exit: a hang becomes a failure that says where it hung.
    stacks = open(hang_file, "w")
    faulthandler.dump_traceback_later(timeout_s, exit=True, file=stacks)
    torch.set_num_threads(num_threads)
    try:
        if backend == "nccl":
            from parallel.context import device_for
            device_for(rank)  # NCCL needs each rank on its own device, made current before init
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        payload = pickle.dumps(fn(*args, **kwargs))  # pickled here so an unpicklable result is this rank's error
        messages.put((rank, True, payload))
    except BaseException:  # noqa: BLE001 - everything, including KeyboardInterrupt, goes to the caller
        messages.put((rank, False, traceback.format_exc()))
    finally:
        faulthandler.cancel_dump_traceback_later()
        stacks.close()
        if dist.is_initialized():
            dist.destroy_process_group()
