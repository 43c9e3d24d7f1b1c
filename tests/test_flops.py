"""The FLOP model of a training step (megads/train/flops.py): hand counts, and the matmuls torch runs."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megads.model.model import DeepSeekV3
from megads.train.flops import flops_per_token, training_flops_per_step
from tiny_model import tiny_config, tiny_model

# Two blocks (one dense, one MoE), 4 heads of nope 16 + rope 8 (q.k dim 24), v 16; seq_length 32.
SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=160,
             num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1,
             topk_group=1)


def test_hand_count_without_q_lora_or_mtp():
    parts = flops_per_token(tiny_model(**SMALL, q_lora_rank=None, num_nextn_predict_layers=0), seq_length=32)
    # Per block: q_proj 64 -> 4*24, kv_a_proj_with_mqa 64 -> 32+8, kv_b_proj 32 -> 4*(16+16), o_proj 4*16 -> 64.
    attention_projections = 2 * (64 * 96 + 64 * 40 + 32 * 128 + 64 * 64) * 2   # 2 blocks
    # Per block: scores 32 keys x 4 heads x 24, values 32 x 4 x 16, half of them under the causal mask.
    attention_core = (2 * 32 * 4 * 24 + 2 * 32 * 4 * 16) / 2 * 2
    dense_ffn = 2 * 3 * 64 * 160                  # block 0: gate, up, down
    routed_experts = 2 * (2 * 3 * 64 * 32)        # block 1: top-2 experts of width 32
    shared_experts = 2 * 3 * 64 * 32
    router = 2 * 64 * 8
    head = 2 * 64 * 100
    expected = dict(attention_projections=67584, attention_core=10240, dense_ffn=61440, routed_experts=24576,
                    shared_experts=12288, router=1024, mtp=0, head=12800, total=189952)
    assert (attention_projections, attention_core, dense_ffn, routed_experts, shared_experts, router, head) == (
        expected["attention_projections"], expected["attention_core"], expected["dense_ffn"],
        expected["routed_experts"], expected["shared_experts"], expected["router"], expected["head"])
    assert parts == expected


def test_hand_count_with_q_lora_and_one_mtp_depth():
    parts = flops_per_token(tiny_model(**{**SMALL, "n_shared_experts": 2}, q_lora_rank=24,
                                       num_nextn_predict_layers=1), seq_length=32)
    # q_a_proj 64 -> 24 and q_b_proj 24 -> 4*24 replace q_proj; the rest of the block as above.
    block_projections = 2 * (64 * 24 + 24 * 96 + 64 * 40 + 32 * 128 + 64 * 64)
    assert block_projections == 29184
    block_core = (2 * 32 * 4 * 24 + 2 * 32 * 4 * 16) / 2
    moe = 2 * (2 * 3 * 64 * 32) + 2 * 3 * 64 * 64 + 2 * 64 * 8   # routed, shared (2 x 32 wide), router
    head = 2 * 64 * 100
    # MTP depth 1: eh_proj 128 -> 64, block 2 (index >= first_k_dense_replace: MoE), its head pass.
    mtp = 2 * 128 * 64 + (block_projections + block_core + moe) + head
    assert mtp == 113664
    expected = dict(attention_projections=2 * block_projections, attention_core=2 * block_core,
                    dense_ffn=2 * 3 * 64 * 160, routed_experts=2 * (2 * 3 * 64 * 32), shared_experts=2 * 3 * 64 * 64,
                    router=2 * 64 * 8, mtp=mtp, head=head)
    expected["total"] = 58368 + 10240 + 61440 + 24576 + 24576 + 1024 + 113664 + 12800
    assert sum(v for k, v in expected.items() if k != "total") == expected["total"] == 306688
    assert parts == expected


def test_training_step_is_three_forwards_of_every_token():
    cfg = tiny_config({"model": {**SMALL, "q_lora_rank": None, "num_nextn_predict_layers": 0},
                       "train": {"global_batch_size": 4, "micro_batch_size": 2, "seq_length": 32}})
    assert training_flops_per_step(cfg) == 3 * 189952 * 4 * 32


@pytest.mark.parametrize("q_lora_rank", [None, 48])
def test_forward_total_equals_the_matmuls_torch_counts(q_lora_rank):
    """FlopCounterMode on a forward of the tiny model, with SDPA decomposed into bmm (math backend;
    the CPU flash kernel is not counted at all). The projections, FFNs, router and heads (aten.mm)
    must equal the model's total without the attention core exactly (no token is dropped, so every
    token reaches exactly top-k experts). The core (aten.bmm) is counted by torch as the full S x S
    square with the values zero-padded to the q.k head dim (megads.model.mla.pad_values pads
    them for fused kernels): the model's causal half of (q.k + v) scaled by 2 x (2 qk) / (qk + v)."""
    cfg = tiny_model(q_lora_rank=q_lora_rank)   # 4 blocks (1 dense), MoE 16 experts top-4, 1 MTP depth
    model = DeepSeekV3(cfg)
    model.init_weights(0)
    model.requires_grad_(False)   # the fused cross-entropy would otherwise form its gradients in the forward
    batch, seq = 2, 64
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator)
    labels = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.compute_loss(ids, labels)
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert set(counts) == {"aten.mm", "aten.bmm"}

    parts = flops_per_token(cfg, seq)
    tokens = batch * seq
    blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    core = parts["attention_core"] * (blocks / cfg.num_hidden_layers) * tokens   # main blocks and the MTP block
    assert counts["aten.mm"] == parts["total"] * tokens - core
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
    assert counts["aten.bmm"] == core * 2 * (2 * qk) / (qk + v)
