"""Where the time goes (#13 items 3 and 5): every record's time split, collectives and pipeline
bubble; torch.profiler traces of train.profile_steps; `megads profile`'s table.

Nothing here asserts a duration: the checks are on structure (phases present, summing to the step),
on exact byte counts, and on what the command prints."""

import json
from pathlib import Path

import pytest
import torch

from megads.cli import main as cli_main
from megads.config import ConfigError
from megads.profile import format_table, profile_config
from megads.train.metrics import MEASURED_FIELDS, _scalars
from megads.train.step_profile import PHASES
from megads.train.trainer import train
from test_train import TINY, read_metrics, tiny_config
from tools.harness.distributed import run_distributed

QUIET = lambda *_: None  # noqa: E731
# TINY's model and batch: hidden 32, micro-batch 2 x 32 tokens, vocabulary 512, FP32
ACTIVATION_BYTES = 2 * 32 * 32 * 4
EMBEDDING_BYTES = 512 * 32 * 4


def assert_time_split(record):
    split = record["time_s"]
    assert set(split) <= set(PHASES) and all(v >= 0 for v in split.values()), split
    inside = sum(v for k, v in split.items() if k not in ("data", "evaluation"))
    assert inside == pytest.approx(record["step_time_s"], rel=1e-9, abs=1e-9)


def test_every_record_splits_its_time_into_phases(tmp_path, cache_dir):
    train(tiny_config(tmp_path, cache_dir, "train.max_steps=2", "train.eval_every=2", "train.save_every=0"), log=QUIET)
    first, second = read_metrics(tmp_path)
    for record in (first, second):
        assert_time_split(record)
        # one rank: one stage, a plain loop of forward and full backward (BW) per micro-batch
        assert {"data", "forward", "backward", "pipeline_wait", "gradient_sync", "optimizer", "router_bias",
                "other"} <= set(record["time_s"])
        assert "weight_grad" not in record["time_s"] and "pipeline_bubble" not in record
        assert record["comm"] == {}          # no collective on one rank
    assert "evaluation" not in first["time_s"] and "evaluation" in second["time_s"]
    assert {"time_s", "comm", "pipeline_bubble"} <= MEASURED_FIELDS


def test_nested_fields_become_tensorboard_tags():
    record = {"loss": 1.5, "skipped": False, "time_s": {"forward": 0.25},
              "comm": {"all_reduce": {"calls": 3, "bytes": 96, "seconds": 0.1}}, "mtp_loss": None}
    assert dict(_scalars("", record)) == {"loss": 1.5, "time_s/forward": 0.25, "comm/all_reduce/calls": 3,
                                          "comm/all_reduce/bytes": 96, "comm/all_reduce/seconds": 0.1}


def test_profile_steps_write_torch_profiler_traces(tmp_path, cache_dir):
    train(tiny_config(tmp_path, cache_dir, "train.max_steps=3", "train.save_every=0", "train.profile_steps=[2]"),
          log=QUIET)
    assert [p.name for p in (tmp_path / "profile").iterdir()] == ["rank0.2.pt.trace.json"]
    events = json.loads((tmp_path / "profile" / "rank0.2.pt.trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    # the schedule's ops (2 micro-batches) and the step's phases are spans of the trace
    assert {"F mb0 stage0", "BW mb0 stage0", "F mb1 stage0", "BW mb1 stage0", "megads.optimizer",
            "megads.data"} <= names
    assert any(name and name.startswith("aten::mm") for name in names)


def test_profile_steps_outside_the_run_are_a_config_error(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"train.profile_steps must name steps between 1 and train.max_steps \(3\)"):
        tiny_config(tmp_path, cache_dir, "train.max_steps=3", "train.profile_steps=[4]")


def _pipeline_run(out):
    train(tiny_config(Path(out), None, "train.max_steps=2", "train.save_every=0", "parallel.pipeline_parallel=2"),
          log=QUIET)
    return read_metrics(Path(out)) if torch.distributed.get_rank() == 0 else None


def test_pipeline_records_count_the_transfers_and_the_bubble(tmp_path, cache_dir):
    records = run_distributed(_pipeline_run, 2, args=(str(tmp_path),), timeout_s=300)[0]
    for record in records:
        assert_time_split(record)
        assert {"forward", "backward", "pipeline_wait"} <= set(record["time_s"])
        assert 0 <= record["pipeline_bubble"] < 1
        # Rank 0 (stage 0) sends each of the 2 micro-batches' activations and receives their
        # gradients, then swaps embedding gradients with the last stage (tied copies): exact bytes.
        assert record["comm"]["send_recv"]["bytes"] == 2 * 2 * ACTIVATION_BYTES + 2 * EMBEDDING_BYTES
        assert record["comm"]["all_reduce"]["calls"] >= 1


def test_megads_profile_prints_one_table_with_a_column_per_value(tmp_path, cache_dir, capsys):
    overrides = [*TINY, f"data.cache_dir={cache_dir}", "train.save_every=0"]
    status = cli_main(["profile", "--set", *overrides, "--steps", "2", "--warmup", "1", "--top", "3",
                       "--vary", "train.micro_batch_size=1,2", "--json", str(tmp_path / "profile.json")])
    assert status == 0
    out = capsys.readouterr().out
    table = out[out.index("megads profile"):]
    assert "train.micro_batch_size=1" in table and "train.micro_batch_size=2" in table
    for row in ("tokens/s", "TFLOP/s per device", "MFU", "step time (ms, rank 0)", "  forward", "  backward", "  optimizer",
                "none (one rank)", "peak memory (GB, resident set; per rank)", "  rank 0"):
        assert row in table, row
    assert "top operators by self CPU time, rank 0, one step of train.micro_batch_size=2:" in table
    columns = json.loads((tmp_path / "profile.json").read_text())
    assert [c["label"] for c in columns] == ["train.micro_batch_size=1", "train.micro_batch_size=2"]
    for column in columns:
        assert column["steps"] == 2 and len(column["losses"]) == 2 and column["ranks"][0]["peak_memory_gb"] > 0
        operators = column["top_operators"]
        assert len(operators) == 3 and "aten::mm" in [op["name"] for op in operators]   # matmul-bound
        assert operators[0]["self_ms"] >= operators[1]["self_ms"] >= operators[2]["self_ms"] > 0
        assert not any(op["name"].startswith("megads.") for op in operators)
    # micro-batches change how a step is cut, not what it computes: the same losses
    assert columns[0]["losses"] == pytest.approx(columns[1]["losses"], rel=1e-5)
    assert not (Path("runs") / "tiny" / "profile").exists()   # a scratch directory, not the config's output_dir


def test_megads_profile_measures_what_recomputation_saves(cache_dir):
    overrides = [*TINY, f"data.cache_dir={cache_dir}"]
    none, selective, full = profile_config(None, overrides, steps=1, warmup=0, vary="train.recompute=none,selective,full",
                                           log=QUIET)
    kept = [c.ranks[0].activations_kept_mb for c in (none, selective, full)]
    assert kept[0] > kept[1] > kept[2] > 0          # counted allocation by allocation: exact, not RSS
    assert all(c.ranks[0].activations_peak_mb >= c.ranks[0].activations_kept_mb for c in (none, selective, full))
    assert none.losses == pytest.approx(selective.losses, rel=1e-6) == full.losses
    assert "activation memory (MB per rank: kept for the backward / peak of the pass)" in format_table(
        [none, selective, full], "title")


@pytest.mark.parametrize("args, message", [
    (["--vary", "train.recompute"], "--vary must look like SECTION.KEY=VALUE1,VALUE2"),
    (["--vary", "train.micro_batch_size=2,x"], "train.micro_batch_size must be an integer"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--top", "-1"], "--top not negative"),
])
def test_megads_profile_bad_input_is_one_sentence(args, message, capsys):
    assert cli_main(["profile", "--set", *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _profile_pipeline(cache_dir):
    overrides = [*TINY, f"data.cache_dir={cache_dir}", "parallel.pipeline_parallel=2", "parallel.schedule=zbh1"]
    return profile_config(None, overrides, steps=1, warmup=1, log=QUIET)


def test_megads_profile_reports_every_rank_under_pipeline_parallelism(cache_dir):
    results = run_distributed(_profile_pipeline, 2, args=(str(cache_dir),), timeout_s=300)
    (column,) = results[0]
    assert [r.rank for r in column.ranks] == [0, 1]
    assert all(0 <= r.pipeline_bubble < 1 and r.peak_memory_gb > 0 for r in column.ranks)
    # ZB-H1 splits the last stage's backward into B and W; the first stage runs full backwards (BW)
    assert "weight_grad" not in column.ranks[0].time_s and "weight_grad" in column.ranks[1].time_s
    table = format_table(results[0], "title")
    assert "pipeline bubble (per rank)" in table and "  rank 1" in table and "send_recv" in table
