"""Pipeline stages of the model: chained, they compute exactly what the whole model computes."""

import pytest
import torch

from megads.config import ModelConfig
from megads.model.model import build_model, split_layers, stage_specs

CFG = ModelConfig(vocab_size=80, hidden_size=32, num_hidden_layers=5, first_k_dense_replace=1, intermediate_size=48,
                  num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2,
                  topk_group=1, num_nextn_predict_layers=2, aux_loss_alpha=0.01)


def test_split_layers_balanced_and_explicit():
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(61, 16)[0] == range(0, 4) and split_layers(61, 16)[-1] == range(58, 61)
    assert split_layers(5, 3, [1, 1, 3]) == [range(0, 1), range(1, 2), range(2, 5)]
    for bad in ([1, 1, 2], [0, 2, 3], [5]):
        with pytest.raises(ValueError, match="layers_per_stage"):
            split_layers(5, 3, bad)
    with pytest.raises(ValueError, match="cannot fill"):
        split_layers(2, 3)


def test_stages_hold_their_parts():
    first, middle, last = (build_model(CFG, seed=1, stage=s) for s in stage_specs(CFG, 3))
    assert hasattr(first, "embed_tokens") and not hasattr(first, "lm_head") and len(first.mtp) == 0
    assert not hasattr(middle, "embed_tokens") and not hasattr(middle, "norm") and len(middle.mtp) == 0
    assert hasattr(last, "lm_head") and len(last.mtp) == 2 and hasattr(last, "embed_tokens")  # MTP's copy
    names = [set(m.state_dict()) for m in (first, middle, last)]
    full = set(build_model(CFG, seed=1).state_dict())
    assert names[0] | names[1] | names[2] == full
    assert names[0] & names[2] == {"embed_tokens.weight"}  # the only shared tensor
    assert not names[0] & names[1] and not names[1] & names[2]


@pytest.mark.parametrize("num_stages, layers_per_stage", [(2, None), (3, None), (3, [1, 3, 1])])
def test_chained_stages_equal_the_whole_model(num_stages, layers_per_stage):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, CFG.vocab_size, (2, 13), generator=gen)
    ids, labels = tokens[:, :-1], tokens[:, 1:]

    whole = build_model(CFG, seed=5).train()
    want = whole.compute_loss(ids, labels)
    want.loss.backward()

    stages = [build_model(CFG, seed=5, stage=s).train() for s in stage_specs(CFG, num_stages, layers_per_stage)]
    hidden, total = None, 0
    for stage in stages:
        out = stage.forward_stage(hidden, ids, labels)
        if out.hidden is not None:
            hidden = out.hidden
            if out.balance_loss is not None:  # a stage's own MoE balance losses join its backward
                total = total + out.balance_loss
        else:
            got = out.losses
            total = total + got.loss
    total.backward()

    assert total.item() == pytest.approx(want.loss.item(), rel=1e-6)
    assert got.lm_loss.item() == pytest.approx(want.lm_loss.item(), rel=1e-6)
    for depth in range(CFG.num_nextn_predict_layers):
        assert got.mtp_losses[depth].item() == pytest.approx(want.mtp_losses[depth].item(), rel=1e-6)
    grads = {}
    for stage in stages:
        for name, p in stage.named_parameters():
            # the embedding's MTP copy on the last stage adds to the first stage's, as tied weights do
            grads[name] = grads[name] + p.grad if name in grads else p.grad
    for name, p in whole.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
