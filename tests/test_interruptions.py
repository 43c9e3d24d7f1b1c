"""Interrupting a run at every point of a step: checkpoint step_N holds exactly the state after N
steps, metrics.jsonl records 1..N once each, and the resumed run is bit-identical to one that was
never interrupted (#12). The points are enumerated (tools/harness/faults.py), not sampled."""

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
from megads.cli import main as cli_main
from megads.train.stopping import Interrupted
from megads.train.trainer import train
from megads.train.metrics import MEASURED_FIELDS
from test_train import tiny_config
from tools.harness.faults import POINTS, install

REPO = Path(__file__).resolve().parents[1]
STEPS = ["train.max_steps=5", "train.eval_every=1", "train.eval_batches=1", "train.keep_checkpoints=0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_config(out, cache_dir, *STEPS, "train.save_every=0"), log=lambda *_: None)
    return out


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED_FIELDS} for line in lines]


def assert_same_run(run_dir, reference):
    assert records(run_dir) == records(reference)  # every value, exactly; each step once
    mine = ShardedReader(list_checkpoints(run_dir / "checkpoints")[-1] / "model")
    theirs = ShardedReader(list_checkpoints(reference / "checkpoints")[-1] / "model")
    assert sorted(mine.keys()) == sorted(theirs.keys())
    for name in mine.keys():
        assert torch.equal(mine.get(name), theirs.get(name)), name


@pytest.fixture
def fault():
    armed = []

    def arm(spec):
        armed.append(install(spec))

    yield arm
    for injector in armed:
        injector.remove()


@pytest.mark.parametrize("point", POINTS)
def test_sigterm_at_every_point_saves_that_step_and_resumes_exactly(point, tmp_path, cache_dir, uninterrupted, fault):
    # The save point is only reached when a save is due: then the step's checkpoint must still be complete.
    save_every = "train.save_every=3" if point == "save" else "train.save_every=0"
    cfg = tiny_config(tmp_path, cache_dir, *STEPS, save_every)
    fault(f"sigterm@{point}:3")
    with pytest.raises(Interrupted) as stop:
        train(cfg, log=lambda *_: None)
    assert (stop.value.step, stop.value.exit_status) == (3, 143)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_3"]
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
    train(cfg, log=lambda *_: None)
    assert_same_run(tmp_path, uninterrupted)


def test_ctrl_c_saves_like_sigterm_and_a_second_one_stops_at_once(tmp_path, cache_dir, uninterrupted, fault):
    cfg = tiny_config(tmp_path, cache_dir, *STEPS, "train.save_every=0")
    fault("sigint@optimizer:2")
    with pytest.raises(Interrupted) as stop:
        train(cfg, log=lambda *_: None)
    assert (stop.value.step, stop.value.exit_status) == (2, 130)
    fault("sigint@forward:4")
    fault("sigint@backward:4")  # the second Ctrl-C of the same run: no waiting for the step to end
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda *_: None)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_2"]
    train(cfg, log=lambda *_: None)
    assert_same_run(tmp_path, uninterrupted)


def run_megads(args, env_fault, cwd=REPO, timeout=120):
    env = {**os.environ, "MEGADS_FAULT": env_fault, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "tools" / "harness" / "faults.py"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def overrides(tmp_path, cache_dir, *extra):
    """`megads train CONFIG` arguments for the tiny run in `tmp_path` (its config file beside it)."""
    config = tmp_path.parent / f"{tmp_path.name}.yaml"
    config.write_text(dump_config(tiny_config(tmp_path, cache_dir, *STEPS, "train.num_threads=1", *extra)))
    return ["train", str(config)]


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_every_point_resumes_exactly(point, tmp_path, cache_dir, uninterrupted):
    """SIGKILL runs no handler: the latest complete checkpoint (step 2) and the records after it are
    what a restart finds; it redoes step 3 on. (The save point: killed while writing step_4.)"""
    done = run_megads(overrides(tmp_path, cache_dir, "train.save_every=2"), f"kill@{point}:{4 if point == 'save' else 3}")
    assert done.returncode == -9, done.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_2"]
    train(tiny_config(tmp_path, cache_dir, *STEPS, "train.save_every=2"), log=lambda *_: None)
    assert_same_run(tmp_path, uninterrupted)
    assert not list((tmp_path / "checkpoints").glob(".step_*"))  # the killed save's partial directory is gone


def test_sigterm_to_the_command_exits_with_its_documented_status(tmp_path, cache_dir):
    done = run_megads(overrides(tmp_path, cache_dir, "train.save_every=0"), "sigterm@backward:2")
    assert done.returncode == 143, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("megads train: stopped by SIGTERM after step 2; saved ") and "step_2" in last


def test_a_crash_loses_nothing_before_the_last_checkpoint(tmp_path, cache_dir, uninterrupted, fault):
    cfg = tiny_config(tmp_path, cache_dir, *STEPS, "train.save_every=2")
    fault("crash@router_bias:4")
    with pytest.raises(RuntimeError, match="injected crash"):
        train(cfg, log=lambda *_: None)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_2"]
    train(cfg, log=lambda *_: None)
    assert_same_run(tmp_path, uninterrupted)


def test_steps_that_keep_being_skipped_stop_the_run(tmp_path, cache_dir, capsys):
    """A learning rate so large that every update would overflow: no update is applied, and the run
    stops after train.max_skipped_steps of them instead of skipping forever."""
    args = overrides(tmp_path, cache_dir, "train.max_steps=20", "train.lr=1e38", "train.min_lr=0",
                     "train.max_skipped_steps=3", "train.save_every=0")
    assert cli_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the last 3 steps were all skipped" in err[0] and "train.max_skipped_steps" in err[0]
    assert [r["skipped"] for r in records(tmp_path)] == [True, True, True]
    assert list_checkpoints(tmp_path / "checkpoints") == []
