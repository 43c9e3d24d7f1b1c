"""Tests for `megads plot`: figures from hand-written metrics.jsonl files, and its one-sentence errors."""

import json

import pytest

from megads.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def lm_records(offset, with_mfu=False):
    records = []
    for step in range(1, 7):
        record = {"step": step, "loss": 8.0 - 0.3 * step + offset, "mtp_loss": 8.1 - 0.3 * step + offset,
                  "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 2000.0 + step, "step_time_s": 1.0,
                  "skipped": False, "skip_reason": None,
                  "expert_load_max_over_mean": {"layers.1": 1.5 + 0.1 * step, "layers.2": 2.0 - 0.1 * step}}
        if step % 2 == 0:   # per-expert loads every train.expert_load_every (2) steps; an expert may get none
            record["expert_load"] = {"layers.1": [1.5, 0.5, 1.0, 1.0], "layers.2": [0.0, 2.0, 1.0, 1.0]}
        if with_mfu:
            record.update(tflops_per_device=0.5, mfu=0.01)
        records.append(record)
    # a skipped step logs null for its non-finite values
    records[2].update(loss=None, mtp_loss=None, grad_norm=None, skipped=True, skip_reason="loss")
    records[3]["valid_loss"] = 7.0 + offset
    records[5]["valid_loss"] = 6.5 + offset
    return records


def grpo_records():
    records = [{"step": step, "loss": 0.01, "kl_ref": 0.001 * step, "entropy": 1.0, "reward_mean": 0.1 * step,
                "accuracy": 0.1 * step, "completion_length_mean": 20.0 + step, "grad_norm": 0.5, "lr": 1e-5,
                "skipped": False, "skip_reason": None} for step in range(1, 5)]
    records[1]["eval_accuracy"] = 0.3
    records[2].update(kl_ref=None, skipped=True, skip_reason="grad_norm")
    return records


def assert_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 0 and width > 0


def test_plot_writes_every_figure(tmp_path, capsys):
    write_metrics(tmp_path / "run_a", lm_records(0.0))
    write_metrics(tmp_path / "run_b", lm_records(0.2, with_mfu=True))
    write_metrics(tmp_path / "grpo", grpo_records())
    out = tmp_path / "figures"
    assert main(["plot", str(tmp_path / "run_a"), str(tmp_path / "run_b"), str(tmp_path / "grpo"),
                 "--output", str(out)]) == 0
    expected = {"loss.png", "throughput.png", "expert_load_run_a.png", "expert_load_run_b.png", "grpo_grpo.png",
                "expert_load_per_expert_run_a.png", "expert_load_per_expert_run_b.png"}
    assert {p.name for p in out.iterdir()} == expected
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(out / name) for name in expected)
    for name in expected:
        assert_png(out / name)


def test_plot_defaults_to_the_run_directory(tmp_path, capsys):
    write_metrics(tmp_path / "grpo", grpo_records())
    assert main(["plot", str(tmp_path / "grpo")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "grpo" / "plots" / "grpo_grpo.png")]
    assert_png(tmp_path / "grpo" / "plots" / "grpo_grpo.png")


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_plot_bad_input_is_one_sentence_naming_the_file(tmp_path, capsys, damage):
    run = tmp_path / "run"
    if damage == "missing":
        run.mkdir()
    else:
        write_metrics(run, lm_records(0.0))
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 7, "loss": 5.\n')  # a line cut short by a crash
    assert main(["plot", str(run), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert str(run / "metrics.jsonl") in err and len(err.splitlines()) == 1
    if damage == "damaged":
        assert "line 7" in err
    assert not (tmp_path / "out").exists()
