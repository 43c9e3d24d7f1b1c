"""GRPO on the parallel model (megads/rl/grpo.py).

- The first step of a rollout: probability ratio exactly 1, ppo_kl exactly 0, no clipping; the
  rollout's log-probabilities equal the policy's to fp32 rounding.
- Layouts: a rollout and update under TP 2, DP 2 x EP 2, PP 2 (1F1B and DualPipeV) and DP 2 give the
  single-process samples (token for token), rewards and loss / gradient norm (<= 1e-5), two steps.
- Resume: 1 step, stop, resume 1 step = 2 steps straight (same samples and metrics).
- Bad input: one sentence naming the field, before any process group starts.

The model is tiny and untrained; the reward is a smooth function of the text (a test reward
registered for the run) so that every group has reward variance and the loss is not zero.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from megads.config import ConfigError, config_from_dict
from megads.rl.grpo import GRPOTrainer, check_rl_names, grpo
from megads.rl.rewards import RewardRegistry, default_registry
from megads.train.checkpoint import save_checkpoint
from megads.train.model_stages import ModelStages
from megads.train.optimizer import build_optimizer
from megads.train.trainer import parallel_context
from parallel.context import ParallelContext
from tiny_model import TINY_MODEL
from tools.harness.distributed import run_distributed

MODEL = {**TINY_MODEL, "vocab_size": 264, "hidden_size": 32, "num_hidden_layers": 4, "first_k_dense_replace": 1,
         "intermediate_size": 64, "num_attention_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16,
         "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4,
         "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_group": 1, "topk_group": 1,
         "num_nextn_predict_layers": 0, "max_position_embeddings": 64, "initializer_range": 0.1}
RL = {"prompts_per_step": 4, "group_size": 4, "max_prompt_length": 12, "max_new_tokens": 8, "eval_problems": 8,
      "eval_every": 0, "rewards": {"ascii": 1.0, "format": 1.0}, "epsilon_high": 0.28}
TRAIN = {"global_batch_size": 16, "micro_batch_size": 4, "seq_length": 19, "lr": 1e-3, "min_lr": 1e-3,
         "warmup_steps": 0, "max_steps": 2, "seed": 3, "grad_clip": 1.0, "log_every": 1}


def ascii_reward(completion: str, problem) -> float:
    """A test reward with variance even for an untrained model (which emits random bytes): the share
    of ASCII characters in the text."""
    return sum(ord(ch) < 128 for ch in completion) / max(len(completion), 1)


def registry() -> RewardRegistry:
    reg = default_registry()
    reg.register_reward("ascii", ascii_reward)
    return reg


def make_config(init_from, output_dir=None, rl=None, train=None, parallel=None):
    return config_from_dict({"model": MODEL, "rl": {**RL, "init_from": str(init_from), **(rl or {})},
                             "train": {**TRAIN, "output_dir": str(output_dir or init_from), **(train or {})},
                             "parallel": parallel or {}})


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    """A seeded model saved as a checkpoint (what GRPO starts from)."""
    root = tmp_path_factory.mktemp("init")
    cfg = make_config(root)
    model = ModelStages(cfg, ParallelContext.single())
    save_checkpoint(root / "checkpoints", 0, cfg, model, build_optimizer(model, cfg.train), {})
    return root


def run_steps(cfg, steps):
    """Every rank: `steps` GRPO steps; the records and all rows' samples per step."""
    ctx = parallel_context(cfg, "grpo")
    trainer = GRPOTrainer(cfg, ctx, lambda *_: None, registry())
    trainer.load(Path(cfg.train.output_dir) / "checkpoints")
    out = []
    for step in range(steps):
        record = trainer.step(step)
        out.append((record, torch.cat(ctx.dp.all_gather_object(trainer.last_rollout.tokens.cpu()))))
    return out


def test_first_step_is_on_policy(init_checkpoint, tmp_path):
    cfg = make_config(init_checkpoint, tmp_path)
    (record, _), = run_steps(cfg, 1)
    assert record["ppo_kl"] == 0.0 and record["clip_fraction"] == 0.0
    assert record["logprob_gap"] < 1e-5                     # rollout vs policy log-probabilities
    assert record["loss"] != 0.0 and record["zero_variance_groups"] == 0
    assert 0 < record["reward_mean"] < 2 and record["entropy"] > 0


def test_policy_iterations_move_the_ratio(init_checkpoint, tmp_path):
    cfg = make_config(init_checkpoint, tmp_path, rl={"policy_iterations": 3})
    (record, _), = run_steps(cfg, 1)
    assert record["ppo_kl"] != 0.0                          # iterations 2 and 3 are off-policy


def test_a_skipped_update_is_reported(init_checkpoint, tmp_path):
    """An lr that overflows AdamW's update: every policy iteration's step is skipped by the optimizer
    (the gradients are finite), and the record says so."""
    cfg = make_config(init_checkpoint, tmp_path, rl={"policy_iterations": 2}, train={"lr": 1e38, "min_lr": 1e38})
    (record, _), = run_steps(cfg, 1)
    assert record["skipped"] and record["skip_reason"] == "non-finite update"
    assert math.isfinite(record["grad_norm"])


def _layout_worker(init_from, output_dir, parallel, micro_batch_size, rl=None):
    cfg = make_config(init_from, output_dir, parallel=parallel, train={"micro_batch_size": micro_batch_size}, rl=rl)
    return run_steps(cfg, 2)


LAYOUTS = {
    "tp2": ({"tensor_parallel": 2}, 4),
    "dp2-ep2": ({"expert_parallel": 2}, 4),
    "dp2": ({}, 2),
    "pp2-1f1b": ({"pipeline_parallel": 2, "schedule": "1f1b"}, 4),
    "pp2-dualpipev": ({"pipeline_parallel": 2, "schedule": "dualpipev"}, 4),
}


@pytest.fixture(scope="module")
def single_process(init_checkpoint, tmp_path_factory):
    return run_steps(make_config(init_checkpoint, tmp_path_factory.mktemp("single")), 2)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_give_the_single_process_samples_and_loss(layout, init_checkpoint, single_process, tmp_path):
    parallel, mbs = LAYOUTS[layout]
    results = run_distributed(_layout_worker, 2, args=(str(init_checkpoint), str(tmp_path), parallel, mbs),
                              timeout_s=300)
    for rank_results in results:
        for step, ((record, samples), (want, want_samples)) in enumerate(zip(rank_results, single_process)):
            assert torch.equal(samples, want_samples), (layout, step)
            for key in ("reward_mean", "zero_variance_groups", "completion_length_mean"):
                assert record[key] == want[key], (layout, step, key)
            for key in ("loss", "grad_norm", "entropy"):
                assert record[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (layout, step, key)


DYNAMIC = {"rewards": {"format": 1.0}, "dynamic_sampling": True, "max_resample_rounds": 2}


def test_dynamic_sampling_replaces_zero_variance_groups(init_checkpoint, tmp_path):
    """An untrained model's completions are never well formed: every group has zero variance under the
    format reward, and dynamic sampling runs all its extra rounds (each a full rollout). Under TP 2 the
    rows it keeps, and their recorded routing, give the single-process step."""
    single = run_steps(make_config(init_checkpoint, tmp_path / "one", rl=DYNAMIC), 2)
    assert [record["resample_rounds"] for record, _ in single] == [2, 2]
    assert all(record["zero_variance_groups"] == RL["prompts_per_step"] for record, _ in single)
    results = run_distributed(_layout_worker, 2, args=(str(init_checkpoint), str(tmp_path / "tp"),
                                                        {"tensor_parallel": 2}, 4, DYNAMIC), timeout_s=300)
    for (record, samples), (want, want_samples) in zip(results[0], single):
        assert torch.equal(samples, want_samples)
        assert record["loss"] == pytest.approx(want["loss"], abs=1e-7)


def test_grpo_resumes_exactly_and_exports(init_checkpoint, tmp_path):
    def read(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    straight = make_config(init_checkpoint, tmp_path / "straight")
    grpo(straight, log=lambda *_: None, registry=registry())
    resumed = make_config(init_checkpoint, tmp_path / "resumed", train={"max_steps": 1})
    grpo(resumed, log=lambda *_: None, registry=registry())
    grpo(make_config(init_checkpoint, tmp_path / "resumed"), log=lambda *_: None, registry=registry())
    # SIGTERM in the middle of step 1's update: the step completes, is saved as step_1, and resumes exactly.
    from megads.train.stopping import Interrupted
    from tools.harness.faults import install

    injector = install("sigterm@optimizer:1")
    try:
        with pytest.raises(Interrupted) as stop:
            grpo(make_config(init_checkpoint, tmp_path / "signalled"), log=lambda *_: None, registry=registry())
    finally:
        injector.remove()
    assert stop.value.step == 1 and stop.value.checkpoint.name == "step_1"
    grpo(make_config(init_checkpoint, tmp_path / "signalled"), log=lambda *_: None, registry=registry())
    a, b, c = read(tmp_path / "straight"), read(tmp_path / "resumed"), read(tmp_path / "signalled")
    assert [r["step"] for r in b] == [1, 2] and [r["step"] for r in c] == [1, 2]
    keys = ("loss", "reward_mean", "grad_norm", "entropy", "logprob_gap", "completion_length_mean")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in c]
    assert a[-1]["eval_accuracy"] == b[-1]["eval_accuracy"]     # (the stopped run also evaluated at its end)
    for field in ("step", "loss", "reward_mean", "accuracy", "ppo_kl", "clip_fraction", "kl_ref", "entropy",
                  "completion_length_mean", "zero_variance_groups", "logprob_gap", "grad_norm"):
        assert field in a[0], field
    assert "eval_accuracy" in a[-1] and "eval_pass_at_g" in a[-1]
    assert all(r["comm"] == {} for r in a)     # one process: no collective (counted per kind under layouts)

    from megads.hf import export_hf
    export_hf(tmp_path / "straight", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize("rl, train, message", [
    ({"group_size": 1}, {}, "rl.group_size"),
    ({"epsilon_low": 1.5}, {}, "rl.epsilon_low"),
    ({"beta": -0.1}, {}, "rl.beta"),
    # seq_length 64 fits model.max_position_embeddings (64); the 65 positions of prompt + completion do not
    ({"max_new_tokens": 53}, {"seq_length": 64}, r"rl\.max_prompt_length \+ rl\.max_new_tokens \(65\)"),
    ({"prompts_per_step": 3}, {}, "train.global_batch_size"),
    ({"loss_aggregation": "sum"}, {}, "rl.loss_aggregation"),
])
def test_bad_settings_are_one_sentence(rl, train, message, init_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=message):
        cfg = make_config(init_checkpoint, tmp_path, rl=rl, train=train)
        grpo(cfg, log=lambda *_: None, registry=registry())


def test_bad_names_and_checkpoints_are_one_sentence(init_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="rl.task"):
        check_rl_names(make_config(init_checkpoint, tmp_path, rl={"task": "countdown"}))
    with pytest.raises(ConfigError, match="rl.rewards.*'ascii'"):
        check_rl_names(make_config(init_checkpoint, tmp_path))        # not registered by default
    with pytest.raises(ConfigError, match="hidden_size"):
        other = make_config(init_checkpoint, tmp_path)
        other.model.hidden_size = 64
        grpo(other, log=lambda *_: None, registry=registry())
    with pytest.raises(ConfigError, match="max_prompt_length"):
        grpo(make_config(init_checkpoint, tmp_path / "short", rl={"max_prompt_length": 4},
                         train={"seq_length": 11}), log=lambda *_: None, registry=registry())
