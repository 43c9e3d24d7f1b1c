"""What a training run reads: its micro-batches for each step, and its held-out evaluation.

`megads train` reads a text corpus (`CorpusData`, data.source) or a blend of datasets made by
`megads preprocess` (`BlendedData`, data.datasets); `megads sft` reads a task's demonstrations
(megads.rl.sft). The trainer runs any of them the same way:

    data = build_training_data(cfg, ctx, log)         # every rank; rank 0 builds the caches first
    data.micro_batches(step, dp_rank, dp_size, micro_batch_size)   # [(input_ids, labels), ...]
    data.evaluate(model, cfg)                          # {"valid_loss": ...} (a collective)

All are pure functions of (seed, step) and the data-parallel rank, so a resumed run reads
exactly what an uninterrupted one would.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import torch

from megads.config import Config, ConfigError, dataset_weight
from megads.data import GlobalBatchSampler, PackedWindows, build_or_load_corpus, micro_batches
from megads.data.blend import Blend, BlendedSampler, BlendedWindows
from megads.data.prepared import open_prepared_dataset
from megads.data.tokenizer import tokenizer_file_digest


class TrainingData(Protocol):
    description: str

    def micro_batches(self, step: int, dp_rank: int, dp_size: int,
                      micro_batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def evaluate(self, model, cfg: Config) -> dict[str, float]: ...


def autocast(cfg: Config, device: torch.device):
    """The compute precision of train.precision (bf16 autocast, or nothing for fp32)."""
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def held_out_loss(model, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: Config) -> float:
    """Mean LM loss of held-out micro-batches, forward only (a collective under model parallelism)."""
    model.eval()
    with autocast(cfg, model.ctx.device):
        loss = model.evaluate_loss(batches)
    model.train()
    return loss


class CorpusData:
    """Packed windows of a tokenized text corpus (data.source), a held-out fraction for evaluation."""

    def __init__(self, train_windows: PackedWindows, valid_windows: PackedWindows, cfg: Config):
        t = cfg.train
        self.train_windows, self.valid_windows = train_windows, valid_windows
        self.sampler = GlobalBatchSampler(len(train_windows), t.global_batch_size, t.seed)
        self.description = f"{len(train_windows):,} training windows of {t.seq_length} tokens"

    @classmethod
    def build(cls, cfg: Config, ctx, log) -> "CorpusData":
        """Tokenizer and token cache: rank 0 builds them, the others then find them ready."""
        cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else Path.home() / ".cache" / "megads"
        for turn in ("build", "load"):
            if (turn == "build") == (ctx.rank == 0):
                tokenizer, corpus = build_or_load_corpus(cfg.data.source, cfg.model.vocab_size, cfg.data.tokenizer,
                                                         cfg.data.max_bytes, cache_dir, log=log)
            ctx.barrier()
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                              f"vocabulary ({tokenizer.vocab_size}).")
        windows = PackedWindows(corpus.tokens, cfg.train.seq_length).split(cfg.data.valid_fraction)
        return cls(*windows, cfg)

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int):
        return micro_batches(self.train_windows, self.sampler, step, dp_rank, dp_size, micro_batch_size)

    def evaluate(self, model, cfg: Config) -> dict[str, float]:
        """Mean LM loss over the first `eval_batches` micro-batches of the held-out windows (every
        rank evaluates the same batches). A last, partial micro-batch is left out (a pipeline's
        buffers are sized for full micro-batches)."""
        mbs = cfg.train.micro_batch_size
        count = min(len(self.valid_windows) // mbs, cfg.train.eval_batches)
        batches = []
        for start in range(0, count * mbs, mbs):
            batch = torch.stack([self.valid_windows[i] for i in range(start, start + mbs)])
            batches.append((batch[:, :-1], batch[:, 1:]))
        return {"valid_loss": held_out_loss(model, batches, cfg)}


class BlendedData:
    """Packed windows of the preprocessed datasets of data.datasets, blended by weight (megads.data.blend);
    the last data.valid_fraction of each dataset's windows is held out for evaluation."""

    def __init__(self, names: list[str], train: list[PackedWindows], valid: list[PackedWindows], blend: Blend,
                 cfg: Config):
        t = cfg.train
        self.blend = blend
        self.train_windows, self.valid_windows = BlendedWindows(train), BlendedWindows(valid)
        self.sampler = BlendedSampler(blend, [len(w) for w in train], t.global_batch_size, t.seed)
        parts = ", ".join(f"{name} ({weight:.0%} of samples, {len(windows):,} windows)"
                          for name, weight, windows in zip(names, blend.weights, train))
        self.description = f"a blend of {len(names)} datasets of {t.seq_length}-token windows: {parts}"

    @classmethod
    def build(cls, cfg: Config, ctx, log) -> "BlendedData":
        """Open and check every dataset (on every rank: opening a memory map costs nothing)."""
        d = cfg.data
        tokenizer_file = Path(d.tokenizer_file).expanduser()
        if not tokenizer_file.is_file():
            raise ConfigError(f"data.tokenizer_file {tokenizer_file} does not exist.")
        digest = tokenizer_file_digest(tokenizer_file)
        names, train, valid = [], [], []
        for i, entry in enumerate(d.datasets):
            field = f"data.datasets[{i}].path"
            prefix = str(Path(entry["path"]).expanduser())
            dataset = open_prepared_dataset(prefix, field, str(tokenizer_file), digest, cfg.model.vocab_size)
            try:
                split = PackedWindows(dataset.tokens, cfg.train.seq_length).split(d.valid_fraction)
            except ValueError as err:  # too few tokens for a window, or for holding some out
                raise ConfigError(f"{field} ({prefix}): {err}.") from None
            names.append(Path(prefix).name)
            train.append(split[0])
            valid.append(split[1])
        return cls(names, train, valid, Blend([dataset_weight(entry) for entry in d.datasets]), cfg)

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int):
        return micro_batches(self.train_windows, self.sampler, step, dp_rank, dp_size, micro_batch_size)

    def evaluate(self, model, cfg: Config) -> dict[str, float]:
        """Mean LM loss over `eval_batches` micro-batches of held-out windows, the datasets interleaved by the
        blend (each dataset's held-out windows in order, from the first again when one runs out)."""
        mbs = cfg.train.micro_batch_size
        count = min(max(len(self.valid_windows) // mbs, 1), cfg.train.eval_batches)
        located = [self.blend.locate(sample) for sample in range(count * mbs)]
        windows = [self.valid_windows[dataset, j % len(self.valid_windows.datasets[dataset])]
                   for dataset, j in located]
        batches = []
        for start in range(0, len(windows), mbs):
            batch = torch.stack(windows[start:start + mbs])
            batches.append((batch[:, :-1], batch[:, 1:]))
        return {"valid_loss": held_out_loss(model, batches, cfg)}


def build_training_data(cfg: Config, ctx, log) -> TrainingData:
    """What `megads train` reads: the blend of data.datasets when given, else the corpus of data.source."""
    return (BlendedData if cfg.data.datasets is not None else CorpusData).build(cfg, ctx, log)
