"""MFU in every run (#13 item 2): the FLOP model's count over the step's time, against the device's
peak (GPUs: a datasheet table; CPUs: an FP32 GEMM peak measured once and cached)."""

import json

import pytest
import torch

import megads.train.device_peak as device_peak_module
from megads.train.device_peak import gpu_peak
from megads.train.flops import training_flops_per_step
from megads.train.telemetry import GpuTelemetry
from megads.train.trainer import train
from test_train import tiny_config


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_record_has_tflops_and_mfu_from_the_flop_model(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", "train.max_steps=2", "train.save_every=0")
    lines = []
    train(cfg, log=lines.append)
    cached = json.loads((tmp_path / "cache" / "cpu_gemm_peak.json").read_text())
    (peak,) = cached.values()
    assert any("measured this CPU's FP32 GEMM peak" in line for line in lines)
    for r in records(tmp_path / "run"):
        achieved = training_flops_per_step(cfg) / r["step_time_s"]
        assert r["tflops_per_device"] == pytest.approx(achieved / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(achieved / peak, rel=1e-9)
        assert 0 < r["mfu"] < 1 and r["peak_host_memory_gb"] > 0
        assert "gpu" not in r  # no GPU is not an error: the fields are absent

    # The peak is measured once per machine: a second run reads the cache.
    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(device_peak_module, "measure_cpu_gemm_flops", no_measuring)
    train(tiny_config(tmp_path / "again", tmp_path / "cache", "train.max_steps=1", "train.save_every=0"),
          log=lambda *_: None)
    assert records(tmp_path / "again")[0]["mfu"] > 0


@pytest.mark.parametrize("name, fp8, tflops", [
    ("NVIDIA H200", False, 989.4), ("NVIDIA H200", True, 1978.9), ("NVIDIA H100 80GB HBM3", True, 1978.9),
    ("NVIDIA H800", False, 989.4), ("NVIDIA B200", True, 4500.0), ("NVIDIA A100-SXM4-80GB", True, 312.0),
])
def test_gpu_peaks_come_from_the_table(name, fp8, tflops):
    assert gpu_peak(name, fp8).flops == tflops * 1e12


def test_unknown_gpus_and_no_gpu_are_not_errors():
    assert gpu_peak("NVIDIA GeForce GTX 1080", False) is None
    assert GpuTelemetry(torch.device("cpu")).sample() is None
