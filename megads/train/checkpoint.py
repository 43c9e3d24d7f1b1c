"""Checkpoints: `OUTPUT_DIR/checkpoints/step_N/`, written atomically, loaded safely.

Layout of one checkpoint directory (also what `megads import-hf` produces, without the training
state):

    config.yaml          the full megads config of the run
    model/               safetensors of the full (unsharded) model state, megads parameter names
    optimizer/rank_R.pt  each rank's optimizer shard (ZeRO-1; torch.save, loaded with weights_only=True)
    trainer_state.pt     step, RNG states, anything else the loop needs to resume bit for bit
    COMPLETE             JSON manifest (step, every file with its size) written last

Everything is written into a temporary sibling directory that is renamed into place only once
complete, so a crash mid-save leaves the previous checkpoint as the latest one. Loading checks the
manifest, and a missing or truncated file is an error that names it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from megads.config import Config, dump_config, load_config
from megads.shards import CheckpointFormatError, ShardedReader, ShardedWriter, merge_indexes, read_json_object
from parallel.context import ParallelContext

MANIFEST = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_manifest(directory: Path, step: Optional[int]) -> None:
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def verify_manifest(directory: Path) -> dict:
    """Raise CheckpointFormatError unless every file the manifest lists is present with its size."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointFormatError(f"{directory} is not a complete checkpoint (no {MANIFEST} manifest): "
                                    f"the save that wrote it did not finish.")
    manifest = read_json_object(manifest_path)
    files = manifest.get("files")
    if not (isinstance(files, dict) and all(isinstance(size, int) for size in files.values())):
        raise CheckpointFormatError(f"{manifest_path} is corrupt: its 'files' is not an object of file sizes.")
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointFormatError(f"Checkpoint file {path} is missing.")
        if path.stat().st_size != size:
            raise CheckpointFormatError(
                f"Checkpoint file {path} has {path.stat().st_size} bytes, the manifest says {size}: it is truncated or corrupt.")
    return manifest


def write_model_weights(directory: Path, named_tensors, max_shard_bytes: Optional[int] = None,
                        prefix: str = "model") -> None:
    kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    with ShardedWriter(directory / "model", prefix=prefix, **kwargs) as writer:
        for name, tensor in named_tensors:
            writer.add(name, tensor)


def finalize_directory(tmp: Path, final: Path, step: Optional[int]) -> None:
    """Write the manifest, flush to disk and move `tmp` to `final` (replacing an older one)."""
    write_manifest(tmp, step)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_checkpoint(checkpoints_dir: Path, step: int, cfg: Config, model, optimizer, trainer_state: dict,
                    keep: int = 0, ctx: Optional[ParallelContext] = None) -> Path:
    """Write `checkpoints_dir/step_N` (a collective: every rank calls it).

    The model is stored unsharded (gathered across tensor/expert-parallel ranks, written by rank 0),
    so any layout can resume from it; the optimizer state is stored per rank (ZeRO-1 shards).
    Under pipeline parallelism each stage's first rank writes the tensors its stages own under its
    own prefix, and rank 0 merges the indexes into one: the directory looks the same either way.
    """
    ctx = ctx or ParallelContext.single()
    final = checkpoints_dir / f"step_{step}"
    tmp = checkpoints_dir / f".step_{step}.tmp"
    if ctx.rank == 0:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "optimizer").mkdir(parents=True)
        (tmp / "config.yaml").write_text(dump_config(cfg))
    ctx.barrier()
    state = model.full_state()  # every rank iterates it: gathering shards is a collective
    prefixes = ["model"] if ctx.pp.size == 1 else [f"stage{r:03d}" for r in range(ctx.pp.size)]
    if ctx.tp.rank == 0 and ctx.dp.rank == 0:
        write_model_weights(tmp, state, prefix=prefixes[ctx.pp.rank])
    else:
        for _ in state:
            pass
    torch.save(optimizer.state_dict(), tmp / "optimizer" / f"rank_{ctx.rank:05d}.pt")
    if ctx.rank == 0:
        torch.save({"step": step, "world_size": ctx.world_size, **trainer_state}, tmp / "trainer_state.pt")
    ctx.barrier()
    if ctx.rank == 0:
        if ctx.pp.size > 1:
            merge_indexes(tmp / "model", prefixes, "model")
        finalize_directory(tmp, final, step)
        if keep > 0:
            for old in list_checkpoints(checkpoints_dir)[:-keep]:
                shutil.rmtree(old)
    ctx.barrier()
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first. Partial saves are skipped."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / MANIFEST).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest complete one under a run's output or checkpoints dir."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    for candidates in (path / "checkpoints", path):
        found = list_checkpoints(candidates)
        if found:
            return found[-1]
    raise CheckpointFormatError(f"No complete checkpoint at {path} (looked for {MANIFEST}, "
                                f"{path / 'checkpoints'}/step_N and {path}/step_N).")


def read_checkpoint_config(ckpt: Path) -> Config:
    return load_config(ckpt / "config.yaml")


def load_model_weights(ckpt: Path, model) -> None:
    """Fill `model` (of any parallel layout) from the checkpoint's full tensors, one at a time.

    Names must match exactly (a pipeline rank's stages: every name they hold must be there); each
    rank copies its own shard of every tensor.
    """
    reader = ShardedReader(ckpt / "model")
    expected = model.state_names()
    missing = sorted(expected - set(reader.keys()))
    # A pipeline rank's stages are a subset of the model: the rest is not unexpected.
    unexpected = sorted(set(reader.keys()) - expected) if model.whole_model else []
    if missing or unexpected:
        raise CheckpointFormatError(
            f"Checkpoint {ckpt} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.")
    try:
        model.load_full_state(reader.get)
    except ValueError as err:
        raise CheckpointFormatError(f"Checkpoint {ckpt}: {err}") from None


def load_checkpoint(ckpt: Path, model, optimizer, ctx: Optional[ParallelContext] = None) -> dict:
    """Restore model (and this rank's optimizer shard); returns the trainer state saved with it."""
    ctx = ctx or ParallelContext.single()
    verify_manifest(ckpt)
    load_model_weights(ckpt, model)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    if optimizer is not None:
        saved_world = int(state.get("world_size", 1))
        if saved_world != ctx.world_size:
            raise CheckpointFormatError(
                f"Checkpoint {ckpt} holds optimizer shards of {saved_world} ranks; this run has {ctx.world_size}. "
                f"Resume with the same layout (the model weights alone load into any layout).")
        optimizer.load_state_dict(torch.load(ckpt / "optimizer" / f"rank_{ctx.rank:05d}.pt", weights_only=True))
    return state
