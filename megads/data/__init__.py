"""Pre-training data pipeline: corpus, tokenizer, indexed dataset, packing, sampling, blending
(preprocessing user data: megads.data.preprocess)."""

from .blend import Blend, BlendedSampler, BlendedWindows
from .corpus import iter_documents, stdlib_source_files, take_until_bytes, text_files_in
from .dataset import GlobalBatchSampler, PackedWindows, build_or_load_corpus, micro_batches
from .indexed import CorruptDatasetError, IndexedDataset, IndexedDatasetWriter, dataset_paths, dtype_for_vocab
from .shuffle import IndexPermutation
from .tokenizer import (
    EOS_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_file_digest,
    train_bpe_tokenizer,
)

__all__ = [
    "EOS_TOKEN",
    "BPETokenizer",
    "Blend",
    "BlendedSampler",
    "BlendedWindows",
    "ByteTokenizer",
    "CorruptDatasetError",
    "GlobalBatchSampler",
    "IndexedDataset",
    "IndexPermutation",
    "IndexedDatasetWriter",
    "PackedWindows",
    "Tokenizer",
    "build_or_load_corpus",
    "dataset_paths",
    "dtype_for_vocab",
    "iter_documents",
    "load_tokenizer",
    "micro_batches",
    "stdlib_source_files",
    "take_until_bytes",
    "text_files_in",
    "tokenizer_file_digest",
    "train_bpe_tokenizer",
]
