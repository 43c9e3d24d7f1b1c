"""`megads convert-checkpoint SRC DST --set parallel.KEY=VALUE ...`: a checkpoint for another layout.

A checkpoint holds the model and AdamW's moments as full tensors by parameter name (each rank takes
its shard when loading), so no tensor needs resharding: conversion checks the new layout against the
model before anything runs, verifies every file of the source, and writes `DST/checkpoints/step_N`
(a fresh manifest) with `DST/config.yaml`, so that `megads train` with `train.output_dir=DST` and
the new layout resumes there. Checkpoints written before the moments were stored this way hold
per-rank optimizer shards, which only their own layout can load: those are refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from megads.config import ConfigError, dump_config, load_config
from megads.shards import CheckpointFormatError
from megads.train.checkpoint import checkpoint_step, finalize_directory, resolve_checkpoint, verify_checkpoint
from parallel.zero1_checkpoint import MOMENTS


def convert_checkpoint(source: str | Path, target: str | Path, overrides: list[str], log=print) -> Path:
    """Write the latest checkpoint of `source` (a checkpoint or run directory) for the layout that
    `overrides` (parallel.* only) set, as the run directory `target`; returns the new checkpoint."""
    ckpt = resolve_checkpoint(source)
    if any(not o.startswith("parallel.") for o in overrides):
        raise ConfigError("convert-checkpoint changes the layout only: every --set must be parallel.KEY=VALUE.")
    cfg = load_config(ckpt / "config.yaml", overrides)  # the new layout against the model's sizes
    if not (ckpt / "optimizer" / f"{MOMENTS[0]}.safetensors.index.json").is_file():
        raise CheckpointFormatError(
            f"{ckpt} holds per-rank optimizer shards (written before checkpoints were layout-free): resume it "
            f"once under its own layout, and convert the checkpoint that run saves.")
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} already exists and is not empty; refusing to overwrite it.")
    verify_checkpoint(ckpt)
    step_dir = target / "checkpoints" / ckpt.name
    tmp = target / "checkpoints" / f".{ckpt.name}.tmp"
    log(f"converting {ckpt} -> {step_dir} (layout: {', '.join(overrides) or 'unchanged'})")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ckpt, tmp, ignore=shutil.ignore_patterns("COMPLETE"))
        cfg.train.output_dir = str(target)
        (tmp / "config.yaml").write_text(dump_config(cfg))
        finalize_directory(tmp, step_dir, checkpoint_step(ckpt))
        (target / "config.yaml").write_text(dump_config(cfg))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    log(f"done: resume with train.output_dir={target} and the same --set values")
    return step_dir
