"""Blending several tokenized datasets by weight, sampled as a pure function of (seed, step).

The blended stream of samples interleaves the datasets deterministically: sample
``g`` comes from dataset ``d(g)`` as that dataset's ``j(g)``-th sample, with
every prefix of the stream holding each dataset in proportion to its weight to
within one sample per dataset (as Megatron's blending does, but computed per
sample instead of as a precomputed index).  Dataset 0 takes its share of the
stream evenly spread, dataset 1 its share of what is left, and so on: a hit of
level ``i`` is where ``floor(m * r + 1/2)`` steps up, ``r`` being the level's
share, so both "is ``m`` a hit" and "how many hits before ``m``" are one
integer division.

Within a dataset, the ``j``-th sample is window ``j mod n`` of epoch
``j div n`` in a seeded per-(dataset, epoch) permutation (megads.data.shuffle).
So which dataset and which window each position of a global batch reads depends
only on the seed, the step and the blend: a resumed run or another number of
data-parallel ranks needs no sampler state.
"""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction

import torch

from .dataset import PackedWindows
from .shuffle import IndexPermutation

# Weights become exact fractions (so the interleave is exact integer arithmetic);
# a denominator of a million keeps any weight within 1e-6 of what was written.
_WEIGHT_DENOMINATOR = 10**6


class Blend:
    """The deterministic interleave of ``len(weights)`` datasets."""

    def __init__(self, weights: list[float]):
        if not weights or any(not w > 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {weights}")
        exact = [Fraction(w).limit_denominator(_WEIGHT_DENOMINATOR) or Fraction(1, _WEIGHT_DENOMINATOR)
                 for w in weights]
        total = sum(exact)
        self.weights = [float(w / total) for w in exact]
        # Level i's share of the samples that levels < i left: w_i / (w_i + ... + w_last); the last is 1.
        self._shares = [(share.numerator, share.denominator)
                        for share in (w / sum(exact[i:]) for i, w in enumerate(exact))]

    def locate(self, sample: int) -> tuple[int, int]:
        """(dataset, index within that dataset) of blended sample ``sample``."""
        m = sample
        for dataset, (p, q) in enumerate(self._shares):
            before = (2 * m * p + q) // (2 * q)  # hits of this level among its first m samples
            if (2 * (m + 1) * p + q) // (2 * q) > before:
                return dataset, before
            m -= before  # position among the samples this level leaves to the next
        raise AssertionError("the last level takes every sample")  # its share is 1

    def counts(self, samples: int) -> list[int]:
        """How many of the first ``samples`` blended samples each dataset supplies."""
        counts, m = [], samples
        for p, q in self._shares:
            counts.append((2 * m * p + q) // (2 * q))
            m -= counts[-1]
        return counts


class BlendedWindows:
    """The packed windows of several datasets, indexed by (dataset, window) pairs."""

    def __init__(self, datasets: list[PackedWindows]):
        self.datasets = datasets

    def __len__(self) -> int:
        return sum(len(windows) for windows in self.datasets)

    def __getitem__(self, index: tuple[int, int]) -> torch.Tensor:
        dataset, window = index
        return self.datasets[dataset][window]


class BlendedSampler:
    """Which (dataset, window) pairs make up the global batch of each optimizer step:
    step ``s`` reads blended samples ``[s * global_batch_size, (s + 1) * global_batch_size)``."""

    def __init__(self, blend: Blend, windows_per_dataset: list[int], global_batch_size: int, seed: int):
        if len(windows_per_dataset) != len(blend.weights):
            raise ValueError(f"{len(blend.weights)} blend weights for {len(windows_per_dataset)} datasets")
        if min(windows_per_dataset) < 1 or global_batch_size < 1:
            raise ValueError(f"windows per dataset ({windows_per_dataset}) and global_batch_size "
                             f"({global_batch_size}) must be positive")
        self.blend = blend
        self.windows_per_dataset = windows_per_dataset
        self.num_windows = sum(windows_per_dataset)  # what micro_batches checks against the windows
        self.global_batch_size = global_batch_size
        self.seed = seed

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(dataset, window) of each position of the global batch of optimizer step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        first = step * self.global_batch_size
        located = [self.blend.locate(sample) for sample in range(first, first + self.global_batch_size)]
        # One permutation call per (dataset, epoch) the batch touches, over all its positions there.
        positions: dict[tuple[int, int], list[int]] = defaultdict(list)
        for slot, (dataset, j) in enumerate(located):
            epoch, _ = divmod(j, self.windows_per_dataset[dataset])
            positions[dataset, epoch].append(slot)
        batch: list[tuple[int, int]] = [(0, 0)] * len(located)
        for (dataset, epoch), slots in positions.items():
            n = self.windows_per_dataset[dataset]
            permutation = IndexPermutation(n, (self.seed, dataset, epoch))
            windows = permutation([located[slot][1] % n for slot in slots])
            for slot, window in zip(slots, windows.tolist()):
                batch[slot] = (dataset, window)
        return batch
