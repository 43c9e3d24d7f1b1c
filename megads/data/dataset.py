"""Pre-training data: a cached tokenized corpus, packed into fixed windows and
sampled into data-parallel micro-batches.

Sampling is a pure function of (seed, step), so resuming at step ``k`` needs no
saved sampler state and every DP rank agrees on the global batch without
communicating.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from .corpus import iter_documents, stdlib_source_files, take_until_bytes, text_files_in
from .indexed import IndexedDataset, IndexedDatasetWriter, dtype_for_vocab
from .tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, train_bpe_tokenizer

# Bump when the cache layout or tokenization changes so old caches are not reused.
CACHE_FORMAT_VERSION = 1

_TOKENIZER_FILE = "tokenizer.json"
_TOKENS_PREFIX = "tokens"
# Documents tokenized per encode_batch call: enough to keep every core busy,
# few enough that the ids of one batch stay small in memory.
_ENCODE_BATCH = 256


def build_or_load_corpus(
    source: str,
    vocab_size: int,
    tokenizer_kind: str,
    max_bytes: int,
    cache_dir: pathlib.Path,
    log: Callable[[str], None] = print,
) -> tuple[Tokenizer, IndexedDataset]:
    """Tokenize ``source`` (``"stdlib"`` or a path) into a cached indexed dataset.

    The cache entry lives in ``cache_dir/<key>/``, where the key hashes
    everything the result depends on, including each input file's size and
    modification time, so a changed input gets a fresh entry.  The entry is
    built in a temporary directory and renamed into place, so a crash never
    leaves a half-written entry that a later call would trust.
    """
    if tokenizer_kind not in ("bpe", "byte"):
        raise ValueError(f"tokenizer_kind must be 'bpe' or 'byte', got {tokenizer_kind!r}")
    if source == "stdlib":
        paths = stdlib_source_files(max_bytes)
        resolved_source = "stdlib"
    else:
        paths = take_until_bytes(text_files_in(source), max_bytes)
        resolved_source = str(pathlib.Path(source).resolve())
    stats = [path.stat() for path in paths]
    n_bytes = sum(stat.st_size for stat in stats)
    key_material = {
        "format": CACHE_FORMAT_VERSION,
        "source": resolved_source,
        "files": [[str(path.resolve()), st.st_size, st.st_mtime_ns] for path, st in zip(paths, stats)],
        "vocab_size": vocab_size,
        "tokenizer_kind": tokenizer_kind,
        "max_bytes": max_bytes,
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = pathlib.Path(cache_dir)
    entry = cache_dir / key

    if entry.is_dir():
        tokenizer = load_tokenizer(entry / _TOKENIZER_FILE)
        dataset = IndexedDataset(entry / _TOKENS_PREFIX)
        log(
            f"data: cached corpus {entry} ({len(paths)} files, {n_bytes:,} bytes): "
            f"{dataset.tokens.size:,} tokens"
        )
        return tokenizer, dataset

    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
    try:
        n_tokens = _build_entry(staging, paths, vocab_size, tokenizer_kind)
        try:
            os.rename(staging, entry)
        except OSError:
            # Another process published this entry first, from the same inputs; use it.
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(
        f"data: built corpus {entry} from {len(paths)} files, {n_bytes:,} bytes -> "
        f"{n_tokens:,} tokens in {time.perf_counter() - start:.1f}s"
    )
    return load_tokenizer(entry / _TOKENIZER_FILE), IndexedDataset(entry / _TOKENS_PREFIX)


def _build_entry(
    directory: pathlib.Path, paths: list[pathlib.Path], vocab_size: int, tokenizer_kind: str
) -> int:
    """Train the tokenizer and write the token stream into ``directory``;
    returns the number of tokens written."""
    if tokenizer_kind == "bpe":
        tokenizer: Tokenizer = BPETokenizer(train_bpe_tokenizer(iter_documents(paths), vocab_size))
    else:
        tokenizer = ByteTokenizer()
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is below the byte tokenizer's {tokenizer.vocab_size}")
    tokenizer.save(directory / _TOKENIZER_FILE)

    writer = IndexedDatasetWriter(directory / _TOKENS_PREFIX, dtype_for_vocab(tokenizer.vocab_size))
    n_tokens = 0
    for start in range(0, len(paths), _ENCODE_BATCH):
        texts = list(iter_documents(paths[start : start + _ENCODE_BATCH]))
        for ids in tokenizer.encode_batch(texts):
            # eos ends every document, so packed windows see document boundaries.
            ids.append(tokenizer.eos_id)
            writer.add_document(ids)
            n_tokens += len(ids)
    writer.finalize()
    return n_tokens


class PackedWindows:
    """The packed token stream cut into non-overlapping windows.

    Documents are already concatenated with eos between them (packing), so a
    window may span several documents.  Each window holds ``seq_length + 1``
    tokens: inputs are ``w[:-1]`` and labels ``w[1:]``.  A trailing remainder
    shorter than a window is dropped.
    """

    def __init__(self, tokens: np.ndarray, seq_length: int):
        if seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.tokens = tokens
        self.seq_length = seq_length
        self.window = seq_length + 1
        self.num_windows = len(tokens) // self.window
        if self.num_windows == 0:
            raise ValueError(
                f"corpus has {len(tokens)} tokens, shorter than one window of "
                f"seq_length + 1 = {self.window}; use more data or a shorter seq_length"
            )

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> torch.Tensor:
        """Window ``index`` as a LongTensor of ``seq_length + 1`` tokens."""
        if not -self.num_windows <= index < self.num_windows:
            raise IndexError(f"window {index} out of range for {self.num_windows} windows")
        start = (index % self.num_windows) * self.window
        return torch.from_numpy(np.asarray(self.tokens[start : start + self.window], dtype=np.int64))

    def split(self, valid_fraction: float) -> tuple[PackedWindows, PackedWindows]:
        """(train, valid): the last ``valid_fraction`` of windows (at least one)
        are held out for validation."""
        if not 0 < valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
        num_valid = max(1, int(self.num_windows * valid_fraction))
        num_train = self.num_windows - num_valid
        if num_train == 0:
            raise ValueError(
                f"only {self.num_windows} windows: too few to hold out {valid_fraction} for validation"
            )
        # Slicing a memmap is a view, so neither split copies the tokens.
        boundary = num_train * self.window
        train = PackedWindows(self.tokens[:boundary], self.seq_length)
        valid = PackedWindows(self.tokens[boundary : self.num_windows * self.window], self.seq_length)
        return train, valid


class GlobalBatchSampler:
    """Which windows make up the global batch of each optimizer step.

    Conceptually the windows are walked epoch after epoch, each epoch in a
    fresh seeded permutation, and step ``s`` takes positions
    ``[s * global_batch_size, (s + 1) * global_batch_size)`` of that walk; a
    batch may straddle two epochs.  :meth:`indices` computes this directly
    from (seed, step), so there is no state to checkpoint.
    """

    def __init__(self, num_windows: int, global_batch_size: int, seed: int):
        if num_windows < 1 or global_batch_size < 1:
            raise ValueError(
                f"num_windows ({num_windows}) and global_batch_size ({global_batch_size}) must be positive"
            )
        self.num_windows = num_windows
        self.global_batch_size = global_batch_size
        self.seed = seed
        # Memo of recent epochs' permutations, purely to avoid recomputing one
        # per step; results never depend on it.
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            # Seeding with the pair (seed, epoch) rather than seed + epoch keeps
            # runs with nearby seeds from replaying each other's epochs shifted by one.
            rng = np.random.default_rng((self.seed, epoch))
            self._permutations[epoch] = rng.permutation(self.num_windows)
        return self._permutations[epoch]

    def indices(self, step: int) -> list[int]:
        """Window indices of the global batch for optimizer step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        position = step * self.global_batch_size
        end = position + self.global_batch_size
        batch: list[int] = []
        while position < end:
            epoch, offset = divmod(position, self.num_windows)
            take = min(end - position, self.num_windows - offset)
            batch.extend(self._permutation(epoch)[offset : offset + take].tolist())
            position += take
        return batch


def micro_batches(
    windows: PackedWindows,
    sampler: GlobalBatchSampler,
    step: int,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This DP rank's micro-batches for ``step`` as (input_ids, labels) pairs,
    each ``[micro_batch_size, seq_length]``.

    Rank ``r`` gets the ``r``-th contiguous share of the global batch, so the
    ranks' shares concatenated in rank order are exactly the global batch.
    """
    global_batch_size = sampler.global_batch_size
    if global_batch_size % (dp_size * micro_batch_size) != 0:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by "
            f"dp_size {dp_size} * micro_batch_size {micro_batch_size} = {dp_size * micro_batch_size}"
        )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is out of range for dp_size {dp_size}")
    if sampler.num_windows != len(windows):
        raise ValueError(f"sampler covers {sampler.num_windows} windows but the dataset has {len(windows)}")
    share = global_batch_size // dp_size
    mine = sampler.indices(step)[dp_rank * share : (dp_rank + 1) * share]
    batches = []
    for start in range(0, share, micro_batch_size):
        stacked = torch.stack([windows[i] for i in mine[start : start + micro_batch_size]])
        batches.append((stacked[:, :-1].contiguous(), stacked[:, 1:].contiguous()))
    return batches
