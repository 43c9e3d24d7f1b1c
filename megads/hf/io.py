"""Hugging Face directories in and out: load_hf / save_hf (a model in memory), import_hf / export_hf
(a megads checkpoint directory, without building the model).

Every conversion streams: tensors are read one at a time and written through ShardedWriter, so
peak memory is about one layer plus one shard, whatever the model size. Directories are written
under a temporary name next to the target and renamed into place once complete.

DeepSeek-V3's FP8 format (megads.hf.fp8) is read wherever config.json declares it, each FP8 weight
dequantized to FP32 as it is read, and written by save_hf / export_hf with `fp8=True`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from megads.config import ModelConfig, config_for_model, dump_config
from megads.hf.config import (
    HF_CONFIG,
    Log,
    fp8_weights,
    hf_config_from_model_config,
    model_config_from_hf,
    read_hf_config,
)
from megads.hf.fp8 import DequantizingReader, quantize_for_hf
from megads.hf.names import (
    hf_mtp_depths,
    hf_source_names,
    hf_tensors_to_megads,
    megads_state_shapes,
    megads_tensors_to_hf,
)
from megads.model.model import DeepSeekV3
from megads.model.moe import MoE, Router
from megads.model.rope import RotaryEmbedding, rope_frequencies
from megads.shards import (
    DEFAULT_SHARD_BYTES,
    CheckpointFormatError,
    NonFiniteTensorError,
    ShardedReader,
    ShardedWriter,
    count_non_finite,
)
from megads.train.checkpoint import (
    finalize_directory,
    read_checkpoint_config,
    resolve_checkpoint,
    write_model_weights,
)
from megads.train.manifest import verify_manifest

PROGRESS_EVERY_S = 5.0

# ============================================================================ plumbing


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


class _Progress:
    """One log line every PROGRESS_EVERY_S seconds while tensors flow, and a summary at the end."""

    def __init__(self, what: str, log: Log):
        self.what, self.log = what, log
        self.tensors = self.bytes = 0
        self.start = self.last = time.monotonic()

    def count(self, stream: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in stream:
            self.tensors += 1
            self.bytes += tensor.numel() * tensor.element_size()
            now = time.monotonic()
            if now - self.last >= PROGRESS_EVERY_S:
                self.last = now
                self.log(f"{self.what}: {self.tensors} tensors, {_size(self.bytes)} so far ({name})")
            yield name, tensor

    def done(self) -> None:
        self.log(f"{self.what}: done, {self.tensors} tensors, {_size(self.bytes)} "
                 f"in {time.monotonic() - self.start:.1f} s")


@contextmanager
def _staged_directory(target: Path, finalize: Callable[[Path, Path], None]):
    """Yield a temporary sibling of `target`; `finalize(tmp, target)` moves it into place on success.

    Refuses a non-empty target: replacing a directory full of someone's files is not a conversion's
    call to make. On failure the temporary directory is removed and nothing appears at `target`.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty; refusing to overwrite it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            target.rmdir()  # empty, checked above
        finalize(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, NonFiniteTensorError):  # name the directory asked for, not the vanished temporary
            raise err.restated(destination=target) from None
        raise


def _write_hf_dir(hf_dir: Path, cfg: ModelConfig, stream: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int, dtype: Optional[torch.dtype], log: Log, fp8: bool = False) -> Path:
    """Write config.json and the sharded weights of `stream` (HF names, full precision when `fp8`) into
    `hf_dir`, atomically; `fp8`: in DeepSeek-V3's FP8 format."""
    progress = _Progress(f"writing Hugging Face weights to {hf_dir}", log)
    if fp8:
        if dtype not in (None, torch.bfloat16):
            raise ValueError(f"An FP8 export stores its unquantized tensors in bfloat16, as DeepSeek-V3 does; "
                             f"dtype {dtype} cannot be combined with it.")
        dtype = torch.bfloat16
        stream = quantize_for_hf(stream)
    stored_dtype = dtype
    with _staged_directory(hf_dir, lambda tmp, final: os.replace(tmp, final)) as tmp:
        with ShardedWriter(tmp, "model", max_shard_bytes) as writer:
            for name, tensor in progress.count(stream):
                if name == "lm_head.weight":
                    stored_dtype = stored_dtype or tensor.dtype
                writer.add(name, tensor)
        # Written last: only now is the stored dtype known.
        config = hf_config_from_model_config(cfg, stored_dtype or torch.float32, fp8=fp8)
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    progress.done()
    return hf_dir


def _init_mtp(mtp: nn.ModuleList, cfg: ModelConfig, seed: int) -> None:
    """Initialise MTP modules exactly as build_model(cfg, seed) would.

    DeepSeekV3.init_weights seeds each parameter by its full name, so a shell model holding only
    `mtp` (named as in the full model) reproduces the full model's values without building it.
    """
    shell = DeepSeekV3.__new__(DeepSeekV3)
    nn.Module.__init__(shell)
    shell.cfg = cfg
    shell.mtp = mtp
    shell.init_weights(seed)


def _empty_model(cfg: ModelConfig, dtype: torch.dtype) -> DeepSeekV3:
    """An uninitialised CPU model: built on the meta device, then given (unfilled) storage once.

    Parameters take `dtype`, except the router's, which stays FP32 like its biases (as in
    transformers). Non-persistent buffers, which no checkpoint holds, are recomputed here.
    """
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    for module in model.modules():
        if isinstance(module, Router):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(param.to(dtype), requires_grad=param.requires_grad))
    model.to_empty(device="cpu")

    persistent = set(model.state_dict())
    inv_freq, _ = rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    restored = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(inv_freq)
            restored.add(prefix + "inv_freq")
        elif isinstance(module, MoE):
            module.tokens_per_expert.zero_()
            restored.add(prefix + "tokens_per_expert")
    unknown = {name for name, _ in model.named_buffers()} - persistent - restored
    if unknown:
        raise RuntimeError(f"megads.hf does not know how to initialise the non-persistent buffer(s) {sorted(unknown)}.")
    return model


# ============================================================================ public API


def _open_hf(path: Path, log: Log) -> tuple[ModelConfig, DequantizingReader]:
    """The model config of a Hugging Face directory and a reader of its weights (FP8 ones dequantized)."""
    hf = read_hf_config(path)
    cfg = model_config_from_hf(hf, log)
    return cfg, DequantizingReader(ShardedReader(path), fp8_weights(hf))


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0, log: Log = print) -> DeepSeekV3:
    """A megads model (in eval mode, like transformers' from_pretrained) from a Hugging Face directory.

    MTP depths the directory lacks are initialised as build_model(cfg, seed) would. FP8 weights
    are dequantized (to FP32, then cast to `dtype`).
    """
    path = Path(path)
    cfg, reader = _open_hf(path, log)
    model = _empty_model(cfg, dtype)
    if hf_mtp_depths(reader, cfg) < cfg.num_nextn_predict_layers:
        with torch.no_grad():
            _init_mtp(model.mtp, cfg, seed)
    state = model.state_dict()
    progress = _Progress(f"loading {path}", log)
    with torch.no_grad():
        for name, tensor in progress.count(hf_tensors_to_megads(reader, cfg, log)):
            state[name].copy_(tensor)
    progress.done()
    return model.eval()


def save_hf(model: DeepSeekV3, path: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            dtype: Optional[torch.dtype] = None, log: Log = print, fp8: bool = False) -> Path:
    """Write a full (unsharded) megads model as a Hugging Face DeepSeek-V3 directory (`fp8`: in
    DeepSeek-V3's FP8 format, the other tensors BF16)."""
    state = model.state_dict()
    stream = megads_tensors_to_hf(state.__getitem__, list(state), model.cfg, None if fp8 else dtype)
    return _write_hf_dir(Path(path), model.cfg, stream, max_shard_bytes, dtype, log, fp8)


def import_hf(hf_dir: str | Path, ckpt_dir: str | Path, seed: int = 0, max_shard_bytes: Optional[int] = None,
              log: Log = print) -> Path:
    """Convert a Hugging Face directory into a megads checkpoint directory without building the model.

    The checkpoint holds config.yaml (the imported model section, defaults elsewhere: config_for_model),
    model/ and the COMPLETE manifest, and no training state. Missing MTP depths are written freshly
    initialised (as build_model(cfg, seed) would), so the checkpoint always matches its config.

    Tensors keep the dtype they are stored in, except FP8 weights (DeepSeek-V3's format), which are
    stored dequantized in FP32: see megads.hf.fp8 for why FP32 and not BF16.
    """
    hf_dir, ckpt_dir = Path(hf_dir), Path(ckpt_dir)
    cfg, reader = _open_hf(hf_dir, log)
    present = min(hf_mtp_depths(reader, cfg), cfg.num_nextn_predict_layers)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        yield from hf_tensors_to_megads(reader, cfg, log)
        if present < cfg.num_nextn_predict_layers:
            with torch.device("meta"):
                mtp = DeepSeekV3(cfg).mtp
            mtp.to_empty(device="cpu")
            with torch.no_grad():
                _init_mtp(mtp, cfg, seed)
            for name, tensor in mtp.state_dict().items():
                if int(name.split(".", 1)[0]) >= present:
                    yield f"mtp.{name}", tensor

    progress = _Progress(f"importing {hf_dir} into {ckpt_dir}", log)
    try:
        with _staged_directory(ckpt_dir, lambda tmp, final: finalize_directory(tmp, final, None)) as tmp:
            (tmp / "config.yaml").write_text(dump_config(config_for_model(cfg)))
            write_model_weights(tmp, progress.count(stream()), max_shard_bytes)
    except NonFiniteTensorError as err:
        raise _non_finite_source(err, reader, cfg) from None
    progress.done()
    return ckpt_dir


def _non_finite_source(err: NonFiniteTensorError, reader: DequantizingReader,
                       cfg: ModelConfig) -> NonFiniteTensorError:
    """The refusal of an imported tensor restated for the Hugging Face tensor and shard file it came
    from (a damaged shard is what the user must look at). Read again only on this failure path, so the
    import checks each tensor once, in the writer."""
    for hf_name in hf_source_names(err.name, cfg, set(reader.keys())):
        if hf_name not in reader:  # a freshly initialised MTP depth
            continue
        tensor = reader.get(hf_name)
        bad = count_non_finite(tensor)
        if bad:
            return err.restated(name=hf_name, count=bad, numel=tensor.numel(), source=reader.file_of(hf_name))
    return err


def export_hf(ckpt_path: str | Path, hf_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              dtype: Optional[torch.dtype] = None, log: Log = print, fp8: bool = False) -> Path:
    """Convert a megads checkpoint (a checkpoint directory, or a run directory: its latest one) to HF format
    (`fp8`: DeepSeek-V3's FP8 format, quantized from the checkpoint's own precision)."""
    ckpt = resolve_checkpoint(ckpt_path)
    verify_manifest(ckpt)
    cfg = read_checkpoint_config(ckpt).model
    reader = ShardedReader(ckpt / "model")
    names = list(megads_state_shapes(cfg))
    missing, unexpected = sorted(set(names) - set(reader.keys())), sorted(set(reader.keys()) - set(names))
    if missing or unexpected:
        raise CheckpointFormatError(f"Checkpoint {ckpt} does not match its config.yaml: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}.")
    log(f"exporting checkpoint {ckpt}")
    stream = megads_tensors_to_hf(reader.get, names, cfg, None if fp8 else dtype)
    return _write_hf_dir(Path(hf_dir), cfg, stream, max_shard_bytes, dtype, log, fp8)
