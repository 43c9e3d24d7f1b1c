"""Checkpoints: `OUTPUT_DIR/checkpoints/step_N/`, written atomically, verified on load.

Layout of one checkpoint directory (also what `megads import-hf` produces, without the training
state):

    config.yaml          the full megads config of the run
    model/               safetensors of the full (unsharded) model state, megads parameter names
    optimizer/           AdamW's moments as full tensors by parameter name (exp_avg*, exp_avg_sq*
                         safetensors), so that any layout resumes from them; checkpoints written
                         before had each rank's ZeRO-1 shard (optimizer/rank_R.pt: same layout only)
    trainer_state.pt     step, RNG states, anything else the loop needs to resume bit for bit
    COMPLETE             JSON manifest written last: step, every file with its size and xxh3-128 checksum

`step_N` holds exactly the state after N optimizer steps (the training loop saves only between
steps). Everything is written into a temporary sibling directory that is renamed into place only
once complete, so a crash mid-save leaves the previous checkpoint as the latest one; a save that
fails (full disk, read-only directory, a non-finite weight) is an error on every rank, naming the
file, and leaves the previous checkpoint in place. Loading checks every file against the manifest
(megads.train.manifest): a missing, truncated or damaged file is an error that names it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from megads.config import Config, dump_config, load_config
from megads.errors import RunFailure
from megads.shards import CheckpointFormatError, ShardedReader, ShardedWriter, merge_indexes
from megads.train.manifest import MANIFEST, files_under, find_damage, seal_files, write_manifest
from parallel.context import ParallelContext
from parallel.group import Group
from parallel.zero1_checkpoint import MOMENTS

_STEP_DIR = re.compile(r"^step_(\d+)$")
_PARTIAL_DIR = re.compile(r"^\.step_(\d+)\.tmp$")


class CheckpointWriteError(RunFailure):
    """A checkpoint could not be written (full disk, read-only directory, non-finite weights); the
    message names the file, and the previous checkpoint is left as it was."""


def describe_error(err: BaseException, path: Optional[Path] = None) -> str:
    """One sentence for an error met while writing or reading `path`."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename or path}: {err.strerror}"
    return f"{path}: {err}" if path is not None else str(err)


def write_model_weights(directory: Path, named_tensors, max_shard_bytes: Optional[int] = None,
                        prefix: str = "model") -> None:
    write_tensors(directory / "model", prefix, named_tensors, max_shard_bytes)


def write_tensors(directory: Path, prefix: str, named_tensors, max_shard_bytes: Optional[int] = None) -> None:
    kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    with ShardedWriter(directory, prefix=prefix, **kwargs) as writer:
        for name, tensor in named_tensors:
            writer.add(name, tensor)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize_directory(tmp: Path, final: Path, step: Optional[int], entries: Optional[dict] = None) -> None:
    """Seal every file of `tmp` not in `entries` (checksum and flush), write the manifest and move
    `tmp` to `final` (replacing an older one)."""
    entries = dict(entries or {})
    entries.update(seal_files(tmp, [name for name in files_under(tmp) if name not in entries]))
    write_manifest(tmp, step, entries)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_directory(final.parent)


def _attempt(action: Callable[[], None], path: Path) -> Optional[str]:
    """Run `action`; None if it worked, else a sentence saying what failed on `path`."""
    try:
        action()
        return None
    except CheckpointFormatError as err:  # e.g. a non-finite tensor: its own sentence
        return str(err).rstrip(".")
    except Exception as err:  # torch.save reports a full disk as RuntimeError, safetensors as SafetensorError
        return describe_error(err, path)


def save_checkpoint(checkpoints_dir: Path, step: int, cfg: Config, model, optimizer, trainer_state: dict,
                    keep: int = 0, ctx: Optional[ParallelContext] = None) -> Path:
    """Write `checkpoints_dir/step_N` (a collective: every rank calls it) and return its path.

    The model is stored unsharded (gathered across tensor/expert-parallel ranks, written by rank 0),
    so any layout can resume from it; the optimizer state is stored per rank (ZeRO-1 shards).
    Under pipeline parallelism each stage's first rank writes the tensors its stages own under its
    own prefix, and rank 0 merges the indexes into one: the directory looks the same either way.
    Every rank checksums the files it wrote. If any rank fails, every rank raises
    CheckpointWriteError with the same message and the partial directory is removed.
    `keep` > 0: afterwards only the newest `keep` complete checkpoints remain.
    """
    ctx = ctx or ParallelContext.single()
    world = Group.world()
    final = checkpoints_dir / f"step_{step}"
    tmp = checkpoints_dir / f".step_{step}.tmp"

    def create_directory() -> None:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "optimizer").mkdir(parents=True)
        (tmp / "config.yaml").write_text(dump_config(cfg))

    error = _attempt(create_directory, tmp) if ctx.rank == 0 else None
    _raise_if_failed(world.first_reported(error), step, checkpoints_dir, tmp, ctx)

    # The weights, then AdamW's moments (one at a time: one parameter-shaped copy held), as full
    # tensors by parameter name, so that any layout resumes from them.
    mine: list[str] = []
    prefixes = ["model"] if ctx.pp.size == 1 else [f"stage{r:03d}" for r in range(ctx.pp.size)]
    error = _write_gathered(tmp / "model", prefixes[ctx.pp.rank], model.full_state(), ctx, mine)
    for moment in MOMENTS:
        moments = {pid: m[moment] for pid, m in optimizer.parameter_moments((moment,)).items()}
        prefix = moment if ctx.pp.size == 1 else f"{moment}-stage{ctx.pp.rank:03d}"
        error = _write_gathered(tmp / "optimizer", prefix, model.full_state(moments), ctx, mine) or error
        del moments
    if ctx.rank == 0:
        state_file = tmp / "trainer_state.pt"
        error = error or _attempt(lambda: torch.save({"step": step, "world_size": ctx.world_size,
                                                      "optimizer_steps": optimizer.steps, **trainer_state},
                                                     state_file), state_file)
        mine += ["trainer_state.pt", "config.yaml"]
    entries: dict = {}
    if error is None:
        error = _attempt(lambda: entries.update(seal_files(tmp, mine)), tmp)
    _raise_if_failed(world.first_reported(error), step, checkpoints_dir, tmp, ctx)

    gathered = world.all_gather_object(entries)
    if ctx.rank == 0:
        def finish() -> None:
            for part in gathered:
                entries.update(part)
            if ctx.pp.size > 1:
                merge_indexes(tmp / "model", prefixes, "model")
                for prefix in prefixes:
                    entries.pop(f"model/{prefix}.safetensors.index.json", None)
                for moment in MOMENTS:
                    parts = [f"{moment}-stage{r:03d}" for r in range(ctx.pp.size)]
                    merge_indexes(tmp / "optimizer", parts, moment)
                    for part in parts:
                        entries.pop(f"optimizer/{part}.safetensors.index.json", None)
            finalize_directory(tmp, final, step, entries)
        error = _attempt(finish, tmp)
    _raise_if_failed(world.first_reported(error), step, checkpoints_dir, tmp, ctx)
    if ctx.rank == 0 and keep > 0:
        rotate_checkpoints(checkpoints_dir, keep)
    ctx.barrier()
    return final


def _write_gathered(directory: Path, prefix: str, stream, ctx: ParallelContext, written: list[str]) -> Optional[str]:
    """Write the (name, full tensor) `stream` as `directory/prefix*` on the stage's writer rank (TP
    and DP rank 0), adding the files to `written` (relative to the checkpoint); every rank drains
    the stream, since gathering is a collective. Returns what failed, or None."""
    error = None
    if ctx.tp.rank == 0 and ctx.dp.rank == 0:
        error = _attempt(lambda: write_tensors(directory, prefix, stream), directory)
        written += [str(p.relative_to(directory.parent)) for p in directory.glob(f"{prefix}[-.]*")]
    for _ in stream:  # what a failed write left ungathered: the other ranks are still gathering it
        pass
    return error


def _raise_if_failed(error: Optional[str], step: int, checkpoints_dir: Path, tmp: Path, ctx: ParallelContext) -> None:
    if error is None:
        return
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = list_checkpoints(checkpoints_dir)
    kept = f"the latest complete checkpoint is still {previous[-1]}" if previous else "no checkpoint was written"
    raise CheckpointWriteError(f"Could not save checkpoint step_{step}: {error}; {kept}.")


def rotate_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and partial saves of crashed runs.

    The newest checkpoint is the one just written and sealed (or, right after a resume, the one
    that was verified on load), so the last checkpoint known to be sound is never deleted."""
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old)
    for path in checkpoints_dir.iterdir():
        if _PARTIAL_DIR.match(path.name):
            shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first. Partial saves are skipped."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(checkpoint_step(path), path) for path in checkpoints_dir.iterdir()]
    return [path for step, path in sorted(found) if step >= 0 and path.is_dir() and (path / MANIFEST).is_file()]


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
    """The config a checkpoint was saved with (a damaged file is a ConfigError naming it)."""
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


def verify_checkpoint(ckpt: Path, ctx: Optional[ParallelContext] = None) -> None:
    """Check every file of `ckpt` against its manifest (each rank reads a share; a collective) and
    raise CheckpointFormatError on every rank, naming the damaged file and the previous complete
    checkpoint to fall back to."""
    world = Group.world()
    try:
        problem = find_damage(ckpt, (world.rank, world.size))
    except CheckpointFormatError as err:
        problem = str(err).rstrip(".")
    problem = world.first_reported(problem)
    if problem is None:
        return
    older = [path for path in list_checkpoints(ckpt.parent) if checkpoint_step(path) < checkpoint_step(ckpt)]
    fallback = (f"; the previous complete checkpoint is {older[-1]}: move {ckpt} out of {ckpt.parent} to resume "
                f"from it" if older else "")
    raise CheckpointFormatError(f"{problem}{fallback}.")


def checkpoint_step(path: Path) -> int:
    """N for a directory named step_N, else -1."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def _load_torch_file(path: Path) -> dict:
    """A torch.save'd dict, loaded without executing code; CheckpointFormatError if it is not one."""
    try:
        value = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises many types for damaged zip archives and pickles
        raise CheckpointFormatError(f"Checkpoint file {path} is damaged or not a torch file ({type(err).__name__}).") from None
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"Checkpoint file {path} holds a {type(value).__name__}, not a dict.")
    return value


def load_optimizer_moments(ckpt: Path, model, optimizer, state: dict) -> None:
    """This rank's shards of AdamW's moments from their full tensors (any layout saved them), the
    masters from the weights already loaded into `model`, and the optimizer's step count."""
    if not isinstance(state.get("optimizer_steps"), int):
        raise CheckpointFormatError(f"Checkpoint file {ckpt / 'trainer_state.pt'} has no optimizer step count.")
    moments = {id(p): {} for p in model.parameters()}
    for moment in MOMENTS:
        reader = ShardedReader(ckpt / "optimizer", prefix=moment)
        for p in model.parameters():
            moments[id(p)][moment] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

        def get(name: str) -> torch.Tensor:
            if name not in reader:
                raise CheckpointFormatError(f"Checkpoint {ckpt} has no {moment} for {name!r} in {ckpt / 'optimizer'}.")
            return reader.get(name)

        try:
            model.load_full_state(get, {pid: m[moment] for pid, m in moments.items()})
        except ValueError as err:
            raise CheckpointFormatError(f"Checkpoint {ckpt}, optimizer {moment}: {err}") from None
    optimizer.reload_model_params()
    optimizer.load_parameter_moments(moments, state["optimizer_steps"])


def load_checkpoint(ckpt: Path, model, optimizer, ctx: Optional[ParallelContext] = None, verify: bool = True) -> dict:
    """Verify `ckpt` (unless the caller just did), restore the model (and this rank's optimizer
    shard); returns the trainer state saved with it (a dict with at least "step")."""
    ctx = ctx or ParallelContext.single()
    if verify:
        verify_checkpoint(ckpt, ctx)
    load_model_weights(ckpt, model)
    state_file = ckpt / "trainer_state.pt"
    if not state_file.is_file():
        raise CheckpointFormatError(
            f"{ckpt} holds weights only (no trainer_state.pt: e.g. made by import-hf), so a run cannot resume from it; "
            f"start from its weights with rl.init_from (megads sft / grpo).")
    state = _load_torch_file(state_file)
    if not isinstance(state.get("step"), int):
        raise CheckpointFormatError(f"Checkpoint file {state_file} has no step count.")
    if optimizer is not None and (ckpt / "optimizer" / f"{MOMENTS[0]}.safetensors.index.json").is_file():
        load_optimizer_moments(ckpt, model, optimizer, state)
    elif optimizer is not None:
        saved_world = int(state.get("world_size", 1))
        if saved_world != ctx.world_size:
            raise CheckpointFormatError(
                f"Checkpoint {ckpt} holds optimizer shards of {saved_world} ranks; this run has {ctx.world_size}. "
                f"Resume with the same layout (the model weights alone load into any layout).")
        shard_file = ckpt / "optimizer" / f"rank_{ctx.rank:05d}.pt"
        shard = _load_torch_file(shard_file)
        try:
            optimizer.load_state_dict(shard)
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointFormatError(f"Checkpoint file {shard_file} does not fit this optimizer ({err}).") from None
    return state
