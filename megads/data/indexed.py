"""Megatron-style memory-mapped indexed dataset of token ids.

Two files per dataset:

* ``<prefix>.bin``: every document's token ids, concatenated, as raw ``dtype``.
* ``<prefix>.idx``: a header (magic, version, dtype code, document count)
  followed by ``count + 1`` int64 token offsets; document ``i`` is
  ``bin[offsets[i]:offsets[i + 1]]``.  Version 2 adds, between the header and
  the offsets, a JSON metadata block (its length as a uint64, then the UTF-8
  text padded with spaces to a multiple of 8 bytes): what made the dataset,
  e.g. which tokenizer (see megads.data.prepared).  Version 1 (no metadata) is
  still what a writer given no metadata writes, and both are read.

Memory-mapping means opening a dataset costs nothing however large it is, and
every data-parallel process shares the same pages of the OS cache.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Iterable

import numpy as np

_MAGIC = b"MEGADSIX"
_VERSION_PLAIN, _VERSION_WITH_METADATA = 1, 2
# magic, version, dtype code, document count
_HEADER = struct.Struct("<8sIIQ")
_METADATA_LENGTH = struct.Struct("<Q")
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class CorruptDatasetError(ValueError):
    """An indexed dataset file is truncated, corrupt, or from another format."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest supported dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def dataset_paths(prefix: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """The ``.bin`` and ``.idx`` paths of the dataset at ``prefix``."""
    prefix = os.fspath(prefix)
    return pathlib.Path(prefix + ".bin"), pathlib.Path(prefix + ".idx")


class IndexedDatasetWriter:
    """Append documents, then :meth:`finalize` to publish ``prefix.bin/.idx``.

    Both files are written under temporary names (``.<pid>.tmp``, so two writers
    never share one) and renamed into place only by :meth:`finalize`, so a
    reader never sees a half-written dataset.  Used as a context manager, an
    exception before :meth:`finalize` removes the temporary files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}; use uint16 or int32")
        self._bin_path, self._idx_path = dataset_paths(prefix)
        suffix = f".{os.getpid()}.tmp"
        self._bin_tmp = self._bin_path.with_name(self._bin_path.name + suffix)
        self._idx_tmp = self._idx_path.with_name(self._idx_path.name + suffix)
        self._bin_file = open(self._bin_tmp, "wb")
        # Document lengths in appended chunks: a Python int per document would cost
        # ~30 bytes each, too much for corpora of hundreds of millions of documents.
        self._lengths: list[np.ndarray] = []
        self._limit = np.iinfo(self.dtype).max
        self.document_count = 0
        self.token_count = 0
        self.max_token_id = -1  # -1 while no token has been written

    def add_document(self, ids: Iterable[int] | np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self.add_documents(ids, np.array([ids.size], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: ``tokens`` concatenated, ``lengths`` their sizes."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size or (lengths.size and lengths.min() < 0):
            raise ValueError(f"document lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        # Range-check before narrowing: a too-large id would wrap silently.
        if tokens.size:
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high > self._limit:
                raise ValueError(
                    f"token ids must be in [0, {self._limit}] for {self.dtype}, got range [{low}, {high}]"
                )
            self.max_token_id = max(self.max_token_id, high)
        self._bin_file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths)
        self.document_count += lengths.size
        self.token_count += tokens.size

    def finalize(self, metadata: dict | None = None) -> None:
        """Publish the dataset; ``metadata`` (a JSON-serializable dict) is stored in the index
        (format version 2), readable as :attr:`IndexedDataset.metadata`."""
        _flush_to_disk(self._bin_file)
        self._bin_file.close()
        offsets = np.concatenate([np.zeros(1, np.int64), *self._lengths]).cumsum()
        version = _VERSION_PLAIN if metadata is None else _VERSION_WITH_METADATA
        with open(self._idx_tmp, "wb") as idx_file:
            idx_file.write(_HEADER.pack(_MAGIC, version, _DTYPE_CODES[self.dtype], self.document_count))
            if metadata is not None:
                text = json.dumps(metadata, sort_keys=True).encode("utf-8")
                text += b" " * (-len(text) % 8)  # keeps the offsets 8-byte aligned
                idx_file.write(_METADATA_LENGTH.pack(len(text)) + text)
            idx_file.write(offsets.tobytes())
            _flush_to_disk(idx_file)
        # An old index goes first and the new one comes last, so that at every moment an
        # .idx in place describes the .bin beside it: a crash in between leaves no index.
        self._idx_path.unlink(missing_ok=True)
        os.replace(self._bin_tmp, self._bin_path)
        os.replace(self._idx_tmp, self._idx_path)

    def abort(self) -> None:
        """Drop everything written so far (the published files, if any, are untouched)."""
        self._bin_file.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()


def _flush_to_disk(file) -> None:
    # Renaming is atomic, but without fsync a power loss can leave the new name on an empty file.
    file.flush()
    os.fsync(file.fileno())


class IndexedDataset:
    """Read-only view of ``prefix.bin/.idx``; ``dataset[i]`` is document ``i``;
    :attr:`metadata` is what the index records about its making ({} if nothing)."""

    def __init__(self, prefix: str | os.PathLike):
        bin_path, idx_path = dataset_paths(prefix)
        self.offsets, self.dtype, self.metadata = self._read_index(idx_path)
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
    def _read_index(idx_path: pathlib.Path) -> tuple[np.ndarray, np.dtype, dict]:
        size = idx_path.stat().st_size
        if size < _HEADER.size:
            raise CorruptDatasetError(f"{idx_path}: {size} bytes is too short for the index header")
        with open(idx_path, "rb") as idx_file:
            magic, version, dtype_code, document_count = _HEADER.unpack(idx_file.read(_HEADER.size))
            if magic != _MAGIC:
                raise CorruptDatasetError(f"{idx_path}: bad magic {magic!r}, not a megads index file")
            if version not in (_VERSION_PLAIN, _VERSION_WITH_METADATA):
                raise CorruptDatasetError(
                    f"{idx_path}: format version {version}, expected {_VERSION_PLAIN} or {_VERSION_WITH_METADATA}"
                )
            if dtype_code not in _DTYPES:
                raise CorruptDatasetError(f"{idx_path}: unknown dtype code {dtype_code}")
            metadata: dict = {}
            offsets_start = _HEADER.size
            if version == _VERSION_WITH_METADATA:
                metadata, metadata_size = IndexedDataset._read_metadata(idx_file, idx_path, size)
                offsets_start += _METADATA_LENGTH.size + metadata_size
        expected = offsets_start + 8 * (document_count + 1)
        if size != expected:
            raise CorruptDatasetError(
                f"{idx_path}: size is {size} bytes but {document_count} documents need "
                f"{expected}; truncated or corrupt"
            )
        offsets = np.memmap(idx_path, dtype=np.int64, mode="r", offset=offsets_start)
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise CorruptDatasetError(f"{idx_path}: document offsets are not increasing from 0")
        return offsets, _DTYPES[dtype_code], metadata

    @staticmethod
    def _read_metadata(idx_file, idx_path: pathlib.Path, size: int) -> tuple[dict, int]:
        """The metadata block that follows the header, and its size in bytes."""
        length_bytes = idx_file.read(_METADATA_LENGTH.size)
        if len(length_bytes) < _METADATA_LENGTH.size:
            raise CorruptDatasetError(f"{idx_path}: {size} bytes is too short for the metadata length")
        (length,) = _METADATA_LENGTH.unpack(length_bytes)
        if length > size:
            raise CorruptDatasetError(f"{idx_path}: metadata of {length} bytes is longer than the file; corrupt")
        text = idx_file.read(length)
        try:
            metadata = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            metadata = None
        if len(text) < length or not isinstance(metadata, dict):
            raise CorruptDatasetError(f"{idx_path}: the metadata block is not a JSON object; truncated or corrupt")
        return metadata, length

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} out of range for {len(self)} documents")
        index %= len(self)
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]
