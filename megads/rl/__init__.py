"""Post-training with DeepSeek-R1's recipe: cold-start SFT, then GRPO with rule-based rewards, on the
same parallel model that trains (megads.train.model_stages.ModelStages).

Modules (import them directly; this package imports none of them):
  tasks       verifiable tasks generated in code (problems, prompts, SFT demonstrations, train/held-out split)
  rewards     rule-based rewards: completion parsing, named reward functions, weighted scoring
  encoding    task text to fixed-shape token sequences (left-padded prompts, masked demonstrations)
  sampling    the next token from vocabulary shards (Gumbel-max, top-k, top-p), layout-independent
  generation  KV-cached rollouts through the pipeline stages
  evaluation  held-out pass@1 (greedy) and pass@G
  grpo_loss   advantages, the clipped surrogate, k3 KL, aggregation over the global batch
  sft         `megads sft`
  grpo        `megads grpo`
"""
