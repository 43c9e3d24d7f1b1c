"""GRPO (`megads grpo`): DeepSeek-R1's reinforcement learning with rule-based rewards, on the
parallel model that trains.

One step, for every layout (TP, PP with any schedule, EP, DP):

1. **Rollout.** `rl.prompts_per_step` train-split problems (a pure function of seed and step),
   `rl.group_size` samples each; global row j is sample j % G of prompt j // G, and each
   data-parallel rank generates its contiguous share of the rows, in micro-batches of
   train.micro_batch_size, with the policy's `ModelStages` (megads.rl.generation: KV-cached,
   absorbed MLA decode; samples keyed by (seed, step, prompt, sample, position), so they do not
   depend on the layout). With `rl.routing_replay` the experts chosen per token are recorded.
2. **Rewards** (megads.rl.rewards, weights from `rl.rewards`) on each rank's completions; the
   rewards of all rows are all-gathered, so every rank forms the same group advantages
   (megads.rl.grpo_loss; a truncated completion is kept, masked out of the loss, or given
   `rl.truncation_penalty`, per `rl.truncated`).
3. **Reference** log-probabilities (β > 0 only): a frozen copy of the starting policy, forward only.
4. **Update**, `rl.policy_iterations` (μ) optimizer steps on the rollout: the policy's training
   schedule runs the rows again (the same micro-batches, replaying the rollout's routing), and the
   last stage turns its hidden states into log-probabilities of the sampled tokens (vocabulary-
   parallel: the logits are never gathered) and into the clipped-surrogate loss, aggregated over
   the *global* batch (`rl.loss_aggregation`): every micro-batch on every rank adds its share,
   divided by global counts, so the loss and its gradient do not depend on the layout. The first
   iteration's ratios are exactly 1 (its old log-probabilities are its own, detached); later
   iterations use those. `logprob_gap` compares the rollout's log-probabilities with the first
   iteration's.
5. Metrics (metrics.jsonl, TensorBoard, console), held-out evaluation every `rl.eval_every` steps
   (greedy pass@1 and pass@G on `rl.eval_problems` problems), checkpoints as `megads train`'s
   (resume is exact: the sampling is keyed by the step).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from megads.config import Config, ConfigError
from megads.data import ByteTokenizer
from megads.rl.encoding import decode_completions, encode_prompts
from megads.rl.evaluation import evaluate_task
from megads.rl.generation import Rollout, generate
from megads.rl.grpo_loss import Normalizer, aggregate, group_advantages, grpo_token_terms, zero_variance_groups
from megads.rl.rewards import RewardRegistry, RewardSpec, default_registry, score
from megads.rl.sampling import SamplingParams, sampling_key
from megads.rl.tasks import get_task
from megads.train.checkpoint import load_model_weights, resolve_checkpoint, save_checkpoint, verify_checkpoint
from megads.train.lr_schedule import learning_rate
from megads.train.model_stages import ModelStages, Stage
from megads.train.step_loop import run_steps
from megads.train.trainer import (TrainResult, build_training_model, check_same_model, prepare_output, restore,
                                  run_job)
from parallel.comm_meter import count_collectives
from parallel.context import ParallelContext
from parallel.tensor import vocab_parallel_cross_entropy, vocab_parallel_entropy

# What the last stage records per micro-batch: shares of global means (summed over micro-batches and ranks).
UPDATE_METRICS = ("loss", "ppo_kl", "clip_fraction", "kl_ref", "entropy", "logprob_gap")


def check_rl_names(cfg: Config, registry: Optional[RewardRegistry] = None) -> None:
    """The task and reward names and the starting checkpoint (present, same model shape), checked
    before any process group starts (one sentence each)."""
    try:
        get_task(cfg.rl.task, **cfg.rl.task_options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"rl.task / rl.task_options: {err}") from None
    try:
        RewardSpec(cfg.rl.rewards).validate(registry or default_registry())
    except ValueError as err:
        raise ConfigError(f"rl.rewards: {err}") from None
    if cfg.rl.init_from is not None:
        check_same_model(cfg, resolve_checkpoint(cfg.rl.init_from), "set the model section to the checkpoint's")


class PolicyLoss:
    """The last stage's GRPO loss of one micro-batch (ModelStages.run's `loss`), holding what the
    policy iterations of one rollout share: each micro-batch's old log-probabilities."""

    def __init__(self, cfg: Config, norm: Normalizer, scale: float):
        self.rl = cfg.rl
        self.norm = norm
        self.scale = scale              # micro-batches x DP size: undoes the executor's and ZeRO's averaging
        self.old_logp: dict[int, torch.Tensor] = {}

    def __call__(self, stage: Stage, h: torch.Tensor, batch) -> torch.Tensor:
        _, target = batch
        model, rl = stage.model, self.rl
        logp, z = completion_logprobs(model, h, target["completion"], rl.temperature)
        mb = int(target["microbatch"])
        if mb not in self.old_logp:
            self.old_logp[mb] = logp.detach()                          # the first iteration: ratio exactly 1
        terms = grpo_token_terms(logp, self.old_logp[mb], target["advantages"], rl.epsilon_low, rl.epsilon_high,
                                 target.get("ref_logp"), rl.beta)
        mask = target["mask"]
        loss = aggregate(terms.loss, mask, rl.loss_aggregation, self.norm)
        with torch.no_grad():
            token_mean = lambda values: aggregate(values, mask, "token-mean", self.norm)  # noqa: E731
            stage.record("loss", loss)
            stage.record("ppo_kl", token_mean(terms.ppo_kl))
            stage.record("clip_fraction", token_mean(terms.clipped.float()))
            if terms.kl_ref is not None:
                stage.record("kl_ref", token_mean(terms.kl_ref))
            stage.record("entropy", token_mean(vocab_parallel_entropy(z, model.ctx.tp)))
            stage.record("logprob_gap", token_mean((target["rollout_logp"] - logp).abs()))
        balance = model.balance_loss()
        model.release_balance_losses()
        total = loss * self.scale
        return total if balance is None else total + balance


def completion_logprobs(model, h: torch.Tensor, completion: torch.Tensor, temperature: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities [B, T] of the completion tokens, the temperature-scaled logits of this rank's
    vocabulary shard [B, T, V/t]) from the last block's output h of a sequence that ends with them
    (the rollout's distribution: temperature 0, greedy, scores at temperature 1)."""
    prompt_length = h.shape[1] + 1 - completion.shape[1]
    logits = model.vocab_logits(h[:, prompt_length - 1:])
    z = logits.float() / (temperature if temperature > 0 else 1.0)
    return -vocab_parallel_cross_entropy(z, completion, tp=model.ctx.tp), z


def _log_probs_head(stage: Stage, h: torch.Tensor, batch) -> torch.Tensor:
    """Forward-only head: log-probabilities of the sampled completion tokens (reference policy)."""
    completion, temperature = batch
    return completion_logprobs(stage.model, h, completion, temperature)[0]


class GRPOTrainer:
    """The state of one GRPO run on this rank (see the module doc)."""

    def __init__(self, cfg: Config, ctx: ParallelContext, log, registry: Optional[RewardRegistry] = None):
        self.cfg, self.ctx, self.log = cfg, ctx, log
        rl, t = cfg.rl, cfg.train
        self.task = get_task(rl.task, **rl.task_options)
        self.spec = RewardSpec(rl.rewards)
        self.registry = registry or default_registry()
        self.tokenizer = ByteTokenizer()
        self.params = SamplingParams(rl.temperature, rl.top_p, rl.top_k)
        self.policy, self.optimizer = build_training_model(cfg, ctx, log)
        self.heldout = self.task.problems("heldout", rl.eval_problems, seed=t.seed)
        self.reference: Optional[ModelStages] = None
        self.last_rollout: Optional[Rollout] = None
        self.eval_before: dict[str, float] = {}         # the held-out evaluation before the first step
        self.rows = rl.prompts_per_step * rl.group_size
        self.share = self.rows // ctx.dp.size
        self.first_row = ctx.dp.rank * self.share

    # ------------------------------------------------------------------ set-up

    def load(self, checkpoints_dir: Path) -> int:
        """Resume from the run's latest checkpoint, or start from rl.init_from; returns the step."""
        if self.cfg.rl.beta > 0:
            self.reference = ModelStages(self.cfg, self.ctx)
            source = resolve_checkpoint(self.cfg.rl.init_from)
            verify_checkpoint(source, self.ctx)
            load_model_weights(source, self.reference)
            self.reference.eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        state = restore(self.cfg, self.ctx, self.policy, self.optimizer, checkpoints_dir, self.log, self.cfg.rl.init_from)
        if state is None:
            return 0
        self.eval_before = {k: float(v) for k, v in state.get("eval_before", {}).items()}
        return int(state["step"])

    # ------------------------------------------------------------------ one step

    def problems(self, step: int) -> list:
        return self.task.problems("train", self.cfg.rl.prompts_per_step,
                                  seed=sampling_key(self.cfg.train.seed, step))

    def rollout(self, step: int, problems: list, round: int = 0) -> tuple[Rollout, list]:
        rl, t = self.cfg.rl, self.cfg.train
        rows = range(self.first_row, self.first_row + self.share)
        mine = [problems[j // rl.group_size] for j in rows]
        prompts = encode_prompts([p.prompt for p in mine], self.tokenizer, rl.max_prompt_length)
        keys = [(t.seed, step, round, j // rl.group_size, j % rl.group_size) for j in rows]
        rollout = generate(self.policy, prompts, keys, self.params, rl.max_new_tokens, self.tokenizer.eos_id,
                           t.micro_batch_size, record_routing=rl.routing_replay and self.cfg.model.num_moe_layers > 0,
                           valid_vocab_size=self.tokenizer.vocab_size)
        return rollout, mine

    def rewards(self, rollout: Rollout, mine: list) -> tuple[torch.Tensor, ...]:
        """All rows' (rewards, accuracy, truncation, completion lengths), each [rows], the same on every
        rank (one all-gather)."""
        texts = decode_completions(rollout.tokens[:, rollout.prompt_length:].cpu(), rollout.lengths.cpu(),
                                   self.tokenizer, self.tokenizer.eos_id)
        total, per_function = score(texts, mine, self.spec, self.registry)
        accuracy = per_function.get("accuracy") or score(texts, mine, [("accuracy", 1.0)])[0]
        local = torch.tensor([total, accuracy, rollout.truncated.cpu().float().tolist(), rollout.lengths.cpu().tolist()],
                             dtype=torch.float64)
        everything = torch.cat(self.ctx.dp.all_gather_object(local), dim=1)
        return everything[0], everything[1], everything[2] > 0, everything[3]

    def sample_groups(self, step: int):
        """The step's rollout and rewards; with rl.dynamic_sampling (DAPO), groups whose rewards are
        all equal are replaced by groups of new prompts, up to rl.max_resample_rounds more rollouts.
        Each round generates every row again (the shapes of every rank's micro-batches stay fixed)
        and keeps only the rows of the groups it replaces. Returns (rollout, problems of this
        rank's rows, all rows' (rewards, accuracy, truncation, lengths) as `rewards` gives them, rounds
        run)."""
        rl, t = self.cfg.rl, self.cfg.train
        problems = self.problems(step)
        rollout, mine = self.rollout(step, problems)
        stats = self.rewards(rollout, mine)
        rounds = 0
        while rl.dynamic_sampling and rounds < rl.max_resample_rounds:
            zero = zero_variance_groups(stats[0].view(rl.prompts_per_step, rl.group_size))
            if not zero.any():
                break
            rounds += 1
            fresh = self.task.problems("train", rl.prompts_per_step, seed=sampling_key(t.seed, step, rounds))
            problems = [fresh[p] if zero[p] else problems[p] for p in range(rl.prompts_per_step)]
            extra, extra_mine = self.rollout(step, problems, rounds)
            extra_stats = self.rewards(extra, extra_mine)
            replace = zero.repeat_interleave(rl.group_size)
            local = replace[self.first_row:self.first_row + self.share]
            rollout = self._take_rows(rollout, extra, local)
            mine = [b if r else a for a, b, r in zip(mine, extra_mine, local.tolist())]
            stats = tuple(torch.where(replace, new, old) for old, new in zip(stats, extra_stats))
        return rollout, mine, stats, rounds

    def _take_rows(self, kept: Rollout, extra: Rollout, rows: torch.Tensor) -> Rollout:
        """`kept` with the rows marked in `rows` (this rank's rows, bool) taken from `extra`."""
        device = kept.tokens.device
        pick = rows.to(device)
        mbs = self.cfg.train.micro_batch_size
        tp_slice = self.ctx.tp.rank if self.ctx.tp.size > 1 else 0   # MoE layers route their TP rank's rows
        for index, state in enumerate(kept.states):
            state.take_rows(extra.states[index], rows[index * mbs:(index + 1) * mbs], tp_slice)
        return Rollout(torch.where(pick[:, None], extra.tokens, kept.tokens),
                       torch.where(pick[:, None], extra.completion_mask, kept.completion_mask),
                       torch.where(pick[:, None], extra.logprobs, kept.logprobs),
                       torch.where(pick, extra.lengths, kept.lengths), torch.where(pick, extra.truncated, kept.truncated),
                       kept.states, max(kept.cache_bytes, extra.cache_bytes))

    def update_batches(self, rollout: Rollout, advantages: torch.Tensor, mask: torch.Tensor,
                       ref_logp: Optional[torch.Tensor]) -> list:
        mbs = self.cfg.train.micro_batch_size
        batches = []
        for index, start in enumerate(range(0, self.share, mbs)):
            rows = slice(start, start + mbs)
            target = {"completion": rollout.tokens[rows, rollout.prompt_length:], "mask": mask[rows],
                      "advantages": advantages[rows], "rollout_logp": rollout.logprobs[rows], "microbatch": index}
            if ref_logp is not None:
                target["ref_logp"] = ref_logp[index]
            batches.append((rollout.tokens[rows, :-1], target))
        return batches

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        mbs = self.cfg.train.micro_batch_size
        starts = range(0, self.share, mbs)
        temperature = self.cfg.rl.temperature
        return self.reference.forward_only(
            [rollout.tokens[s:s + mbs, :-1] for s in starts], _log_probs_head,
            (mbs, rollout.completion_mask.shape[1]),
            [(rollout.tokens[s:s + mbs, rollout.prompt_length:], temperature) for s in starts])

    def step(self, step: int) -> dict:
        rl, t, ctx = self.cfg.rl, self.cfg.train, self.ctx
        started = time.perf_counter()
        rollout, mine, (rewards, accuracy, truncated, lengths), rounds = self.sample_groups(step)
        self.last_rollout = rollout
        if rl.truncated == "penalize":
            rewards = torch.where(truncated, torch.full_like(rewards, rl.truncation_penalty), rewards)
        grouped = rewards.view(rl.prompts_per_step, rl.group_size)
        advantages = group_advantages(grouped, scale_by_std=rl.scale_rewards).view(-1)
        mine_rows = slice(self.first_row, self.first_row + self.share)
        mask = rollout.completion_mask.clone()
        if rl.truncated == "mask":
            mask &= ~rollout.truncated.unsqueeze(1)
        counts = torch.tensor([mask.sum().item()], dtype=torch.float64, device=ctx.device)
        ctx.dp.all_reduce(counts)
        norm = Normalizer(tokens=counts.item(), sequences=float(self.rows), max_length=rl.max_new_tokens)
        ref_logp = self.reference_logprobs(rollout) if self.reference is not None else None
        rollout_s = time.perf_counter() - started

        batches = self.update_batches(rollout, advantages[mine_rows].to(ctx.device), mask.float(), ref_logp)
        loss = PolicyLoss(self.cfg, norm, scale=float(self.policy.num_microbatches * ctx.dp.size))
        totals: dict[str, float] = {}
        results = []  # each policy iteration's optimizer StepResult
        for iteration in range(rl.policy_iterations):
            lr = learning_rate(step, t)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            states = [state.replay() for state in rollout.states] if rollout.states[0].tapes else None
            sums = self.policy.run(batches, loss, states, metric_keys=list(UPDATE_METRICS))
            self.policy.finish_gradients()
            values = torch.tensor([sums.get(k, 0.0) for k in UPDATE_METRICS], dtype=torch.float64, device=ctx.device)
            values = ctx.dp.all_reduce(values).tolist()           # shares of global means: summed
            for key, value in zip(UPDATE_METRICS, values):
                if key == "logprob_gap" and iteration > 0:
                    continue                                       # the rollout is compared with the first pass
                totals[key] = totals.get(key, 0.0) + value / (1 if key == "logprob_gap" else rl.policy_iterations)
            result = self.optimizer.step(max_grad_norm=t.grad_clip if t.grad_clip > 0 else None)
            results.append(result)
            if not result.skipped:
                self.policy.update_router_biases(self.cfg.model.bias_update_speed, reduce_loads=ctx.stage.sum)
            else:
                for moe in self.policy.moe_layers():
                    moe.tokens_per_expert.zero_()
        elapsed = time.perf_counter() - started
        record = {"step": step + 1, **{k: totals[k] for k in UPDATE_METRICS if k != "kl_ref"},
                  "kl_ref": totals["kl_ref"] if rl.beta > 0 else 0.0,
                  "reward_mean": rewards.mean().item(), "accuracy": accuracy.mean().item(),
                  "completion_length_mean": lengths.mean().item(),
                  "truncated_fraction": truncated.float().mean().item(),
                  "zero_variance_groups": int(zero_variance_groups(grouped).sum().item()), "resample_rounds": rounds,
                  "grad_norm": results[-1].grad_norm, "lr": lr, "rollout_s": rollout_s, "update_s": elapsed - rollout_s,
                  "step_time_s": elapsed, "kv_cache_bytes": rollout.cache_bytes,
                  # any iteration skipped (by the optimizer, alike on every rank), and the first one's why
                  "skipped": any(r.skipped for r in results),
                  "skip_reason": next((r.reason for r in results if r.skipped), None)}
        return record

    def evaluate(self) -> dict:
        rl, t = self.cfg.rl, self.cfg.train
        return evaluate_task(self.policy, self.heldout, rl, t.micro_batch_size, t.seed, samples=rl.group_size)


def grpo(cfg: Config, log=print, registry: Optional[RewardRegistry] = None) -> TrainResult:
    """Run (or resume) GRPO; under torchrun every rank calls this with the same config.
    `registry`: the reward functions rl.rewards names (default: megads.rl.rewards' built-ins)."""
    check_rl_names(cfg, registry)
    return run_job(cfg, "grpo", log, lambda ctx, rank_log: _grpo(cfg, ctx, rank_log, registry))


def _grpo(cfg: Config, ctx: ParallelContext, log, registry: Optional[RewardRegistry]) -> TrainResult:
    rl, t = cfg.rl, cfg.train
    out = prepare_output(cfg, ctx)
    torch.manual_seed(t.seed)
    trainer = GRPOTrainer(cfg, ctx, log, registry)
    checkpoints_dir = out / "checkpoints"
    start_step = trainer.load(checkpoints_dir)
    log(f"GRPO on {rl.task}: {rl.prompts_per_step} prompts x {rl.group_size} samples per step, "
        f"{trainer.policy.num_parameters() / 1e6:.2f}M parameters on this rank, {ctx.world_size} ranks "
        f"(PP {ctx.pp.size}, TP {ctx.tp.size}, DP {ctx.dp.size}, EP {ctx.ep.size})")
    if start_step >= t.max_steps:
        log(f"nothing to do: the latest checkpoint is at step {start_step} >= train.max_steps ({t.max_steps})")
        return TrainResult(out, start_step, None)
    if start_step == 0:
        trainer.eval_before = before = trainer.evaluate()
        log(f"held-out before GRPO: greedy accuracy {before['eval_accuracy']:.3f}, "
            f"pass@{rl.group_size} {before['eval_pass_at_g']:.3f} ({rl.eval_problems} problems)")
    def take_step(step: int) -> dict:
        with count_collectives(ctx) as comm:      # rollout_s and update_s split the step's time
            record = trainer.step(step)
        record["comm"] = comm.as_dict()
        if (rl.eval_every and (step + 1) % rl.eval_every == 0) or step + 1 == t.max_steps:
            record.update(trainer.evaluate())
        return record

    def report(record: dict) -> None:
        step = record["step"]
        if step % t.log_every == 0 or step == t.max_steps or "eval_accuracy" in record:
            evaluation = (f" | held-out {record['eval_accuracy']:.3f} pass@{rl.group_size} "
                          f"{record['eval_pass_at_g']:.3f}") if "eval_accuracy" in record else ""
            log(f"step {step}/{t.max_steps} | reward {record['reward_mean']:.3f} | accuracy "
                f"{record['accuracy']:.3f} | length {record['completion_length_mean']:.1f} | loss "
                f"{record['loss']:.4f} | kl {record['kl_ref']:.4f} | entropy {record['entropy']:.3f} | "
                f"rollout {record['rollout_s']:.1f}s update {record['update_s']:.1f}s{evaluation}")

    def save(at_step: int) -> Path:
        return save_checkpoint(checkpoints_dir, at_step, cfg, trainer.policy, trainer.optimizer,
                               {"torch_rng": torch.get_rng_state(), "eval_before": trainer.eval_before},
                               keep=t.keep_checkpoints, ctx=ctx)

    step, record = run_steps(cfg, ctx, start_step, take_step, save, report, log)
    if trainer.eval_before and "eval_accuracy" in record:
        before, after = trainer.eval_before, record
        log(f"held-out greedy accuracy: {before['eval_accuracy']:.3f} before GRPO, {after['eval_accuracy']:.3f} after "
            f"({100 * (after['eval_accuracy'] - before['eval_accuracy']):+.1f} points); pass@{rl.group_size} "
            f"{before['eval_pass_at_g']:.3f} -> {after['eval_pass_at_g']:.3f}")
    log(f"done: {step} GRPO steps; checkpoints in {checkpoints_dir}")
    return TrainResult(out, step, record["loss"])
