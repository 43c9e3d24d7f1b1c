"""Per-token FLOPs of DeepSeek-V3 671B (ModelConfig's defaults) by part, and the 6 N sanity check.

    python tools/flops_deepseek_v3.py [--seq-length 4096]

Forward FLOPs per token from megads.train.flops (matmuls only, causal attention halved as in
Megatron-LM); training = 3 x forward. The sanity figure: DeepSeek-V3 activates about 37B parameters
per token, so training costs roughly 6 x 37e9 = 2.2e11 FLOPs per token, plus attention and MTP.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megads.config import ModelConfig  # noqa: E402
from megads.train.flops import FORWARD_AND_BACKWARD, PARTS, active_matmul_parameters, flops_per_token  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=4096)
    args = parser.parse_args()
    model = ModelConfig()
    parts = flops_per_token(model, args.seq_length)
    total = parts["total"]
    print(f"DeepSeek-V3 671B, seq_length {args.seq_length}: FLOPs per token")
    print(f"{'part':<24}{'forward':>12}{'training (3x)':>16}{'share':>8}")
    for part in (*PARTS, "total"):
        print(f"{part:<24}{parts[part]:>12.4e}{FORWARD_AND_BACKWARD * parts[part]:>16.4e}"
              f"{parts[part] / total:>8.1%}")
    active = active_matmul_parameters(model)
    embedding = model.vocab_size * model.hidden_size
    print(f"\nactive matmul weights per token (main model, head included): {active / 1e9:.2f}B; "
          f"with the embedding: {(active + embedding) / 1e9:.2f}B (DeepSeek-V3 report: 37B)")
    print(f"6 x 37e9 = {6 * 37e9:.3e}; 6 x active matmul weights = {6 * active:.3e} training FLOPs per token")
    training = FORWARD_AND_BACKWARD * total
    attention = FORWARD_AND_BACKWARD * parts["attention_core"]
    mtp = FORWARD_AND_BACKWARD * parts["mtp"]
    print(f"model total {training:.3e} = 6 N {6 * active:.3e} + attention core {attention:.3e} + MTP {mtp:.3e}")


if __name__ == "__main__":
    main()
