"""GRPO post-training (DeepSeekMath, DeepSeek-R1).

Modules (import them directly; this package imports none of them):
  tasks       verifiable tasks generated in code (problems, prompts, SFT demonstrations, train/held-out split)
  rewards     rule-based rewards: completion parsing, named reward functions, weighted scoring
  grpo_loss   the GRPO objective
"""
