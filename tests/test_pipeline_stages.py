"""Pipeline stages of the model as production runs them: chained, they compute exactly what the
whole model computes; at PP = 1 the trainer's ModelStages runs the plain step."""

import pytest
import torch

from megads.config import Config, TrainConfig
from megads.model.model import build_model, split_layers, stage_specs
from megads.train.model_stages import ModelStages, Stage
from parallel.context import ParallelContext
from tiny_model import tiny_model

CFG = tiny_model(vocab_size=80, hidden_size=32, num_hidden_layers=5, first_k_dense_replace=1, intermediate_size=48,
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
    """The stages as the executor runs them (`Stage`: the model's public stage API, with a non-last
    stage's balance loss joining the backward through its output), chained by hand with detached
    hand-overs as pipeline ranks do, give the whole model's loss and gradients."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, CFG.vocab_size, (2, 13), generator=gen)
    ids, labels = tokens[:, :-1], tokens[:, 1:]

    whole = build_model(CFG, seed=5).train()
    want = whole.compute_loss(ids, labels)
    want.loss.backward()

    stages = [Stage(build_model(CFG, seed=5, stage=s).train()) for s in stage_specs(CFG, num_stages, layers_per_stage)]
    recorded = {}
    for stage in stages:
        stage.record = lambda key, value, weight=1.0: recorded.setdefault(key, []).append(value.item() * weight)
    x, handed_over = ids, []
    for stage in stages[:-1]:
        out = stage(x)
        x = out.detach().requires_grad_()
        handed_over.append((out, x))
    loss = stages[-1].loss(stages[-1](x), (ids, labels))
    loss.backward()
    for out, received in reversed(handed_over):
        out.backward(received.grad)

    assert loss.item() + sum(recorded["balance_loss"][:-1]) == pytest.approx(want.loss.item(), rel=1e-6)
    assert recorded["loss"] == [pytest.approx(want.lm_loss.item(), rel=1e-6)]
    for depth in range(CFG.num_nextn_predict_layers):
        assert recorded[f"mtp_loss_depth_{depth + 1}"] == [pytest.approx(want.mtp_losses[depth].item(), rel=1e-6)]
    grads = {}
    for stage in stages:
        for name, p in stage.model.named_parameters():
            # the embedding's MTP copy on the last stage adds to the first stage's, as tied weights do
            grads[name] = grads[name] + p.grad if name in grads else p.grad
    for name, p in whole.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def one_rank_config(num_microbatches):
    return Config(model=CFG, train=TrainConfig(global_batch_size=2 * num_microbatches, micro_batch_size=2,
                                                seq_length=12, seed=5))


@pytest.mark.parametrize("num_microbatches", [1, 3])
def test_model_stages_on_one_rank_run_the_plain_step(num_microbatches):
    """At PP = 1 the trainer's ModelStages (one stage, run by the executor's one-rank 1F1B) computes
    the plain loop's losses and gradients: each micro-batch's loss / their number, backward."""
    gen = torch.Generator().manual_seed(4)
    batches = [(t[:, :-1], t[:, 1:]) for t in
               (torch.randint(0, CFG.vocab_size, (2, 13), generator=gen) for _ in range(num_microbatches))]
    whole = build_model(CFG, seed=5).train()
    lm, mtp = 0.0, 0.0
    for ids, labels in batches:
        out = whole.compute_loss(ids, labels)
        (out.loss / num_microbatches).backward()
        lm += out.lm_loss.item() / num_microbatches
        mtp += out.mtp_losses[0].item() / num_microbatches

    stages = ModelStages(one_rank_config(num_microbatches), ParallelContext.single()).train()
    assert stages.whole_model and list(stages.models) == [0]
    metrics = stages.run(batches)
    stages.finish_gradients()
    assert metrics["loss"] == pytest.approx(lm, rel=1e-12)
    assert metrics["mtp_loss_depth_1"] == pytest.approx(mtp, rel=1e-12)
    got = dict(stages.named_parameters())
    for name, p in whole.named_parameters():
        assert torch.equal(got[f"0.{name}"].grad, p.grad), name   # bit for bit: the same ops in the same order

    whole.eval()
    stages.eval()
    with torch.no_grad():
        want_eval = sum(whole.compute_loss(ids, labels).lm_loss.item() for ids, labels in batches) / len(batches)
    assert stages.evaluate_loss(batches) == pytest.approx(want_eval, rel=1e-12)
