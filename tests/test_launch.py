"""tools/launch/ on this machine: two torchrun agents meeting over a c10d rendezvous (as two nodes
would) train exactly as one agent with all the ranks; so does the SLURM script under stand-ins for
srun and scontrol (tests/slurm_standin/); a layout that does not fit the world size is one sentence
naming the sizes, before any process group exists."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megads.config import dump_config
from megads.train.checkpoint import list_checkpoints
from megads.train.metrics import MEASURED_FIELDS
from test_train import TINY, tiny_config

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "tools" / "launch" / "torchrun_multinode.sh"
SBATCH = REPO / "tools" / "launch" / "slurm.sbatch"
STANDIN = REPO / "tests" / "slurm_standin"
# TP 2 x DP 2 on 4 ranks: on two nodes of 2, each tensor-parallel pair is one node's ranks.
RUN = [*TINY, "train.max_steps=3", "train.save_every=0", "train.num_threads=1", "train.global_batch_size=8",
       "parallel.tensor_parallel=2"]
# What the launch scripts read, so that none comes from the environment the tests run in.
LAUNCH_VARIABLES = ("NNODES", "NPROC_PER_NODE", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_BACKEND",
                    "MASTER_ADDR", "MASTER_PORT", "MAX_RESTARTS", "SHUTDOWN_TIMEOUT", "MEGADS_HOME", "MEGADS_REQUEUE")


def environment(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith(("SLURM_", "PET_"))}
    return {**env, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED_FIELDS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def finished(proc, timeout=240):
    """(exit status, output) of `proc`, started in a session of its own: all of it is killed if it hangs."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out + err


def wait_for_first_record(proc, metrics: Path, hang_after_s: float = 180) -> None:
    """Return once `metrics` has a record or `proc` has exited. A hang guard, not a speed check:
    after `hang_after_s` without either, the job is killed and the test fails saying so."""
    deadline = time.monotonic() + hang_after_s
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            _, log = finished(proc)
            pytest.fail(f"no step was logged and the job did not exit in {hang_after_s:.0f} s (hung?):\n{log[-3000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("launch") / "run.yaml"
    cache = tmp_path_factory.mktemp("data-cache")
    path.write_text(dump_config(tiny_config(path.parent / "unused", cache, *RUN)))
    return str(path)


@pytest.fixture(scope="module")
def one_agent(config, tmp_path_factory):
    """The reference: one torchrun agent with all 4 ranks."""
    out = tmp_path_factory.mktemp("one-agent")
    done = subprocess.run(["bash", str(LAUNCH), "--nproc-per-node", "4", "--max-restarts", "0",
                           "train", config, "--set", f"train.output_dir={out}"],
                          env=environment(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in records(out)] == [1, 2, 3]
    return records(out)


def test_two_agents_over_c10d_train_as_one_agent_with_all_ranks(config, one_agent, tmp_path):
    """Two processes of the launch script with node ranks 0 and 1, one endpoint and one run id, as on two nodes."""
    port = free_port()
    agents = [subprocess.Popen(["bash", str(LAUNCH), "--nnodes", "2", "--nproc-per-node", "2",
                                "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "two-agents", "--max-restarts", "0",
                                "train", config, "--set", f"train.output_dir={tmp_path}"],
                               env=environment(NODE_RANK=str(node)), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True) for node in (0, 1)]
    try:
        results = [finished(agent) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
    for status, log in results:
        assert status == 0, log[-3000:]
    assert any("layout: 4 ranks = TP 2 x DP 2" in log for _, log in results)
    assert records(tmp_path) == one_agent


def slurm_environment(out_dir, **extra):
    return environment(PATH=f"{STANDIN}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="2",
                       SLURM_JOB_NODELIST="localhost,localhost", SLURM_SUBMIT_DIR=str(REPO), NPROC_PER_NODE="2",
                       MASTER_PORT=str(free_port()), MAX_RESTARTS="0", SCONTROL_LOG=str(out_dir / "scontrol.log"),
                       **extra)


def test_the_slurm_script_trains_as_one_agent_and_requeues_itself_on_sigterm(config, one_agent, tmp_path):
    """srun's stand-in starts the script's per-node command as 2 nodes on this machine. SIGTERM to the
    batch script (what --signal=B:TERM@600 sends before the time limit) reaches every rank through srun
    and torchrun: all stop after the same step with one checkpoint, and the job requeues itself.
    (Resuming from that checkpoint is megads's own, tested in test_preemption.py.)"""
    out = tmp_path / "run"
    job = subprocess.Popen(["bash", str(SBATCH), "train", config, "--set", f"train.output_dir={out}",
                            "train.max_steps=40"],
                           env=slurm_environment(tmp_path), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    wait_for_first_record(job, out / "metrics.jsonl")
    job.send_signal(signal.SIGTERM)
    status, log = finished(job)
    assert status == 0, log[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n", log[-3000:]
    stopped_at = len(records(out))
    assert 1 <= stopped_at < 40, log[-3000:]
    assert f"stopped by SIGTERM after step {stopped_at}" in log, log[-3000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step_{stopped_at}"]
    compared = min(stopped_at, len(one_agent))
    assert records(out)[:compared] == one_agent[:compared]


def test_a_layout_that_does_not_fit_the_world_is_one_sentence_before_any_rank_starts(config, tmp_path):
    """The launch script checks the config against nnodes x nproc-per-node before torchrun starts."""
    done = subprocess.run(["bash", str(LAUNCH), "--nproc-per-node", "3", "train", config,
                           "--set", f"train.output_dir={tmp_path / 'run'}"],
                          env=environment(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("megads train: configuration error: The world size (3) must be a multiple of "
                                   "parallel.tensor_parallel x parallel.pipeline_parallel (2 x 1).")
    assert not (tmp_path / "run").exists()


def test_megads_rejects_the_layout_before_any_process_group_exists(config, tmp_path):
    """Rank 0 of a 2-rank world whose rank 1 never starts, as torchrun would start it: creating a
    process group would wait for rank 1; megads fails at once with the sentence (every rank does)."""
    env = environment(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-m", "megads.cli", "train", config, "--set", f"train.output_dir={tmp_path}",
                           "parallel.pipeline_parallel=2"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "megads train: configuration error: The world size (2) must be a multiple of parallel.tensor_parallel x "
        "parallel.pipeline_parallel (2 x 2).")
    assert "Traceback" not in done.stderr
