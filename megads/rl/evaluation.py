"""Held-out evaluation of a task by generation: greedy pass@1, and pass@G with G samples per problem.

The problems are spread over the data-parallel ranks (each generates its share; the counts are
summed), padded with repeats to fill whole micro-batches on every rank (the repeats are not
counted). A collective of the whole job.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megads.config import RLConfig
from megads.data import ByteTokenizer
from megads.rl.encoding import decode_completions, encode_prompts
from megads.rl.generation import generate
from megads.rl.rewards import accuracy_reward
from megads.rl.sampling import SamplingParams

EVAL_STREAM = -1        # the "step" part of evaluation sampling keys: never a training step


def _share(count: int, rank: int, size: int, micro_batch_size: int) -> tuple[list[int], int]:
    """Indices of this rank's items (padded by repeating its first one) and how many are real."""
    per_rank = -(-count // size)
    per_rank = -(-per_rank // micro_batch_size) * micro_batch_size
    mine = list(range(rank, count, size))
    return mine + [mine[0] if mine else 0] * (per_rank - len(mine)), len(mine)


@torch.no_grad()
def evaluate_task(stages, problems: Sequence, rl: RLConfig, micro_batch_size: int, seed: int,
                  samples: int = 1) -> dict[str, float]:
    """{"eval_accuracy": greedy pass@1} and, with samples > 1, {"eval_pass_at_g": the fraction of
    problems that at least one of `samples` samples (rl.temperature, top-p, top-k) solves}."""
    ctx = stages.ctx
    tokenizer = ByteTokenizer()
    indices, real = _share(len(problems), ctx.dp.rank, ctx.dp.size, micro_batch_size)
    mine = [problems[i] for i in indices]
    prompts = encode_prompts([p.prompt for p in mine], tokenizer, rl.max_prompt_length)

    def solved(params: SamplingParams, sample: int) -> torch.Tensor:
        keys = [(seed, EVAL_STREAM, i, sample) for i in indices]
        rollout = generate(stages, prompts, keys, params, rl.max_new_tokens, tokenizer.eos_id, micro_batch_size,
                           valid_vocab_size=tokenizer.vocab_size)
        texts = decode_completions(rollout.tokens[:, rollout.prompt_length:].cpu(), rollout.lengths.cpu(), tokenizer,
                                   tokenizer.eos_id)
        return torch.tensor([accuracy_reward(text, p) for text, p in zip(texts, mine)]) > 0

    greedy = solved(SamplingParams(temperature=0.0), 0)
    any_sample = torch.zeros_like(greedy)
    if samples > 1:
        params = SamplingParams(rl.temperature, rl.top_p, rl.top_k)
        for sample in range(samples):
            any_sample |= solved(params, sample)
    counts = torch.tensor([greedy[:real].sum().item(), any_sample[:real].sum().item()], dtype=torch.float64,
                          device=ctx.device)
    ctx.dp.all_reduce(counts)
    result = {"eval_accuracy": counts[0].item() / len(problems)}
    if samples > 1:
        result["eval_pass_at_g"] = counts[1].item() / len(problems)
    return result
