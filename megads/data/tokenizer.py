"""Tokenizers: a byte-level BPE trained on the corpus, and a byte fallback.

Both expose the same small interface (:class:`Tokenizer`).  The end-of-text
token has id 0 in both, and is what separates packed documents.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of megads needs from a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, path: str | pathlib.Path) -> None: ...


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer with at most ``vocab_size`` entries.

    The vocab always holds the end-of-text token (id 0) and all 256 byte
    symbols, so any text can be encoded; a small corpus may stop short of
    ``vocab_size`` merges, which is fine.
    """
    min_vocab = 1 + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for byte-level BPE: it needs "
            f"at least {min_vocab} (256 bytes + {EOS_TOKEN})"
        )
    tokenizer = tokenizers.Tokenizer(models.BPE())
    # No prefix space: it would make decode(encode(s)) differ from s.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # listed first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    if tokenizer.token_to_id(EOS_TOKEN) != 0 or tokenizer.get_vocab_size() > vocab_size:
        raise RuntimeError(
            f"BPE training broke an invariant: eos id {tokenizer.token_to_id(EOS_TOKEN)} "
            f"(want 0), vocab {tokenizer.get_vocab_size()} (want <= {vocab_size})"
        )
    return tokenizer


class BPETokenizer:
    """:class:`Tokenizer` interface over a trained ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tokenizer = tokenizer
        # Text that happens to contain "<|endoftext|>" is encoded as ordinary
        # text, as ByteTokenizer does: only the pipeline may insert eos, or a
        # corpus could forge document boundaries.  (Not saved in tokenizer.json.)
        tokenizer.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Tokenizes in parallel in Rust; about twice as fast as a loop of encode().
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        # Keep the end-of-text token so decoding packed documents shows their boundaries.
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | pathlib.Path) -> None:
        self.tokenizer.save(str(path))


class ByteTokenizer:
    """Tokenizer-free fallback: each UTF-8 byte is a token.

    Ids below ``offset`` are special tokens; byte ``b`` has id ``b + offset``.
    """

    SPECIALS = (EOS_TOKEN,)
    offset = len(SPECIALS)
    vocab_size = 256 + offset
    eos_id = SPECIALS.index(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        return [byte + self.offset for byte in text.encode("utf-8")]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # Gather runs of bytes and decode each run whole, so that multi-byte
        # characters survive; special tokens are spelled out between runs.
        pieces: list[str] = []
        run = bytearray()
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the byte vocab [0, {self.vocab_size})")
            if token_id >= self.offset:
                run.append(token_id - self.offset)
                continue
            pieces.append(run.decode("utf-8", errors="replace"))
            run.clear()
            pieces.append(self.SPECIALS[token_id])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps({"type": "ByteTokenizer", "specials": self.SPECIALS}))


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """Load a tokenizer written by :meth:`Tokenizer.save`."""
    text = pathlib.Path(path).read_text(encoding="utf-8")
    saved = json.loads(text)
    if saved.get("type") == "ByteTokenizer":
        # The specials fix the id layout; a file from a different layout would
        # silently shift every id.
        if tuple(saved["specials"]) != ByteTokenizer.SPECIALS:
            raise ValueError(
                f"{path}: byte tokenizer specials {saved['specials']} do not match {ByteTokenizer.SPECIALS}"
            )
        return ByteTokenizer()
    return BPETokenizer(tokenizers.Tokenizer.from_str(text))
