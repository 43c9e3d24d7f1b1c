"""GRPO loss maths (issue #10) as pure torch functions: no model, no distributed code.

Pieces, in the order a trainer uses them:

* `group_advantages` / `zero_variance_groups`: one scalar advantage per sampled completion, from
  the rewards of its prompt's group of G samples (DeepSeekMath's outcome supervision), optionally
  without the std division (Dr. GRPO).
* `grpo_token_terms`: per-token clipped-surrogate loss with asymmetric clip range (DAPO's
  clip-higher: eps_low, eps_high) plus beta times the k3 estimate of KL(pi || ref), and diagnostics.
* `aggregate`: reduce a [B, T] per-token quantity to a scalar as a SUM of per-sequence terms divided
  by GLOBAL normalizers (`Normalizer`). Because nothing depends on which shard a sequence is in,
  summing `aggregate` over data-parallel ranks and pipeline micro-batches (each with the same
  global `Normalizer`) gives exactly the loss and gradient of the whole step's batch, whatever the
  parallel layout.

Numerics: log-probability inputs are promoted to at least float32, and the per-token log-ratios
that go through `exp` are clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] (as verl does) so that
neither the importance ratio nor k3 can overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from megads.config import LOSS_AGGREGATIONS as AGGREGATIONS  # the rl.loss_aggregation names, defined once

# exp(20) ~ 4.9e8: finite in float32/bfloat16 (overflow is at exp(88.7)), far beyond any ratio a
# sane update produces. verl clamps both the PPO log-ratio and low_var_kl's log-ratio to +-20.
LOG_RATIO_CLAMP = 20.0



# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------

def _check_rewards(rewards: Tensor) -> Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, samples per prompt], got shape {tuple(rewards.shape)}.")
    if rewards.shape[1] < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt to form a group baseline, got {rewards.shape[1]}.")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards


def zero_variance_groups(rewards: Tensor) -> Tensor:
    """[P] bool: prompts whose G rewards are all exactly equal (their advantages are 0, so they
    carry no policy-gradient signal; DAPO's dynamic sampling drops them)."""
    rewards = _check_rewards(rewards)
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def group_advantages(rewards: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages: rewards [P, G] -> advantages [P, G].

    scale_by_std=True:  (r - mean_g(r)) / (std_g(r) + eps)   (DeepSeekMath GRPO)
    scale_by_std=False:  r - mean_g(r)                         (Dr. GRPO: no std division)

    std is the SAMPLE standard deviation (Bessel-corrected, divide by G - 1), as TRL's GRPOTrainer
    computes it (`torch.std`, unbiased) and DeepSeekMath's reference implementation does; with
    G = 2 and rewards {0, 1} this gives +-1/sqrt(2), not +-1 as the population std would.

    Groups whose rewards are all equal (`zero_variance_groups`) get advantages of exactly 0, so
    they contribute exactly zero policy gradient. This is set explicitly, not left to arithmetic:
    in float32 seven rewards of 0.1 have mean 0.1 - 7.5e-9 and std 8e-9, which would otherwise
    give advantages of -0.007 (eps 1e-6) or -0.93 (eps 0).
    Advantages are constants: the result carries no graph.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    rewards = _check_rewards(rewards).detach()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (rewards.std(dim=1, keepdim=True, correction=1) + eps)
    flat = zero_variance_groups(rewards).unsqueeze(1)
    return torch.where(flat, torch.zeros_like(centred), centred)


# --------------------------------------------------------------------------------------------
# Per-token terms
# --------------------------------------------------------------------------------------------

def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref) on tokens sampled from pi (Schulman's k3):

        r = ref_logp - logp;  k3 = exp(r) - r - 1  (>= 0, 0 iff logp == ref_logp)

    Its expectation under pi is the exact KL, and its gradient w.r.t. logp is 1 - exp(r).

    r is clamped to [-20, 20] first, as verl's `low_var_kl` does: exp(r) grows without bound when
    the policy has pushed a sampled token far below the reference (or log-probs of a rare token
    are very negative, e.g. from bf16/rollout mismatch), and an overflow to inf would turn the
    whole loss into inf/nan. Inside the clamp the value and gradient are exact; beyond it the
    value saturates (finite: <= exp(20) - 21) and the gradient of that token's KL is zero.
    (verl additionally clamps the resulting KL to <= 10; this function does not, so the value is
    the true k3 whenever |r| <= 20.) Computed in at least float32.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp shapes differ: {tuple(logp.shape)} vs {tuple(ref_logp.shape)}.")
    dtype = _compute_dtype(logp, ref_logp)
    log_ratio = (ref_logp.to(dtype) - logp.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio) - log_ratio - 1.0


@dataclass
class TokenTerms:
    """Per-token outputs of `grpo_token_terms`, all [B, T]. Only `loss` and `kl_ref` carry the
    autograd graph; `ratio`, `clipped` and `ppo_kl` are detached diagnostics. Positions outside
    the completion mask hold meaningless values: reduce with `aggregate`."""
    loss: Tensor            # to MINIMISE: -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + beta * k3
    ratio: Tensor           # rho = exp(logp - old_logp)
    clipped: Tensor         # bool: the clipped term was strictly smaller, so it was taken (zero gradient)
    ppo_kl: Tensor          # old_logp - logp (its masked mean is the usual "approx KL")
    kl_ref: Optional[Tensor]  # k3 to the reference; None when ref_logp is None


def grpo_token_terms(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float,
                     ref_logp: Optional[Tensor] = None, beta: float = 0.0) -> TokenTerms:
    """Per-token GRPO objective with clip-higher (DAPO) and an optional k3 KL penalty.

    logp: [B, T] log-probs of the sampled tokens under the current policy (with graph);
    old_logp: [B, T] the same under the policy that sampled them (constant, detached here);
    advantages: [B] one per sequence, broadcast over its tokens (constant, detached here);
    ref_logp: [B, T] under the reference policy (constant, detached here), or None.

    loss = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * k3(logp, ref_logp).

    On the first iteration over a rollout batch (old_logp == logp.detach()) rho is exactly 1,
    nothing is clipped, and d loss / d logp = -A per token (plus beta's KL gradient).

    The log-ratio logp - old_logp is clamped to [-20, 20] before exp (as verl does) so rho stays
    finite; a clamped token's ratio gets no gradient. When the clipped term is taken its gradient
    is zero as well (the surrogate is flat there). Ties (rho exactly on the clip bound) take the
    unclipped branch, so they keep their full gradient rather than torch.minimum's half.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [batch, tokens], got shape {tuple(logp.shape)}.")
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp shape {tuple(old_logp.shape)} differs from logp shape {tuple(logp.shape)}.")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [batch] = [{logp.shape[0]}], got shape {tuple(advantages.shape)}.")
    if not 0.0 <= eps_low < 1.0 or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}.")
    if beta < 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}.")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (the reference policy's log-probs).")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} differs from logp shape {tuple(logp.shape)}.")

    dtype = _compute_dtype(logp, old_logp)
    logp = logp.to(dtype)
    old_logp = old_logp.detach().to(dtype)
    adv = advantages.detach().to(dtype).unsqueeze(1)

    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped_obj = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    clipped = clipped_obj < unclipped
    loss = -torch.where(clipped, clipped_obj, unclipped)

    kl_ref = None
    if ref_logp is not None:
        kl_ref = k3_kl(logp, ref_logp.detach())
        if beta != 0.0:
            loss = loss + beta * kl_ref

    return TokenTerms(loss=loss, ratio=ratio.detach(), clipped=clipped,
                      ppo_kl=(old_logp - logp).detach(), kl_ref=kl_ref)


# --------------------------------------------------------------------------------------------
# Aggregation over tokens and sequences
# --------------------------------------------------------------------------------------------

@dataclass
class Normalizer:
    """GLOBAL normalizers over the whole optimizer step's batch (all data-parallel ranks, all
    micro-batches), identical on every shard. A trainer sums local counts and all-reduces them
    once per step; `Normalizer.of` gives them for a batch held in one piece."""
    tokens: float          # completion tokens that count (the mask's sum)
    sequences: float       # sequences (rows), including any whose mask is empty
    max_length: int        # Dr. GRPO's constant, e.g. max_new_tokens

    def __post_init__(self):
        if self.tokens < 0 or self.sequences < 0 or self.max_length < 1:
            raise ValueError(f"Normalizer needs tokens >= 0, sequences >= 0 and max_length >= 1, got {self}.")

    @classmethod
    def of(cls, mask: Tensor, max_length: Optional[int] = None) -> "Normalizer":
        """Normalizer of a [B, T] mask taken as the whole batch; max_length defaults to T."""
        return cls(tokens=float(mask.to(torch.float64).sum()), sequences=float(mask.shape[0]),
                   max_length=int(mask.shape[1] if max_length is None else max_length))


def _positive(x: float) -> float:
    # A zero count means every summed term is zero too (no tokens / no sequences): return 0, not nan.
    return x if x > 0 else 1.0


def aggregate(values: Tensor, mask: Tensor, mode: str, norm: Normalizer) -> Tensor:
    """Scalar reduction of per-token `values` [B, T] over the tokens where `mask` [B, T] (bool, or
    float weights) is non-zero, with GLOBAL normalizers, so that summing `aggregate` over any
    partition of the step's sequences equals `aggregate` of the whole batch:

      token-mean               sum(values * mask) / norm.tokens                      (DAPO, TRL default)
      seq-mean-token-mean      sum_seq(sum_t(values * mask) / max(1, sum_t mask)) / norm.sequences
                                                                                     (DeepSeekMath GRPO)
      seq-mean-token-sum-norm  sum_seq(sum_t(values * mask) / norm.max_length) / norm.sequences
                                                                                     (Dr. GRPO)

    A sequence with an empty mask contributes 0. Masked-out positions are selected away (not
    multiplied by 0), so inf/nan there does not reach the result.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}.")
    if values.dim() != 2 or mask.shape != values.shape:
        raise ValueError(f"values and mask must both be [batch, tokens], got {tuple(values.shape)} and {tuple(mask.shape)}.")
    weights = mask.to(values.dtype) if values.is_floating_point() else mask.float()
    masked = torch.where(weights != 0, values * weights, torch.zeros((), dtype=weights.dtype, device=values.device))
    if mode == "token-mean":
        return masked.sum() / _positive(norm.tokens)
    per_seq = masked.sum(dim=1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / weights.sum(dim=1).clamp(min=1.0)
    else:  # seq-mean-token-sum-norm
        per_seq = per_seq / norm.max_length
    return per_seq.sum() / _positive(norm.sequences)
