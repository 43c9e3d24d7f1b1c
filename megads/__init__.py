"""megads: train DeepSeek-V3-style models (MLA, DeepSeekMoE, MTP) and post-train them with GRPO."""

__version__ = "0.1.0"
