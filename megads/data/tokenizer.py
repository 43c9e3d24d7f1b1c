"""Tokenizers: a byte-level BPE trained on the corpus, and a byte fallback.

Both expose the same small interface (:class:`Tokenizer`).  The end-of-text
token has id 0 in both, and is what separates packed documents.
"""

from __future__ import annotations

import hashlib
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
    """:class:`Tokenizer` interface over a ``tokenizers.Tokenizer``: the project's
    byte-level BPE, or any ``tokenizer.json`` (whose end-of-document token is
    ``eos_token``, e.g. ``"</s>"``)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN):
        self.tokenizer = tokenizer
        # Text that happens to contain "<|endoftext|>" is encoded as ordinary
        # text, as ByteTokenizer does: only the pipeline may insert eos, or a
        # corpus could forge document boundaries.  (Not saved in tokenizer.json.)
        tokenizer.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(eos_token)
        if self.eos_id is None:
            raise ValueError(f"the tokenizer has no token {eos_token!r} to end documents with")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Tokenizes in parallel in Rust; about twice as fast as a loop of encode(). encode_batch_fast
        # (tokenizers >= 0.20) gives the same ids without computing character offsets: twice as fast again.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [encoding.ids for encoding in encode(texts)]

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


def load_tokenizer(path: str | pathlib.Path, eos_token: str | None = None) -> Tokenizer:
    """Load a tokenizer written by :meth:`Tokenizer.save`, or any Hugging Face
    ``tokenizer.json``; ``eos_token`` (default ``<|endoftext|>``) names the token
    that ends a document."""
    text = pathlib.Path(path).read_text(encoding="utf-8")
    saved = json.loads(text)
    if saved.get("type") == "ByteTokenizer":
        # The specials fix the id layout; a file from a different layout would
        # silently shift every id.
        if tuple(saved["specials"]) != ByteTokenizer.SPECIALS:
            raise ValueError(
                f"{path}: byte tokenizer specials {saved['specials']} do not match {ByteTokenizer.SPECIALS}"
            )
        if eos_token not in (None, EOS_TOKEN):
            raise ValueError(f"{path}: the byte tokenizer's end-of-document token is {EOS_TOKEN}, not {eos_token!r}")
        return ByteTokenizer()
    try:
        return BPETokenizer(tokenizers.Tokenizer.from_str(text), eos_token or EOS_TOKEN)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def tokenizer_file_digest(path: str | pathlib.Path) -> str:
    """The SHA-256 of a tokenizer file's bytes: what identifies the tokenizer a dataset was made with."""
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
