"""Generation on the training model (megads/rl/generation.py, sampling.py, megads/model/pass_state.py).

- KV-cached decode (MLA's absorbed form on the latent cache) gives the full forward's
  log-probabilities (fp32, <= 1e-5), and greedy generation equals argmax over repeated full forwards;
- the cache holds kv_lora_rank + qk_rope_head_dim numbers per token and layer;
- a row's samples do not depend on the micro-batch it is in, and sampling from TP vocabulary
  shards equals sampling from the whole vocabulary (greedy, temperature, top-k, top-p);
- routing replay: a replayed pass routes every token as the recording pass did, and the router
  still gets gradients.
"""

import pytest
import torch
import torch.distributed as dist

from megads.config import Config, TrainConfig
from megads.model.model import build_model
from megads.model.pass_state import RECORD, PassState
from megads.rl.generation import generate
from megads.rl.sampling import SamplingParams, sample_next_tokens, sampling_key
from megads.train.model_stages import ModelStages
from parallel.context import ParallelContext
from parallel.group import Group
from tiny_model import tiny_model
from tools.harness.distributed import run_distributed

MODEL = tiny_model(vocab_size=96, hidden_size=32, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=64,
                   num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                   v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2,
                   topk_group=1, num_nextn_predict_layers=0, initializer_range=0.2)
PROMPT, NEW = 5, 9


def stages(micro_batch_size=2, rows=4):
    cfg = Config(model=MODEL, train=TrainConfig(global_batch_size=rows, micro_batch_size=micro_batch_size,
                                                seq_length=PROMPT + NEW - 1, seed=3))
    return ModelStages(cfg, ParallelContext.single())


def prompts(rows=4):
    return torch.randint(1, MODEL.vocab_size, (rows, PROMPT), generator=torch.Generator().manual_seed(1))


def keys(rows=4):
    return [(7, 0, row, 0) for row in range(rows)]


def full_forward_logprobs(model, tokens, temperature=1.0):
    """log p(token_t | tokens_<t) of the completion positions, from one full forward."""
    with torch.no_grad():
        logits = model(tokens[:, :-1]).float() / temperature
    logp = logits.log_softmax(-1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logp[:, PROMPT - 1:]


def test_cached_decode_matches_full_forward():
    st = stages()
    rollout = generate(st, prompts(), keys(), SamplingParams(temperature=1.0), NEW, eos_id=0, micro_batch_size=2)
    model = st.models[0].eval()
    want = full_forward_logprobs(model, rollout.tokens)
    mask = rollout.completion_mask
    err = ((rollout.logprobs - want).abs() * mask).max().item()
    assert err <= 1e-5, err
    assert rollout.prompt_length == PROMPT and torch.equal(rollout.tokens[:, :PROMPT], prompts())


def test_greedy_equals_argmax_of_repeated_full_forwards():
    st = stages()
    rollout = generate(st, prompts(), keys(), SamplingParams(temperature=0.0), NEW, eos_id=0, micro_batch_size=2)
    model = st.models[0].eval()
    tokens = prompts()
    with torch.no_grad():
        for _ in range(NEW):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    for row in range(4):       # after an end-of-text the row keeps end-of-text tokens
        length = rollout.lengths[row].item()
        assert torch.equal(rollout.tokens[row, :PROMPT + length], tokens[row, :PROMPT + length]), row


def test_latent_cache_size():
    st = stages()
    rollout = generate(st, prompts(), keys(), SamplingParams(), NEW, eos_id=0, micro_batch_size=2)
    per_token_layer = (MODEL.kv_lora_rank + MODEL.qk_rope_head_dim) * 4        # fp32
    assert rollout.cache_bytes == per_token_layer * MODEL.num_hidden_layers * 4 * (PROMPT + NEW)


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_p=0.8), SamplingParams(1.0, top_k=5)],
                         ids=["t1", "topp", "topk"])
def test_samples_do_not_depend_on_the_batch(params):
    a = generate(stages(2), prompts(), keys(), params, NEW, eos_id=0, micro_batch_size=2)
    b = generate(stages(4), prompts(), keys(), params, NEW, eos_id=0, micro_batch_size=4)
    c = generate(stages(1, rows=1), prompts()[2:3], keys()[2:3], params, NEW, eos_id=0, micro_batch_size=1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens[2:3], c.tokens)


def test_padded_vocabulary_is_never_sampled():
    logits = torch.zeros(64, 10)
    logits[:, 8:] = 50.0                     # ids 8, 9: beyond the tokenizer's vocabulary
    tokens, _ = sample_next_tokens(logits, SamplingParams(1.0), [sampling_key(i) for i in range(64)], 10,
                                   valid_vocab_size=8)
    assert tokens.max().item() < 8


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    sampled = lambda params: sample_next_tokens(logits, params, [sampling_key(i) for i in range(400)], 6)[0]  # noqa
    assert set(sampled(SamplingParams(1.0, top_k=2)).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)            # 0.64, 0.23, 0.09, ...: top-p 0.8 keeps the first two
    assert probs[:1].sum() < 0.8 <= probs[:2].sum()
    assert set(sampled(SamplingParams(1.0, top_p=0.8)).tolist()) == {0, 1}
    assert set(sampled(SamplingParams(0.0)).tolist()) == {0}


def _sample_on_shards(params_list):
    """Every rank: sample from its vocabulary shard of the same logits; the single-rank result too."""
    tp = Group(dist.group.WORLD, "tp")
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(5)) * 3
    logits[3, 7] = logits[3, 29] = 100.0            # a tie across shards: the smaller id wins
    keys = [sampling_key(11, i) for i in range(16)]
    shard = logits.shape[1] // tp.size
    out = []
    for params in params_list:
        mine = sample_next_tokens(logits[:, tp.rank * shard:(tp.rank + 1) * shard], params, keys, 40, tp,
                                  valid_vocab_size=38)
        alone = sample_next_tokens(logits, params, keys, 40, valid_vocab_size=38)
        out.append((mine, alone))
    return out


def test_sampling_from_vocabulary_shards_matches_one_rank():
    params_list = [SamplingParams(0.0), SamplingParams(1.0), SamplingParams(0.8, top_k=6),
                   SamplingParams(1.0, top_p=0.7), SamplingParams(1.3, top_k=10, top_p=0.9)]
    for rank_results in run_distributed(_sample_on_shards, 2, args=(params_list,)):
        for (tokens, logp), (want_tokens, want_logp) in rank_results:
            assert torch.equal(tokens, want_tokens)
            torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-6)


def test_routing_replay_reproduces_the_recorded_experts_with_router_gradients():
    model = build_model(MODEL, seed=2).eval()
    ids = torch.randint(1, MODEL.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    state = PassState(capacity=12, routing=RECORD)
    with torch.no_grad():                             # the rollout: prompt, then one token at a time
        model.forward_stage(ids[:, :5], state)
        state.advance(5)
        for t in range(5, 12):
            model.forward_stage(ids[:, t:t + 1], state)
            state.advance(1)
    recorded = {layer: torch.cat(tape.chunks, dim=1) for layer, tape in state.tapes.items()}
    assert sorted(recorded) == [1, 2] and recorded[1].shape == (2, 12, MODEL.num_experts_per_tok)

    # Perturb the routers' biases: a fresh pass now chooses other experts; the replayed one must not.
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.add_(torch.randn(MODEL.n_routed_experts, generator=torch.Generator()
                                                              .manual_seed(9)) * 10)
    chosen = {}
    for layer in (1, 2):
        model.layers[str(layer)].mlp.gate.register_forward_hook(
            lambda module, args, output, layer=layer: chosen.__setitem__(layer, output[0]))
    model.train()
    out = model.forward_stage(ids, state.replay())
    out.pow(2).sum().backward()
    for layer in (1, 2):
        assert torch.equal(chosen[layer].view(2, 12, -1), recorded[layer]), layer
        assert model.layers[str(layer)].mlp.gate.weight.grad.abs().sum() > 0    # the gates' gradient reaches the router
    model.forward_stage(ids)                                                     # no replay
    assert any(not torch.equal(chosen[layer].view(2, 12, -1), recorded[layer]) for layer in (1, 2))
