"""FLOPs of one training step of the DeepSeek-V3 architecture, from the config alone (no torch).

Counts the matrix multiplications megads.model does, 2 FLOPs per multiply-accumulate, per token of
the forward pass, by part:

    attention_projections  MLA: q_a_proj + q_b_proj (or q_proj without q_lora_rank),
                           kv_a_proj_with_mqa, kv_b_proj, o_proj
    attention_core         scores q.k over [nope; rope] and the value sum p.v, causal: half of the
                           sequence on average
    dense_ffn              SwiGLU (gate, up, down) of the first `first_k_dense_replace` blocks
    routed_experts         top-k SwiGLU experts of moe_intermediate_size, per MoE block
    shared_experts         the shared SwiGLU (n_shared_experts x moe_intermediate_size wide)
    router                 the gate matmul hidden -> n_routed_experts logits
    mtp                    per MTP depth: eh_proj on [emb; hidden] (2h -> h), one transformer block
                           (MLA + the FFN its layer index gives: MoE for DeepSeek-V3) and its own
                           pass through the shared output head
    head                   the main model's output head, hidden -> vocab

A training step is forward + backward = 3 x forward: the backward pass does two matmuls of the
forward's size for each one (gradient of the input and of the weight). This is Megatron-LM's
convention (`num_floating_point_operations` in megatron/training/training.py), also applied to the
attention core, whose backward is two matmuls per forward matmul too.

Where this model differs from Megatron-LM's count, and why:
- Causal attention is counted as half of the full S x S product, as Megatron does (its `/ 2`
  "causal mask" terms). The exact fraction is (S + 1) / (2 S) of the square; at S = 4096 the
  difference is 0.01% of the core. Fused kernels skip the masked blocks, so half is what the device
  does; torch's FlopCounterMode counts SDPA as the full square, see tests/test_flops.py.
- Only matmuls are counted. Megatron adds the RMSNorms inside MLA (its `+ 1` per latent) and the
  MTP norms (`3 h`): elementwise work, not tensor-core FLOPs, and under 0.01% of the total here.
  Softmax, RoPE, SwiGLU's activation and the gating multiply are left out likewise.
- The router's gate matmul (2 h E per MoE layer) is counted; Megatron's transformer count leaves
  it out. It is small (0.2% of DeepSeek-V3's forward) but it is a real matmul megads runs.
- The head uses `vocab_size` as configured; Megatron uses its padded vocabulary.
- MTP blocks are counted with the FFN `ModelConfig.is_moe_layer` gives their layer index (they
  continue the numbering after the main blocks), as megads builds them; Megatron builds its MTP
  block from the decoder's last-layer spec, which is the same (MoE) for DeepSeek-V3.
- The embedding lookup costs no FLOPs (neither counts it). megads's fused linear cross-entropy
  computes the head's gradients inside its forward call; that is the same work, moved, and is still
  counted as the backward's 2 x forward.
"""
from __future__ import annotations

from megads.config import Config, ModelConfig

FORWARD_AND_BACKWARD = 3   # backward = 2 x forward for every matmul (Megatron's convention)
CAUSAL_FRACTION = 0.5      # Megatron's causal-mask discount of the S x S attention products


def matmul_flops(inputs: int, outputs: int) -> int:
    """One token through a dense inputs -> outputs projection: a multiply and an add per weight."""
    return 2 * inputs * outputs


def attention_projection_flops(m: ModelConfig) -> int:
    """Per token, one MLA block's projections (forward)."""
    h, heads = m.hidden_size, m.num_attention_heads
    if m.q_lora_rank is None:
        query = matmul_flops(h, heads * m.qk_head_dim)                              # q_proj
    else:
        query = matmul_flops(h, m.q_lora_rank) + matmul_flops(m.q_lora_rank, heads * m.qk_head_dim)  # q_a, q_b
    latent = matmul_flops(h, m.kv_lora_rank + m.qk_rope_head_dim)                   # kv_a_proj_with_mqa
    keys_values = matmul_flops(m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim))  # kv_b_proj
    output = matmul_flops(heads * m.v_head_dim, h)                                  # o_proj
    return query + latent + keys_values + output


def attention_core_flops(m: ModelConfig, seq_length: int) -> float:
    """Per token, one block's q.k scores and p.v sum (forward), with Megatron's causal half."""
    heads = m.num_attention_heads
    scores = 2 * seq_length * heads * m.qk_head_dim     # against every key of the sequence
    values = 2 * seq_length * heads * m.v_head_dim
    return CAUSAL_FRACTION * (scores + values)


def swiglu_flops(hidden: int, intermediate: int) -> int:
    """gate and up (hidden -> intermediate each) and down (intermediate -> hidden)."""
    return 3 * matmul_flops(hidden, intermediate)


def ffn_flops(m: ModelConfig, layer_index: int) -> dict[str, int]:
    """Per token, the FFN of block `layer_index` (forward): dense, or routed + shared + router."""
    if not m.is_moe_layer(layer_index):
        return {"dense_ffn": swiglu_flops(m.hidden_size, m.intermediate_size)}
    return {
        "routed_experts": m.num_experts_per_tok * swiglu_flops(m.hidden_size, m.moe_intermediate_size),
        "shared_experts": swiglu_flops(m.hidden_size, m.n_shared_experts * m.moe_intermediate_size),
        "router": matmul_flops(m.hidden_size, m.n_routed_experts),
    }


def block_flops(m: ModelConfig, layer_index: int, seq_length: int) -> dict[str, float]:
    """Per token, one transformer block (forward), by part."""
    return {"attention_projections": attention_projection_flops(m),
            "attention_core": attention_core_flops(m, seq_length),
            **ffn_flops(m, layer_index)}


def head_flops(m: ModelConfig) -> int:
    return matmul_flops(m.hidden_size, m.vocab_size)


def mtp_depth_flops(m: ModelConfig, depth: int, seq_length: int) -> float:
    """Per token, MTP module `depth` (1-based, forward): eh_proj, its block, its pass through the head."""
    block = block_flops(m, m.num_hidden_layers + depth - 1, seq_length)
    return matmul_flops(2 * m.hidden_size, m.hidden_size) + sum(block.values()) + head_flops(m)


PARTS = ("attention_projections", "attention_core", "dense_ffn", "routed_experts", "shared_experts", "router",
         "mtp", "head")


def flops_per_token(m: ModelConfig, seq_length: int) -> dict[str, float]:
    """Forward FLOPs per token by part (PARTS, the main model's blocks; MTP as one part) and their
    `total`. A training step costs FORWARD_AND_BACKWARD times this per token."""
    parts = dict.fromkeys(PARTS, 0.0)
    for layer in range(m.num_hidden_layers):
        for part, flops in block_flops(m, layer, seq_length).items():
            parts[part] += flops
    parts["mtp"] = sum(mtp_depth_flops(m, depth, seq_length) for depth in range(1, m.num_nextn_predict_layers + 1))
    parts["head"] = head_flops(m)
    parts["total"] = sum(parts[part] for part in PARTS)
    return parts


def training_flops_per_token(m: ModelConfig, seq_length: int) -> float:
    return FORWARD_AND_BACKWARD * flops_per_token(m, seq_length)["total"]


def training_flops_per_step(cfg: Config) -> float:
    """Forward + backward FLOPs of one optimizer step: every token of the global batch."""
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    return training_flops_per_token(cfg.model, cfg.train.seq_length) * tokens


def active_matmul_parameters(m: ModelConfig) -> float:
    """Weights one token of the main model multiplies by (MTP and embedding excluded): the
    sequence-independent forward FLOPs / 2. The `6 N` rule of thumb is 3 x 2 x this."""
    parts = flops_per_token(m, seq_length=0)
    return (parts["total"] - parts["mtp"]) / 2
