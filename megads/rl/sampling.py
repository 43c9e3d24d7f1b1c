"""Sampling the next token from vocabulary shards, the same whatever the parallel layout.

Under tensor parallelism each rank holds the logits of its vocabulary shard [B, V/t]. A token is
sampled without gathering the logits, by the Gumbel-max trick: token = argmax_v (z_v + g_v) with
z = logits / temperature and g_v = -log(E_v), E_v ~ Exp(1) independent per vocabulary entry, which
samples exactly from softmax(z). Every rank takes the argmax over its shard and one all-gather of
(best value, its id) per row picks the global winner (ties go to the smaller id). Temperature 0
is greedy decoding (g = 0).

The noise of a row is a counter-based hash of (the row's key, token id), the key derived by the
caller from (seed, step, prompt, sample, position): each rank computes it on its device for its
own shard only, and an id gets the same noise whatever the shard, so a row samples the same token
under any tensor-, pipeline-, expert- or data-parallel layout and in any batch.

Filters, applied to z before the noise: top-k keeps the k largest (each rank's own top-k values are
all-gathered to find the k-th largest overall: k numbers per row and rank); top-p keeps the
smallest set of tokens whose probability reaches p, found from the candidates' values all-gathered
(the top-k survivors when top-k is on, else the whole shard: then, for that one position, the
row's logits do cross the group). The reported log-probability of the sampled token is under the
unfiltered softmax(z), as the policy's log-probability pass computes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from parallel.group import Group
from parallel.tensor import gather_along_dim


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 turn the filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def sampling_key(*parts: int) -> int:
    """A 63-bit generator seed from integers (seed, step, prompt, sample, position, ...)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (Thomas Mueller's) of int64 tensors holding values < 2^32; products stay
    below 2^63, so nothing overflows."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def _gumbel_noise(keys: Sequence[int], start: int, end: int, device) -> torch.Tensor:
    """-log(-log(U)) noise [B, end - start] for vocabulary ids [start, end): U is a counter-based hash
    of (row key, token id), computed on the device for this shard only, so every id's noise is the
    same whatever the shard it falls in."""
    key = torch.tensor(list(keys), dtype=torch.int64, device=device)
    row = _hash32(_hash32(key >> 32) ^ (key & _MASK32))
    ids = torch.arange(start, end, dtype=torch.int64, device=device)
    bits = _hash32(_hash32(row[:, None] ^ ids[None, :]) ^ row[:, None])
    uniform = (bits.double() + 0.5) / 2.0 ** 32
    return -(-uniform.log()).log().float()


def _top_values(z: torch.Tensor, k: int, tp: Group) -> torch.Tensor:
    """Each row's k largest values from every TP rank's shard, [B, t x k] (k numbers per rank cross)."""
    return gather_along_dim(z.topk(min(k, z.shape[-1]), dim=-1).values, -1, tp)


def _keep_top_k(z: torch.Tensor, k: int, tp: Group) -> torch.Tensor:
    kth = _top_values(z, k, tp).topk(k, dim=-1).values[:, -1:]
    return z.masked_fill(z < kth, float("-inf"))


def _keep_top_p(z: torch.Tensor, p: float, candidates_per_rank: int, tp: Group) -> torch.Tensor:
    ordered = _top_values(z, candidates_per_rank, tp).sort(dim=-1, descending=True).values
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    # the first position where the cumulative mass reaches p is the last token kept
    last = (cumulative < p).sum(dim=-1, keepdim=True).clamp(max=ordered.shape[-1] - 1)
    threshold = ordered.gather(-1, last)
    return z.masked_fill(z < threshold, float("-inf"))


def _log_softmax_at(z: torch.Tensor, tokens: torch.Tensor, vocab_start: int, tp: Group) -> torch.Tensor:
    """log softmax(z)[token] per row from vocabulary shards (z finite)."""
    max_z = z.max(dim=-1).values
    if tp.size > 1:
        tp.all_reduce(max_z, op=dist.ReduceOp.MAX)
    local = tokens - vocab_start
    mine = (local >= 0) & (local < z.shape[-1])
    target = z.gather(-1, local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    stats = torch.stack(((z - max_z.unsqueeze(-1)).exp().sum(dim=-1), torch.where(mine, target, torch.zeros_like(target))))
    if tp.size > 1:
        tp.all_reduce(stats)
    return stats[1] - max_z - stats[0].log()


@torch.no_grad()
def sample_next_tokens(logits: torch.Tensor, params: SamplingParams, keys: Sequence[int], vocab_size: int,
                       tp: Optional[Group] = None, valid_vocab_size: Optional[int] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], their log-probabilities [B]) for this rank's vocabulary shard of the next-token
    logits [B, V/t] (a collective of the TP group). `keys[b]` seeds row b's noise (module doc).
    Ids from `valid_vocab_size` on (the model's vocabulary padded beyond the tokenizer's) are never
    sampled."""
    tp = tp or Group(None, "tp")
    shard = logits.shape[-1]
    vocab_start = tp.rank * shard
    raw = logits.float()
    z = raw / params.temperature if params.temperature > 0 else raw
    logp_source = z
    if valid_vocab_size is not None and valid_vocab_size < vocab_size:
        ids = torch.arange(vocab_start, vocab_start + shard, device=z.device)
        z = z.masked_fill(ids >= valid_vocab_size, float("-inf"))
    if params.top_k > 0 and params.top_k < vocab_size:
        z = _keep_top_k(z, params.top_k, tp)
    if params.top_p < 1.0:
        z = _keep_top_p(z, params.top_p, params.top_k if params.top_k > 0 else shard, tp)
    if params.temperature > 0:
        z = z + _gumbel_noise(keys, vocab_start, vocab_start + shard, z.device)
    best, index = z.max(dim=-1)
    ids = index + vocab_start
    if tp.size > 1:
        pairs = gather_along_dim(torch.stack((best.double(), ids.double()), dim=-1), -1, tp).view(len(keys), tp.size, 2)
        top = pairs[..., 0].max(dim=-1, keepdim=True).values
        ids = torch.where(pairs[..., 0] == top, pairs[..., 1], torch.full_like(pairs[..., 1], float(vocab_size)))
        ids = ids.min(dim=-1).values.long()
    return ids, _log_softmax_at(logp_source, ids, vocab_start, tp)
