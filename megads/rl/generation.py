"""Generation on the training model: batched prefill and KV-cached decode through the pipeline stages.

    rollout = generate(stages, prompts, keys, SamplingParams(temperature=1.0), max_new_tokens=32,
                       eos_id=0, micro_batch_size=8)

The same `ModelStages` object that trains runs generation: every call is a forward-only pass of
the pipeline schedule (`ModelStages.forward_only`) over this rank's micro-batches, each of which
keeps a `PassState` on every rank (the latent KV cache of that rank's layers, and with
`record_routing` the experts chosen per token). The first call feeds the prompts (prefill), each
later one the tokens just sampled (decode, the absorbed MLA form on the latent cache); the last
stage samples the next token from its vocabulary shard (`megads.rl.sampling`) and the result
reaches every pipeline rank.

Prompts are left-padded to one length by the caller, so every row's tokens sit at the same
positions whatever else is in the batch, and nothing here depends on the layout: a row's samples
depend only on its key (seed, step, prompt, sample) and the weights.

Every rank of the job takes part in every step until all rows of all data-parallel ranks have
finished (or `max_new_tokens`): expert parallelism spans data-parallel ranks, so a rank whose rows
are done still runs its share of every all-to-all. A finished row keeps decoding end-of-text
tokens, which the completion mask leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megads.model.pass_state import RECORD, PassState
from megads.rl.sampling import SamplingParams, sample_next_tokens, sampling_key
from parallel.group import Group


@dataclass
class Rollout:
    """This rank's generated rows (in the order of the prompts given)."""

    tokens: torch.Tensor           # [N, prompt + max_new_tokens]: prompt, completion, end-of-text padding
    completion_mask: torch.Tensor  # [N, max_new_tokens] bool: completion tokens up to and including end-of-text
    logprobs: torch.Tensor         # [N, max_new_tokens] log-probability of each sampled token (rollout policy)
    lengths: torch.Tensor          # [N] completion tokens (end-of-text included when emitted)
    truncated: torch.Tensor        # [N] bool: no end-of-text within max_new_tokens
    states: list[PassState]        # per micro-batch: the routing tapes recorded (record_routing)
    cache_bytes: int               # latent KV cache of this rank's layers, all micro-batches

    @property
    def prompt_length(self) -> int:
        return self.tokens.shape[1] - self.completion_mask.shape[1]


def _sample_head(stage, h: torch.Tensor, target) -> torch.Tensor:
    """The last stage's head for generation: sample each row's next token from the last position."""
    keys, params, vocab_size, valid_vocab_size = target
    model = stage.model
    logits = model.vocab_logits(h[:, -1:])[:, 0]                  # this rank's vocabulary shard [B, V/t]
    tokens, logp = sample_next_tokens(logits, params, keys, vocab_size, model.ctx.tp, valid_vocab_size)
    return torch.stack((tokens.double(), logp.double()), dim=-1)


@torch.no_grad()
def generate(stages, prompts: torch.Tensor, keys: Sequence[tuple[int, ...]], params: SamplingParams,
             max_new_tokens: int, eos_id: int, micro_batch_size: int, record_routing: bool = False,
             valid_vocab_size: Optional[int] = None, world: Optional[Group] = None) -> Rollout:
    """Sample up to `max_new_tokens` after each of this rank's `prompts` [N, P] (a collective of the
    whole job: every rank calls it with the same N, P and settings). `keys[i]` identifies row i
    (e.g. (seed, step, prompt id, sample index)); the token at position p is drawn with
    `sampling_key(*keys[i], p)`. `valid_vocab_size`: the tokenizer's vocabulary, when the model's is
    padded beyond it (those ids are never sampled)."""
    device = stages.ctx.device
    rows, prompt_length = prompts.shape
    if rows % micro_batch_size:
        raise ValueError(f"{rows} rows do not split into micro-batches of {micro_batch_size}.")
    world = world or Group.world()
    vocab_size = stages.cfg.model.vocab_size
    capacity = prompt_length + max_new_tokens
    prompts = prompts.to(device)
    micro = [slice(i, i + micro_batch_size) for i in range(0, rows, micro_batch_size)]
    states = [PassState(capacity=capacity, routing=RECORD if record_routing else None) for _ in micro]
    sampled = torch.full((rows, max_new_tokens), eos_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float64, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    inputs = [prompts[m] for m in micro]
    was_training = stages.training
    stages.eval()
    try:
        for step in range(max_new_tokens):
            position = prompt_length + step                 # of the token being sampled
            targets = [([sampling_key(*keys[i], position) for i in range(m.start, m.stop)], params, vocab_size,
                        valid_vocab_size) for m in micro]
            out = stages.forward_only(inputs, _sample_head, (micro_batch_size, 2), targets, states,
                                      dtype=torch.float64)
            for state, chunk in zip(states, inputs):
                state.advance(chunk.shape[1])
            tokens = out[..., 0].reshape(rows).long()
            tokens = torch.where(finished, torch.full_like(tokens, eos_id), tokens)
            sampled[:, step] = tokens
            logprobs[:, step] = torch.where(finished, torch.zeros_like(tokens, dtype=torch.float64),
                                            out[..., 1].reshape(rows))
            ended = ~finished & (tokens == eos_id)
            lengths = torch.where(ended, torch.full_like(lengths, step + 1), lengths)
            finished |= ended
            # every rank of the job decodes as long as any row anywhere is unfinished (module doc)
            unfinished = (~finished).sum().reshape(1).to(torch.float64)
            if world.all_reduce(unfinished).item() == 0:
                break
            inputs = [tokens[m].unsqueeze(1) for m in micro]
    finally:
        stages.train(was_training)
    completion_mask = torch.arange(max_new_tokens, device=device) < lengths.unsqueeze(1)
    return Rollout(torch.cat([prompts, sampled], dim=1), completion_mask, logprobs.float(), lengths, ~finished,
                   states, sum(state.cache_bytes() for state in states))
