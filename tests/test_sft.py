"""Cold-start SFT (megads/rl/sft.py, encoding.py) and the `megads sft` command."""

import json

import torch

from megads.cli import main
from megads.data import ByteTokenizer
from megads.model.loss import IGNORE_INDEX
from megads.rl.encoding import decode_completions, encode_demonstrations, encode_prompts

TOKENIZER = ByteTokenizer()


def test_demonstrations_mask_the_prompt_and_count_the_completion():
    ids, labels = encode_demonstrations(["Q: 1+2\n"], ["<answer>3</answer>"], TOKENIZER, 10, 24)
    prompt, completion = TOKENIZER.encode("Q: 1+2\n"), TOKENIZER.encode("<answer>3</answer>")
    assert ids.shape == labels.shape == (1, 10 + 24 - 1)
    pad = 10 - len(prompt)
    assert ids[0, :pad].tolist() == [TOKENIZER.eos_id] * pad and ids[0, pad:10].tolist() == prompt
    counted = labels[0][labels[0] != IGNORE_INDEX].tolist()
    assert counted == completion + [TOKENIZER.eos_id]                 # the completion and its end-of-text
    assert labels[0, 9 - 1].item() == IGNORE_INDEX and labels[0, 9].item() == completion[0]
    # each counted label is the token after its input position
    positions = (labels[0] != IGNORE_INDEX).nonzero().flatten()
    assert torch.equal(ids[0, positions[1:]], labels[0, positions[:-1]])


def test_prompts_are_left_padded_and_completions_decode():
    prompts = encode_prompts(["ab", "abcd"], TOKENIZER, 6)
    assert prompts[:, -1].tolist() == [TOKENIZER.encode("b")[0], TOKENIZER.encode("d")[0]]
    tokens = torch.tensor([TOKENIZER.encode("xy") + [TOKENIZER.eos_id, TOKENIZER.eos_id]])
    assert decode_completions(tokens, torch.tensor([3]), TOKENIZER, TOKENIZER.eos_id) == ["xy"]


def test_megads_sft_trains_evaluates_and_checkpoints(tmp_path):
    overrides = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.intermediate_size=64",
                 "model.num_attention_heads=2", "model.q_lora_rank=16", "model.kv_lora_rank=16",
                 "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
                 "model.n_routed_experts=4", "model.moe_intermediate_size=16", "rl.sft_problems=64",
                 "rl.eval_problems=16", "train.max_steps=4", "train.eval_every=4", "train.save_every=4",
                 "train.global_batch_size=8", "train.micro_batch_size=8", "train.log_every=2",
                 f"train.output_dir={tmp_path}"]
    assert main(["sft", "examples/configs/sft_tiny.yaml", "--set", *overrides]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < records[0]["loss"]
    assert 0 <= records[-1]["eval_accuracy"] <= 1 and records[-1]["valid_loss"] > 0
    assert (tmp_path / "checkpoints" / "step_4" / "COMPLETE").is_file()
    assert main(["sft", "examples/configs/sft_tiny.yaml", "--set", *overrides, "rl.group_size=1"]) == 2
