"""Megatron-style memory-mapped indexed dataset of token ids.

Two files per dataset:

* ``<prefix>.bin``: every document's token ids, concatenated, as raw ``dtype``.
* ``<prefix>.idx``: a header (magic, version, dtype code, document count)
  followed by ``count + 1`` int64 token offsets; document ``i`` is
  ``bin[offsets[i]:offsets[i + 1]]``.

Memory-mapping means opening a dataset costs nothing however large it is, and
every data-parallel process shares the same pages of the OS cache.
"""

from __future__ import annotations

import os
import pathlib
import struct
from collections.abc import Iterable

import numpy as np

_MAGIC = b"MEGADSIX"
_VERSION = 1
# magic, version, dtype code, document count
_HEADER = struct.Struct("<8sIIQ")
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class CorruptDatasetError(ValueError):
    """An indexed dataset file is truncated, corrupt, or from another format."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest supported dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def _paths(prefix: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    prefix = os.fspath(prefix)
    return pathlib.Path(prefix + ".bin"), pathlib.Path(prefix + ".idx")


class IndexedDatasetWriter:
    """Append documents, then :meth:`finalize` to publish ``prefix.bin/.idx``.

    Both files are written under a ``.tmp`` name and renamed into place only by
    :meth:`finalize`, so a reader never sees a half-written dataset.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}; use uint16 or int32")
        self._bin_path, self._idx_path = _paths(prefix)
        self._bin_tmp = self._bin_path.with_name(self._bin_path.name + ".tmp")
        self._idx_tmp = self._idx_path.with_name(self._idx_path.name + ".tmp")
        self._bin_file = open(self._bin_tmp, "wb")
        self._offsets = [0]
        self._max_id = np.iinfo(self.dtype).max

    def add_document(self, ids: Iterable[int] | np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        # Range-check before narrowing: a too-large id would wrap silently.
        if ids.size and (ids.min() < 0 or ids.max() > self._max_id):
            raise ValueError(
                f"token ids must be in [0, {self._max_id}] for {self.dtype}, "
                f"got range [{ids.min()}, {ids.max()}]"
            )
        self._bin_file.write(ids.astype(self.dtype).tobytes())
        self._offsets.append(self._offsets[-1] + ids.size)

    def finalize(self) -> None:
        self._bin_file.close()
        document_count = len(self._offsets) - 1
        with open(self._idx_tmp, "wb") as idx_file:
            idx_file.write(_HEADER.pack(_MAGIC, _VERSION, _DTYPE_CODES[self.dtype], document_count))
            idx_file.write(np.asarray(self._offsets, dtype=np.int64).tobytes())
        # The .bin goes first: an .idx in place implies its .bin is complete.
        os.replace(self._bin_tmp, self._bin_path)
        os.replace(self._idx_tmp, self._idx_path)


class IndexedDataset:
    """Read-only view of ``prefix.bin/.idx``; ``dataset[i]`` is document ``i``."""

    def __init__(self, prefix: str | os.PathLike):
        bin_path, idx_path = _paths(prefix)
        self.offsets, self.dtype = self._read_index(idx_path)
        total_tokens = int(self.offsets[-1])
        expected = total_tokens * self.dtype.itemsize
        actual = bin_path.stat().st_size
        if actual != expected:
            raise CorruptDatasetError(
                f"{bin_path}: size is {actual} bytes but its index {idx_path.name} "
                f"describes {total_tokens} tokens ({expected} bytes); truncated or mismatched"
            )
        # numpy cannot memory-map an empty file.
        self.tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r") if total_tokens else np.empty(0, self.dtype)
        )

    @staticmethod
    def _read_index(idx_path: pathlib.Path) -> tuple[np.ndarray, np.dtype]:
        size = idx_path.stat().st_size
        if size < _HEADER.size:
            raise CorruptDatasetError(f"{idx_path}: {size} bytes is too short for the index header")
        with open(idx_path, "rb") as idx_file:
            magic, version, dtype_code, document_count = _HEADER.unpack(idx_file.read(_HEADER.size))
        if magic != _MAGIC:
            raise CorruptDatasetError(f"{idx_path}: bad magic {magic!r}, not a megads index file")
        if version != _VERSION:
            raise CorruptDatasetError(f"{idx_path}: format version {version}, expected {_VERSION}")
        if dtype_code not in _DTYPES:
            raise CorruptDatasetError(f"{idx_path}: unknown dtype code {dtype_code}")
        expected = _HEADER.size + 8 * (document_count + 1)
        if size != expected:
            raise CorruptDatasetError(
                f"{idx_path}: size is {size} bytes but {document_count} documents need "
                f"{expected}; truncated or corrupt"
            )
        offsets = np.memmap(idx_path, dtype=np.int64, mode="r", offset=_HEADER.size)
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise CorruptDatasetError(f"{idx_path}: document offsets are not increasing from 0")
        return offsets, _DTYPES[dtype_code]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} out of range for {len(self)} documents")
        index %= len(self)
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]
