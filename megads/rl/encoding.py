"""Task text to fixed-shape token sequences, the same for SFT, rollouts and evaluation.

Every sequence is `max_prompt_length + max_new_tokens` tokens:

    [end-of-text ... end-of-text, prompt tokens][completion tokens, end-of-text, end-of-text ...]
     \\______ left-padded to max_prompt_length ______/ \\__________ max_new_tokens ____________/

Left padding puts every prompt's last token at the same position, so a row's tokens sit at the
same positions whatever the other rows are (no attention mask needed: the padding is content the
model learns to skip, end-of-text being the document separator of pre-training too). The model
reads the sequence minus its last token and predicts each next token; SFT counts only the
completion's tokens (its end-of-text included) in the loss.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megads.config import ConfigError
from megads.model.loss import IGNORE_INDEX


def encode_prompts(prompts: Sequence[str], tokenizer, max_prompt_length: int) -> torch.Tensor:
    """[N, max_prompt_length] token ids, each prompt left-padded with end-of-text."""
    rows = []
    for text in prompts:
        ids = tokenizer.encode(text)
        if len(ids) > max_prompt_length:
            raise ConfigError(f"rl.max_prompt_length ({max_prompt_length}) is shorter than the prompt {text!r} "
                              f"({len(ids)} tokens).")
        rows.append([tokenizer.eos_id] * (max_prompt_length - len(ids)) + ids)
    return torch.tensor(rows, dtype=torch.long)


def encode_demonstrations(prompts: Sequence[str], completions: Sequence[str], tokenizer, max_prompt_length: int,
                          max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each [N, max_prompt_length + max_new_tokens - 1]: the model reads
    input_ids and is trained on labels, which hold the completion's tokens and its end-of-text
    (IGNORE_INDEX elsewhere)."""
    eos = tokenizer.eos_id
    prompt_ids = encode_prompts(prompts, tokenizer, max_prompt_length)
    sequences, labels = [], []
    for prompt, text, ids in zip(prompts, completions, prompt_ids.tolist()):
        completion = tokenizer.encode(text) + [eos]
        if len(completion) > max_new_tokens:
            raise ConfigError(f"rl.max_new_tokens ({max_new_tokens}) is shorter than the demonstration for "
                              f"{prompt!r} ({len(completion)} tokens with its end-of-text).")
        padding = max_new_tokens - len(completion)
        sequence = ids + completion + [eos] * padding
        target = [IGNORE_INDEX] * max_prompt_length + completion + [IGNORE_INDEX] * padding
        sequences.append(sequence[:-1])
        labels.append(target[1:])
    return torch.tensor(sequences, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def decode_completions(tokens: torch.Tensor, lengths: torch.Tensor, tokenizer, eos_id: int) -> list[str]:
    """The completions' text: tokens [N, T] up to their length, a final end-of-text left out."""
    texts = []
    for row, length in zip(tokens.tolist(), lengths.tolist()):
        ids = row[:length]
        if ids and ids[-1] == eos_id:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts
