"""Resuming on another parallel layout, optimizer included (#11): a checkpoint holds the weights and
AdamW's moments as full tensors by parameter name, so a run saved under one layout continues under
another with the losses of continuing under the saved one (relative 1e-5: layouts sum in different
orders), and `megads convert-checkpoint` moves a checkpoint to another layout offline."""

import json
import shutil

import pytest

from megads.cli import main as cli_main
from megads.train.checkpoint import list_checkpoints
from megads.train.manifest import verify_manifest
from megads.train.trainer import train
from test_train import tiny_config
from tools.harness.distributed import run_distributed

RUN = ["train.save_every=2", "train.keep_checkpoints=0", "train.global_batch_size=8", "train.num_threads=1",
       "model.num_hidden_layers=4"]
LAYOUTS = {  # name: (overrides, ranks)
    "1 rank": ([], 1),
    "tp2": (["parallel.tensor_parallel=2"], 2),
    "dp2-ep2": (["parallel.expert_parallel=2"], 2),
    "pp2": (["parallel.pipeline_parallel=2", "parallel.schedule=1f1b"], 2),
    "tp2-pp2": (["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "parallel.schedule=1f1b"], 4),
    "dp4-ep4": (["parallel.expert_parallel=4"], 4),
    "dualpipev": (["parallel.pipeline_parallel=2", "parallel.schedule=dualpipev"], 2),
}


def _train_worker(overrides):
    train(tiny_config(None, None, *overrides), log=lambda *_: None)


def run(layout, out, cache_dir, steps):
    layout_overrides, ranks = LAYOUTS[layout]
    overrides = [*RUN, *layout_overrides, f"data.cache_dir={cache_dir}", f"train.output_dir={out}",
                 f"train.max_steps={steps}"]
    if ranks == 1:
        _train_worker(overrides)
    else:
        run_distributed(_train_worker, ranks, args=(overrides,), timeout_s=300)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("saved, resumed", [("tp2", "pp2"), ("dp2-ep2", "1 rank"), ("1 rank", "tp2"),
                                            ("tp2-pp2", "dp4-ep4"), ("dp4-ep4", "pp2"), ("dualpipev", "1 rank")])
def test_resume_under_another_layout_continues_as_the_saved_layout_would(saved, resumed, tmp_path, cache_dir):
    reference, moved = tmp_path / "reference", tmp_path / "moved"
    run(saved, reference, cache_dir, 2)
    shutil.copytree(reference, moved)
    run(saved, reference, cache_dir, 4)      # continue where it was saved
    run(resumed, moved, cache_dir, 4)        # continue elsewhere
    want, got = losses(reference), losses(moved)
    assert len(got) == 4 and got[:2] == want[:2]
    assert got[2:] == pytest.approx(want[2:], rel=1e-5)


def test_convert_checkpoint_writes_a_verified_checkpoint_for_the_new_layout(tmp_path, cache_dir, capsys):
    source = tmp_path / "source"
    run("1 rank", source, cache_dir, 2)
    target = tmp_path / "target"
    assert cli_main(["convert-checkpoint", str(source), str(target), "--set", "parallel.tensor_parallel=2"]) == 0
    ckpt = list_checkpoints(target / "checkpoints")[-1]
    verify_manifest(ckpt)
    assert "tensor_parallel: 2" in (ckpt / "config.yaml").read_text()
    # A layout the model cannot take is one sentence, and nothing is written.
    bad = tmp_path / "bad"
    assert cli_main(["convert-checkpoint", str(source), str(bad), "--set", "parallel.tensor_parallel=3"]) == 2
    assert "parallel.tensor_parallel" in capsys.readouterr().err and not bad.exists()
    # The converted run resumes under its new layout.
    run("tp2", target, cache_dir, 4)
    assert [json.loads(line)["step"] for line in (target / "metrics.jsonl").read_text().splitlines()] == [3, 4]
