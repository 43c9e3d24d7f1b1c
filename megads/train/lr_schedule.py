"""Learning-rate schedule: linear warm-up, then cosine decay to min_lr."""

import math

from megads.config import TrainConfig


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.decay_steps or cfg.max_steps
    if step >= decay_steps:
        return cfg.min_lr
    span = max(decay_steps - cfg.warmup_steps, 1)
    progress = (step - cfg.warmup_steps) / span
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
