"""Sharded safetensors directories: a streaming writer and a lazy reader.

Both checkpoints and Hugging Face exports store weights this way:
`{prefix}-00001-of-00003.safetensors`, ... plus `{prefix}.safetensors.index.json` mapping each
tensor name to its shard (the layout `transformers` reads). The writer holds at most one shard in
memory and the reader loads one tensor at a time, so converting a 671B-parameter model never holds
two copies of it (nor even one).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 2 * 1024**3


class CheckpointFormatError(RuntimeError):
    """A weights directory is missing, partial or corrupt; the message names the file."""


class NonFiniteTensorError(CheckpointFormatError):
    """A tensor holds NaN or inf values: weights like that are refused, never written. The message names
    the tensor, where it came from when known (`source`, e.g. a Hugging Face shard file) and where it was
    to be written."""

    def __init__(self, name: str, count: int, numel: int, destination: str | Path, source: Optional[str | Path] = None):
        self.name, self.count, self.numel, self.destination, self.source = name, count, numel, destination, source
        origin = f" in {source}" if source is not None else ""
        super().__init__(f"Tensor {name!r}{origin} has {count} non-finite value(s) (NaN or inf) of {numel}; "
                         f"refusing to write it to {destination}.")

    def restated(self, **changes) -> "NonFiniteTensorError":
        """The same refusal with some of name, count, numel, destination, source changed."""
        fields = dict(name=self.name, count=self.count, numel=self.numel, destination=self.destination,
                      source=self.source)
        return NonFiniteTensorError(**{**fields, **changes})


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many NaN or inf values `tensor` holds (0 for integer and bool tensors).

    One read of the tensor and no temporary (isfinite(t).all() also writes a byte per value): aminmax
    propagates NaN, and an inf is an extreme, so both ends are finite exactly when every value is. Only
    a tensor that fails is counted value by value."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if tensor.element_size() == 1:  # FP8 has no CPU reductions: upcast a slice at a time
        return sum(count_non_finite(piece.float()) for piece in tensor.reshape(-1).split(1 << 24))
    low, high = torch.aminmax(tensor)
    if math.isfinite(low) and math.isfinite(high):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def read_json_object(path: Path) -> dict:
    """The JSON object a weights directory keeps in `path` (config.json, an index, a manifest). A file
    that cannot be read, is not UTF-8, is not JSON or holds something other than an object is a
    CheckpointFormatError naming it: damaged files are one sentence, not a traceback."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointFormatError(f"{path} cannot be read ({err.strerror}).") from None
    try:
        # JSON is UTF-8 (RFC 8259), whatever the locale; a byte-order mark, as some editors write, is skipped.
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise CheckpointFormatError(f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset "
                                    f"{err.start} cannot be decoded.") from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointFormatError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"{path} must hold a JSON object, got {type(value).__name__}.")
    return value


class ShardedWriter:
    """Add tensors one by one; a shard is written whenever it reaches `max_shard_bytes`.

    Shards are first written under temporary names and renamed to `-0000i-of-0000n` on close(),
    when n is known; the index is written last, so a directory without an index is incomplete.
    """

    def __init__(self, directory: str | Path, prefix: str = "model", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: Optional[dict[str, str]] = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue `tensor` under `name`; NaN or inf values are a NonFiniteTensorError naming it (every writer of
        weights, checkpoint save, import-hf, export-hf and save_hf, comes through here)."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        tensor = tensor.detach()
        bad = count_non_finite(tensor)  # where the tensor lives: on a GPU before it is copied, far faster
        if bad:
            raise NonFiniteTensorError(name, bad, tensor.numel(), self.directory)
        tensor = tensor.to("cpu")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # safetensors needs contiguous, non-shared storage; clone only when necessary.
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f".{self.prefix}-part{len(self._written):05d}.safetensors.tmp"
        tensors = {k: (v.clone() if _shares_storage(v) else v) for k, v in self._pending.items()}
        save_file(tensors, str(path), metadata=self.metadata)
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        count = len(self._written)
        weight_map = {}
        for i, (tmp, names) in enumerate(self._written, start=1):
            final = self.directory / f"{self.prefix}-{i:05d}-of-{count:05d}.safetensors"
            os.replace(tmp, final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        index_path = self.directory / f"{self.prefix}.safetensors.index.json"
        tmp_index = index_path.with_suffix(".json.tmp")
        tmp_index.write_text(json.dumps(index, indent=2))
        os.replace(tmp_index, index_path)

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def merge_indexes(directory: str | Path, parts: list[str], prefix: str = "model") -> None:
    """Merge the indexes of several writers' `{part}` shards in `directory` into one `{prefix}` index
    (the parts' shard files stay as they are; their indexes are removed). Names must not repeat."""
    directory = Path(directory)
    weight_map: dict[str, str] = {}
    total = 0
    for part in parts:
        path = directory / f"{part}.safetensors.index.json"
        index = json.loads(path.read_text())
        repeated = set(weight_map) & set(index["weight_map"])
        if repeated:
            raise ValueError(f"{path} repeats tensors written by another part: {sorted(repeated)[:5]}")
        weight_map.update(index["weight_map"])
        total += index["metadata"]["total_size"]
    index_path = directory / f"{prefix}.safetensors.index.json"
    tmp_index = index_path.with_suffix(".json.tmp")
    tmp_index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                    indent=2))
    os.replace(tmp_index, index_path)
    for part in parts:
        (directory / f"{part}.safetensors.index.json").unlink()


def _shares_storage(t: torch.Tensor) -> bool:
    """True if t is a view into a larger storage (safetensors refuses to save those)."""
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


class ShardedReader:
    """Lazy access to the tensors of a sharded (or single-file) safetensors directory."""

    def __init__(self, directory: str | Path, prefix: str = "model"):
        self.directory = Path(directory)
        self._handles: dict[str, object] = {}
        index_path = self.directory / f"{prefix}.safetensors.index.json"
        single = self.directory / f"{prefix}.safetensors"
        if index_path.is_file():
            self._weight_map = read_json_object(index_path).get("weight_map")
            if not (isinstance(self._weight_map, dict)
                    and all(isinstance(shard, str) for shard in self._weight_map.values())):
                raise CheckpointFormatError(f"{index_path} is not a valid safetensors index (its 'weight_map' is "
                                            f"not an object naming each tensor's shard file).")
        elif single.is_file():
            self._weight_map = {name: single.name for name in self._open(single.name).keys()}
        else:
            raise CheckpointFormatError(
                f"No weights in {self.directory}: expected {index_path.name} or {single.name}.")
        for shard in sorted(set(self._weight_map.values())):
            if not (self.directory / shard).is_file():
                raise CheckpointFormatError(f"Shard {self.directory / shard} named in the index is missing.")

    def _open(self, shard: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.directory / shard), framework="pt")
            except Exception as err:  # safetensors raises its own error types for truncated files
                raise CheckpointFormatError(f"{self.directory / shard} is corrupt or truncated ({err}).") from None
        return self._handles[shard]

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def file_of(self, name: str) -> Path:
        """The safetensors file holding tensor `name`."""
        return self.directory / self._weight_map[name]

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self._weight_map:
            raise KeyError(f"tensor {name!r} is not in {self.directory}")
        try:
            return self._open(self._weight_map[name]).get_tensor(name)
        except CheckpointFormatError:
            raise
        except Exception as err:
            raise CheckpointFormatError(
                f"Reading {name!r} from {self.directory / self._weight_map[name]} failed ({err}).") from None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._weight_map:
            yield name, self.get(name)
