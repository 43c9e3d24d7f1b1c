"""A seeded permutation of ``range(n)`` computed one index at a time.

``permute(i)`` is where position ``i`` of an epoch goes, without building the
permutation: a small Feistel network is a bijection on ``[0, 2**bits)``, and
re-applying it to values that land at ``n`` or above ("cycle walking") turns it
into a bijection on ``[0, n)``.  Memory and time per index do not depend on
``n``, so a data set of a billion windows is shuffled as cheaply as one of ten
(an array permutation would hold 8 GB per rank and take seconds at every epoch).
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast 64-bit hash with good avalanche (wraps modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class IndexPermutation:
    """A permutation of ``range(n)`` fixed by ``key`` (any tuple of non-negative ints)."""

    def __init__(self, n: int, key: tuple[int, ...]):
        if n < 1:
            raise ValueError(f"a permutation needs at least one element, got n={n}")
        self.n = n
        # Two halves of `half` bits each cover [0, n): the domain is less than 4n, so a
        # value needs fewer than 4 walks on average to land inside.
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self.half) - 1)
        self._round_keys = np.random.default_rng(key).integers(0, 2**63, size=_ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self._mask
        for round_key in self._round_keys:
            left, right = right, left ^ (_mix(right ^ round_key) & self._mask)
        return (left << half) | right

    def __call__(self, positions: np.ndarray | list[int]) -> np.ndarray:
        """Where each of ``positions`` (in ``[0, n)``) goes, as int64."""
        x = np.asarray(positions, dtype=np.uint64).copy()
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"position {int(x.max())} is out of range for a permutation of {self.n}")
        x = self._feistel(x)
        outside = x >= self.n
        while outside.any():
            x[outside] = self._feistel(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)
