"""Datasets made by `megads preprocess`: what their index records, and the checks training makes.

The ``.idx`` of a preprocessed dataset carries (format version 2, megads.data.indexed) a record of
its making: the tokenizer (its file's SHA-256, vocabulary size, end-of-document token) and the
largest token id written. Training opens each dataset of ``data.datasets`` through
:func:`open_prepared_dataset`, which refuses, in one sentence naming the config field and the file,
a dataset that is missing, truncated, made by another tokenizer than ``data.tokenizer_file``, or
holding ids the model's embedding has no row for.
"""

from __future__ import annotations

import os
import pathlib

from megads.config import ConfigError
from megads.errors import RunFailure

from .indexed import CorruptDatasetError, IndexedDataset, dataset_paths

MADE_BY = "megads preprocess"


class DatasetError(RunFailure):
    """A dataset file is damaged (truncated, corrupt): one sentence naming it and the config field."""


def preprocess_metadata(tokenizer_file: str | os.PathLike, tokenizer_digest: str, vocab_size: int,
                        eod_token: str, eod_id: int, max_token_id: int) -> dict:
    """What the index of a preprocessed dataset records about its making."""
    return {
        "made_by": MADE_BY,
        "tokenizer": {"file": pathlib.Path(tokenizer_file).name, "sha256": tokenizer_digest,
                      "vocab_size": vocab_size, "eod_token": eod_token, "eod_id": eod_id},
        "max_token_id": max_token_id,
    }


def open_prepared_dataset(prefix: str, field: str, tokenizer_file: str, tokenizer_digest: str,
                          model_vocab_size: int) -> IndexedDataset:
    """The dataset at ``prefix`` (named by config field ``field``), checked against the tokenizer the run
    uses (``tokenizer_file``, whose SHA-256 is ``tokenizer_digest``) and the model's vocabulary."""
    bin_path, idx_path = dataset_paths(prefix)
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise ConfigError(f"{field} names {prefix}, but {path} does not exist (make it with megads preprocess).")
    try:
        dataset = IndexedDataset(prefix)
    except CorruptDatasetError as err:
        raise DatasetError(f"{field}: {err}; preprocess it again.") from None
    made = dataset.metadata
    tokenizer = made.get("tokenizer")
    if made.get("made_by") != MADE_BY or not isinstance(tokenizer, dict):
        raise ConfigError(f"{field}: {idx_path} does not record which tokenizer made it (it was not written by "
                          f"megads preprocess); preprocess the text with data.tokenizer_file.")
    if tokenizer.get("sha256") != tokenizer_digest:
        raise ConfigError(
            f"{field}: {idx_path} was made by another tokenizer ({tokenizer.get('file')}, vocabulary "
            f"{tokenizer.get('vocab_size')}, sha256 {str(tokenizer.get('sha256'))[:12]}) than data.tokenizer_file "
            f"{tokenizer_file} (sha256 {tokenizer_digest[:12]}); preprocess it again with that tokenizer.")
    vocab_size, max_token_id = tokenizer.get("vocab_size"), made.get("max_token_id")
    if not isinstance(vocab_size, int) or not isinstance(max_token_id, int):
        raise DatasetError(f"{field}: {idx_path} records no vocabulary size or largest token id; corrupt.")
    if vocab_size > model_vocab_size or max_token_id >= model_vocab_size:
        raise ConfigError(
            f"{field}: {idx_path} holds token ids up to {max_token_id} from a vocabulary of {vocab_size}, but "
            f"model.vocab_size is {model_vocab_size}; the embedding needs a row for every id.")
    return dataset
