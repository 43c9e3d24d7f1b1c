"""Checkpoint integrity (#12): damaged files are found on load and named, never trained on; saves
that cannot complete (full disk, unwritable directory) are one sentence and lose nothing written
before; the last checkpoint that verified is never deleted."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megads.config import dump_config
from megads.shards import CheckpointFormatError
from megads.train.checkpoint import CheckpointWriteError, list_checkpoints
from megads.train.manifest import MANIFEST, file_checksum, read_manifest
from megads.train.trainer import OutputDirectoryError, train
from test_train import tiny_config

REPO = Path(__file__).resolve().parents[1]
RUN = ["train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=2"]
quiet = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    """A run with checkpoints step_2 and step_4, copied fresh for each test that damages it."""
    out = tmp_path_factory.mktemp("finished")
    train(tiny_config(out, cache_dir, *RUN), log=quiet)
    return out


@pytest.fixture
def run_dir(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def resume(run_dir, cache_dir, *extra):
    return train(tiny_config(run_dir, cache_dir, *RUN, "train.max_steps=6", *extra), log=quiet)


def overwrite_middle(path: Path, data: bytes) -> None:
    """Replace bytes in the middle of `path` (its size unchanged), like a bad disk sector."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(data)


def test_manifest_lists_every_file_with_its_checksum(run_dir):
    ckpt = run_dir / "checkpoints" / "step_4"
    manifest = read_manifest(ckpt)
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest["files"]) == files and manifest["step"] == 4
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (ckpt / name).stat().st_size, "xxh3_128": file_checksum(ckpt / name)}


@pytest.mark.parametrize("victim", ["model/model-00001-of-00001.safetensors", "optimizer/exp_avg_sq-00001-of-00001.safetensors",
                                    "trainer_state.pt", "config.yaml"])
def test_damaged_file_is_named_with_the_checkpoint_to_fall_back_to(victim, run_dir, cache_dir):
    overwrite_middle(run_dir / "checkpoints" / "step_4" / victim, os.urandom(16))
    with pytest.raises(CheckpointFormatError) as err:
        resume(run_dir, cache_dir)
    message = str(err.value)
    assert f"step_4/{victim} does not match its xxh3_128 checksum" in message
    assert "previous complete checkpoint is" in message and message.count(".") >= 1 and "\n" not in message
    assert str(run_dir / "checkpoints" / "step_2") in message
    # Nothing was deleted or trained: both checkpoints and the 4 records are still there.
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_2", "step_4"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4


def test_moving_the_damaged_checkpoint_aside_resumes_from_the_previous_one(run_dir, cache_dir, finished_run):
    overwrite_middle(run_dir / "checkpoints" / "step_4" / "model" / "model-00001-of-00001.safetensors", b"\xff" * 64)
    with pytest.raises(CheckpointFormatError):
        resume(run_dir, cache_dir)
    (run_dir / "checkpoints" / "step_4").rename(run_dir / "step_4.damaged")
    resume(run_dir, cache_dir, "train.max_steps=4")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    want = [json.loads(line)["loss"] for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == want


@pytest.mark.parametrize("content, complaint", [
    (b"\x80\x81 not utf-8", "is not UTF-8"),
    (b"[1, 2]", "must hold a JSON object"),
    (b'{"step": 4, "files": ["model"]}', "does not list files with their sizes"),
    (b'{"step": 4, "files": {"../../etc/passwd": 1}}', "does not list files with their sizes"),
])
def test_damaged_manifest_is_one_sentence(content, complaint, run_dir, cache_dir):
    (run_dir / "checkpoints" / "step_4" / MANIFEST).write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=complaint) as err:
        resume(run_dir, cache_dir)
    assert str(run_dir / "checkpoints" / "step_4" / MANIFEST) in str(err.value)


@pytest.mark.parametrize("victim", ["trainer_state.pt"])
def test_garbage_torch_files_under_a_size_only_manifest_are_one_sentence(victim, run_dir, cache_dir):
    """Checkpoints written before checksums list sizes only: garbage of the right size still fails
    with a sentence naming the file (and no pickle runs: weights_only)."""
    ckpt = run_dir / "checkpoints" / "step_4"
    manifest = read_manifest(ckpt)
    path = ckpt / victim
    path.write_bytes(os.urandom(path.stat().st_size))
    manifest["files"] = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointFormatError, match="is damaged or not a torch file") as err:
        resume(run_dir, cache_dir)
    assert str(path) in str(err.value)


def test_a_failed_save_is_one_sentence_and_keeps_the_previous_checkpoint(run_dir, cache_dir, monkeypatch):
    """torch.save reports a full disk as RuntimeError ('unexpected pos'): the save fails on every
    rank with the file named, the partial directory is removed, the run stops."""
    import megads.train.checkpoint as checkpoint

    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "trainer_state" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1024 vs 960")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as err:
        resume(run_dir, cache_dir)
    message = str(err.value)
    assert message.startswith("Could not save checkpoint step_6: ") and "trainer_state.pt" in message
    assert f"the latest complete checkpoint is still {run_dir / 'checkpoints' / 'step_4'}" in message
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_2", "step_4"]
    assert not list((run_dir / "checkpoints").glob(".step_*"))
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 6  # records of the unsaved steps stay


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_cli_on_a_full_disk_exits_1_with_one_line(run_dir, cache_dir):
    """A real write failure (a file-size limit stands in for a full disk: the same errno path)."""
    config = run_dir.parent / "run.yaml"
    config.write_text(dump_config(tiny_config(run_dir, cache_dir, *RUN, "train.max_steps=6")))
    done = subprocess.run([sys.executable, "-m", "megads.cli", "train", str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, preexec_fn=_limit_file_size(100_000),
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("megads train: Could not save checkpoint step_6: ") and "File too large" in last
    assert "Traceback" not in done.stderr
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_2", "step_4"]


def test_unwritable_output_directory_is_found_before_training(tmp_path, cache_dir):
    out = tmp_path / "run"
    out.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: make the checkpoints path unusable instead
        (out / "checkpoints").write_text("a file where the checkpoints directory should be")
    else:
        out.chmod(0o500)
    with pytest.raises(OutputDirectoryError, match=r"The output directory .* is not writable \(.*\); nothing was trained"):
        train(tiny_config(out, cache_dir, *RUN), log=quiet)
    assert not (out / "metrics.jsonl").exists()
