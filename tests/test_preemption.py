"""Preempting multi-rank runs (#12): a signal that reaches one rank, every rank or the launcher
stops all ranks at the same step with one consistent checkpoint, under every layout and schedule;
the resumed run is bit-identical to an uninterrupted one; `torchrun --max-restarts` resumes by
itself after a rank is killed; a dead rank never leaves the others hanging."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megads.config import dump_config
from megads.shards import ShardedReader
from megads.train.checkpoint import list_checkpoints
from megads.train.stopping import Interrupted
from megads.train.trainer import train
from megads.train.metrics import MEASURED_FIELDS
from test_train import TINY, tiny_config
from tools.harness.distributed import run_distributed

REPO = Path(__file__).resolve().parents[1]
RUN = [*TINY, "train.max_steps=5", "train.save_every=0", "train.keep_checkpoints=0", "train.num_threads=1",
       "train.global_batch_size=8", "train.eval_every=2", "train.eval_batches=2"]


def records(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED_FIELDS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    return dict(ShardedReader(list_checkpoints(run_dir / "checkpoints")[-1] / "model").items())


def assert_same_run(run_dir, reference):
    assert records(run_dir) == records(reference)
    mine, theirs = weights(run_dir), weights(reference)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def _preempted_worker(overrides, out, fault):
    """On every rank: an uninterrupted run in out/whole, then a run in out/cut that `fault` stops,
    then its resumption. Returns what the stop looked like on this rank."""
    from tools.harness.faults import install

    quiet = lambda *_: None  # noqa: E731
    train(tiny_config(Path(out) / "whole", None, *overrides), log=quiet)
    cut = tiny_config(Path(out) / "cut", None, *overrides)
    injector = install(fault)
    try:
        train(cut, log=quiet)
        stopped = None
    except Interrupted as stop:
        stopped = (stop.step, stop.exit_status, str(stop.checkpoint))
    finally:
        injector.remove()
    train(cut, log=quiet)
    return stopped


LAYOUTS = {
    # layout: (overrides, fault); a signal on one rank only, or on every rank (no rank in the fault)
    "dp2": (["parallel.expert_parallel=1"], "sigterm@backward:3:1"),
    "tp2-sp": (["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"], "sigterm@optimizer:3"),
    "ep2": (["parallel.expert_parallel=2"], "sigterm@router_bias:3:0"),
    "pp2-1f1b": (["parallel.pipeline_parallel=2", "parallel.schedule=1f1b"], "sigterm@forward:3:1"),
    "pp2-dualpipev": (["parallel.pipeline_parallel=2", "parallel.schedule=dualpipev", "train.micro_batch_size=2",
                       "model.num_hidden_layers=4"],
                      "sigterm@evaluation:4:0"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_signal_stops_every_rank_at_one_step_and_resumes_exactly(layout, tmp_path, cache_dir):
    extra, fault = LAYOUTS[layout]
    overrides = [*RUN, f"data.cache_dir={cache_dir}", *extra]
    stops = run_distributed(_preempted_worker, 2, args=(overrides, str(tmp_path), fault), timeout_s=300)
    cut, step = tmp_path / "cut", int(fault.split(":")[1])
    assert stops == [(step, 143, str(cut / "checkpoints" / f"step_{step}"))] * 2  # the same step on both ranks
    assert [p.name for p in list_checkpoints(cut / "checkpoints")] == [f"step_{step}", "step_5"]
    assert_same_run(cut, tmp_path / "whole")


def torchrun(args, fault, *, timeout=240, max_restarts=0):
    env = {**os.environ, "MEGADS_FAULT": fault, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.2",
               str(REPO / "tools" / "harness" / "faults.py"), *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def write_config(path, out, cache_dir, *extra):
    path.write_text(dump_config(tiny_config(out, cache_dir, *RUN, *extra)))
    return str(path)


def _plain_worker(overrides):
    train(tiny_config(Path(overrides[-1].split("=", 1)[1]), None, *overrides), log=lambda *_: None)


def test_torchrun_restarts_a_killed_rank_and_resumes_from_the_last_checkpoint(tmp_path, cache_dir):
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", cache_dir, "train.save_every=2")
    done = torchrun(["train", config], "kill@optimizer:4:1", max_restarts=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "step_2 (step 2)" in done.stdout
    overrides = [*RUN, f"data.cache_dir={cache_dir}", "train.save_every=2", f"train.output_dir={tmp_path / 'whole'}"]
    run_distributed(_plain_worker, 2, args=(overrides,), timeout_s=300)
    assert_same_run(tmp_path / "run", tmp_path / "whole")


def test_sigterm_to_torchrun_saves_one_checkpoint_and_exits(tmp_path, cache_dir):
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", cache_dir)
    done = torchrun(["train", config], "term_launcher@backward:3:0")
    assert done.returncode != 0  # torchrun reports that it was terminated
    assert "stopped by SIGTERM after step 3" in done.stderr, done.stderr[-3000:]
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr  # (torchrun's own is)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_3"]
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.parametrize("action", ["kill", "hang"])
def test_a_dead_or_stuck_rank_does_not_leave_the_others_hanging(action, tmp_path, cache_dir):
    """Without a launcher that notices (two plain processes): rank 1 is killed (or stopped, alive
    but silent) mid-step, and rank 0 fails with one sentence instead of waiting forever: at once
    when the connection drops, after parallel.collective_timeout_s when the peer just hangs."""
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", cache_dir, "parallel.collective_timeout_s=8")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MEGADS_FAULT": f"{action}@backward:2:1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tools" / "harness" / "faults.py"), "train", config],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _, err = procs[0].communicate(timeout=120)  # a rank 0 left hanging fails the test here
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("megads train: A ") and "another rank stopped" in last, err[-3000:]
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []
