"""What a forward pass carries across calls for one micro-batch: MLA's latent KV cache per layer
(generation) and the experts chosen per token of each MoE layer (routing replay).

A `PassState` belongs to one micro-batch on one rank and is never communicated: under pipeline
parallelism each rank keeps the entries of its own layers. The caller creates one per
micro-batch, hands it to every stage's forward, and moves its position on (`advance`) after
each call of the whole pipeline.

* **Latent KV cache** (`LatentCache`): per layer, only what MLA needs to attend to past tokens:
  the normalised compressed latent c_kv [kv_lora_rank] and the shared rotated RoPE key
  [qk_rope_head_dim] per token -- (kv_lora_rank + qk_rope_head_dim) numbers per token per layer,
  whatever the number of heads (DeepSeek-V3: 576, against 2 x 128 x 192 = 49,152 for a plain
  multi-head cache of the same model).
* **Routing tape** (`RoutingTape`): per MoE layer, the experts chosen for each token, recorded in
  the rollout and replayed in the passes that recompute the same sequences (log-probabilities,
  policy update), so that they route every token exactly as the rollout did. The router's scores
  are still computed from the current weights, so the gates keep their gradients.
"""

from __future__ import annotations

from typing import Optional

import torch

RECORD = "record"
REPLAY = "replay"


class LatentCache:
    """One layer's latent KV cache for a micro-batch, filled left to right up to `capacity` tokens."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.latent: Optional[torch.Tensor] = None      # [B, capacity, kv_lora_rank]
        self.rope_key: Optional[torch.Tensor] = None    # [B, capacity, qk_rope_head_dim]
        self.length = 0

    def append(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' latent [B, S, c] and rotated rope key [B, S, r]; returns every cached
        token's (latent, rope key) so far."""
        batch, seq, _ = latent.shape
        if self.latent is None:
            self.latent = latent.new_zeros(batch, self.capacity, latent.shape[-1])
            self.rope_key = rope_key.new_zeros(batch, self.capacity, rope_key.shape[-1])
        end = self.length + seq
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens; {end} were asked for.")
        self.latent[:, self.length:end] = latent
        self.rope_key[:, self.length:end] = rope_key
        self.length = end
        return self.latent[:, :end], self.rope_key[:, :end]

    def nbytes(self) -> int:
        return 0 if self.latent is None else self.latent.nbytes + self.rope_key.nbytes


class RoutingTape:
    """One MoE layer's expert choices for a micro-batch: [B, tokens, K], recorded chunk by chunk
    (``replaying`` False), then replayed in any chunks (``replaying`` True)."""

    def __init__(self, replaying: bool = False, chunks: Optional[list[torch.Tensor]] = None):
        self.replaying = replaying
        self.chunks: list[torch.Tensor] = list(chunks or [])
        self.cursor = 0

    def record(self, topk_idx: torch.Tensor) -> None:
        self.chunks.append(topk_idx)

    def recorded(self) -> torch.Tensor:
        """Everything recorded, [B, tokens, K]."""
        if len(self.chunks) > 1:
            self.chunks = [torch.cat(self.chunks, dim=1)]
        return self.chunks[0]

    def replay(self, batch: int, seq: int) -> torch.Tensor:
        """The recorded choices of the next `seq` tokens, [batch, seq, K]; -1 for tokens past the
        recording (a rollout that stopped early never fed its last positions: they select as usual)."""
        if not self.chunks:
            raise RuntimeError("routing replay: nothing was recorded for this layer.")
        tape = self.recorded()
        if tape.shape[0] != batch:
            raise RuntimeError(f"routing replay: the tape holds {tape.shape[0]} sequences; asked for {batch}.")
        out = tape[:, self.cursor:self.cursor + seq]
        if out.shape[1] < seq:
            out = torch.cat([out, out.new_full((batch, seq - out.shape[1], tape.shape[2]), -1)], dim=1)
        self.cursor += seq
        return out


class PassState:
    """One micro-batch's state across forward calls on this rank (see the module doc).

    `capacity`: tokens the KV cache holds (None: no cache, e.g. a full-sequence pass);
    `routing`: None, RECORD or REPLAY.
    """

    def __init__(self, capacity: Optional[int] = None, routing: Optional[str] = None):
        if routing not in (None, RECORD, REPLAY):
            raise ValueError(f"routing must be None, {RECORD!r} or {REPLAY!r}, got {routing!r}.")
        self.capacity = capacity
        self.routing = routing
        self.start = 0                                     # position of the next call's first token
        self.caches: dict[int, LatentCache] = {}
        self.tapes: dict[int, RoutingTape] = {}

    def cache(self, layer: int) -> Optional[LatentCache]:
        if self.capacity is None:
            return None
        if layer not in self.caches:
            self.caches[layer] = LatentCache(self.capacity)
        return self.caches[layer]

    def tape(self, layer: int) -> Optional[RoutingTape]:
        if self.routing is None:
            return None
        if layer not in self.tapes:
            if self.routing == REPLAY:
                raise RuntimeError(f"routing replay: no tape was recorded for layer {layer}.")
            self.tapes[layer] = RoutingTape()
        return self.tapes[layer]

    def advance(self, tokens: int) -> None:
        """Move on after a call of the whole pipeline that processed `tokens` positions."""
        self.start += tokens

    def replay(self) -> "PassState":
        """A state that replays this one's recorded routing from the first token (no KV cache)."""
        state = PassState(routing=REPLAY)
        for layer, tape in self.tapes.items():
            state.tapes[layer] = RoutingTape(replaying=True, chunks=tape.chunks)
        return state

    def take_rows(self, other: "PassState", rows: torch.Tensor, first_row: int = 0) -> None:
        """Replace the recorded routing of the rows marked in `rows` [B] (bool, the micro-batch's rows)
        by `other`'s (a pass over the same micro-batch shape). A tape may hold a slice of the rows
        (tensor parallelism splits a micro-batch's sequences over TP ranks): rows
        [first_row x its rows, ...) of the micro-batch, for this rank's index `first_row`."""
        for layer, tape in self.tapes.items():
            mine, theirs = tape.recorded(), other.tapes[layer].recorded()
            length = max(mine.shape[1], theirs.shape[1])
            mine, theirs = (torch.cat([t, t.new_full((t.shape[0], length - t.shape[1], t.shape[2]), -1)], dim=1)
                            for t in (mine, theirs))
            local = rows[first_row * mine.shape[0]:(first_row + 1) * mine.shape[0]].to(mine.device)
            tape.chunks = [torch.where(local[:, None, None], theirs, mine)]

    def cache_bytes(self) -> int:
        return sum(cache.nbytes() for cache in self.caches.values())
