"""Run configuration: dataclasses per section, loaded from YAML, validated before anything runs.

Model field names follow Hugging Face's ``DeepseekV3Config`` wherever one exists, so a
DeepSeek-V3 ``config.json`` maps onto :class:`ModelConfig` field for field, and defaults too: a
model field's default is the default of ``DeepseekV3Config()`` (DeepSeek-V3 itself, 671B), so a
config file states every value of a smaller model (see examples/configs/tiny.yaml). Every field carries
its documentation in ``metadata["help"]`` (printed by ``megads train --help-config``).

Validation happens here, before any process group or tensor exists: an inconsistent value is
one sentence that names the field and the rule, never a stack trace from deep inside a layer.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from parallel.pipeline.schedules import SCHEDULES  # torch-free


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or inconsistent; the message names the field."""


def _f(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    """The DeepSeek-V3 architecture (names and defaults as in Hugging Face's DeepseekV3Config) plus
    training-only knobs (DeepSeek-V3's values). DeepseekV3Config keeps rope_theta inside rope_parameters,
    whose rope_type "default" is rope_scaling null here."""

    vocab_size: int = _f(129280, "Vocabulary size (rows of the embedding and of the output head).")
    hidden_size: int = _f(7168, "Model width d.")
    num_hidden_layers: int = _f(61, "Number of transformer blocks of the main model (MTP blocks not counted).")
    first_k_dense_replace: int = _f(3, "The first k blocks use a dense SwiGLU FFN, the rest DeepSeekMoE.")
    intermediate_size: int = _f(18432, "Hidden width of the dense SwiGLU FFN of the first k blocks.")
    num_attention_heads: int = _f(128, "Number of attention heads n_h.")
    q_lora_rank: Optional[int] = _f(
        1536, "Rank of the low-rank query compression (q_a_proj -> norm -> q_b_proj); null: a plain q_proj.")
    kv_lora_rank: int = _f(512, "Rank d_c of the compressed latent KV (the part of the KV cache shared by all heads).")
    qk_nope_head_dim: int = _f(128, "Per-head query/key dimension without rotary embedding.")
    qk_rope_head_dim: int = _f(64, "Per-head dimension of the decoupled rotary query and of the shared rotary key.")
    v_head_dim: int = _f(128, "Per-head value dimension.")
    n_routed_experts: int = _f(256, "Number of fine-grained routed experts per MoE layer.")
    n_shared_experts: int = _f(1, "Number of shared experts (always active; fused into one SwiGLU of that many times the width).")
    num_experts_per_tok: int = _f(8, "Routed experts selected per token (K_r).")
    moe_intermediate_size: int = _f(2048, "Hidden width of one routed (and of one shared) expert.")
    n_group: int = _f(8, "Expert groups for group-limited routing (1: no group limit).")
    topk_group: int = _f(4, "Groups a token may route to (M in the DeepSeek-V3 report).")
    routed_scaling_factor: float = _f(2.5, "Scale applied to the routed experts' gating weights (2.5 in DeepSeek-V3).")
    norm_topk_prob: bool = _f(True, "Normalise the selected experts' gating weights to sum to one.")
    scoring_func: Literal["sigmoid", "softmax"] = _f(
        "sigmoid", "Token-to-expert affinity: sigmoid (DeepSeek-V3) or softmax (DeepSeek-V2).")
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = _f(
        "noaux_tc",
        "Expert selection: noaux_tc (DeepSeek-V3: biased scores, group score = sum of its top-2), "
        "greedy (plain top-k) or group_limited_greedy (DeepSeek-V2: group score = its max).")
    hidden_act: Literal["silu"] = _f("silu", "FFN activation (SwiGLU uses SiLU).")
    max_position_embeddings: int = _f(
        4096, "Longest sequence the positional encoding is meant for (under YaRN the extended length); "
        "train.seq_length may not exceed it.")
    rms_norm_eps: float = _f(1e-6, "Epsilon of every RMSNorm.")
    rope_theta: float = _f(10000.0, "RoPE base.")
    rope_scaling: Optional[dict] = _f(
        None,
        "YaRN settings or null. Keys: type ('yarn'), factor, original_max_position_embeddings, "
        "beta_fast (32), beta_slow (1), mscale (1), mscale_all_dim (0).")
    rope_interleave: bool = _f(
        True, "Rotary dims are interleaved pairs (DeepSeek's weight layout) rather than two halves.")
    num_nextn_predict_layers: int = _f(1, "Multi-token-prediction depth D (0 disables MTP).")
    initializer_range: float = _f(0.02, "Std of the normal initialisation of weight matrices.")
    tie_word_embeddings: bool = _f(False, "DeepSeek-V3 does not tie embedding and head; only false is supported.")
    # Training-only values (absent from a Hugging Face config.json).
    mtp_loss_weight: float = _f(0.3, "lambda: the MTP loss (averaged over depths) is multiplied by this.")
    bias_update_speed: float = _f(
        0.001, "gamma of auxiliary-loss-free balancing: per-step change of each expert's routing bias.")
    aux_loss_alpha: float = _f(0.0001, "alpha of the sequence-wise balance loss (0 disables it).")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer_index: int) -> bool:
        """Blocks with index >= first_k_dense_replace are MoE; MTP blocks continue the numbering."""
        return layer_index >= self.first_k_dense_replace and self.n_routed_experts > 0


@dataclass
class ParallelConfig:
    """How the model is split over ranks. World size = TP x PP x DP; EP divides DP x TP."""

    tensor_parallel: int = _f(1, "Tensor-parallel size (heads, FFN width and vocabulary split).")
    pipeline_parallel: int = _f(1, "Pipeline-parallel size (layers split into stages).")
    expert_parallel: int = _f(1, "Expert-parallel size (routed experts split across ranks).")
    sequence_parallel: bool = _f(False, "Shard activations along the sequence outside TP regions.")
    schedule: str = _f("1f1b", "Pipeline schedule: one of " + ", ".join(SCHEDULES) + ".")
    virtual_stages: int = _f(1, "Model chunks per pipeline rank (interleaved schedules).")
    layers_per_stage: Optional[list[int]] = _f(
        None, "Transformer layers of each pipeline stage in order (PP x virtual_stages stages for "
        "interleaved-1f1b, 2 x PP for dualpipev, else PP), e.g. fewer on the first and last stages, which "
        "also hold the embedding and the head + MTP; null: as even as possible.")
    overlap: bool = _f(False, "DualPipe(V): overlap the forward and the backward of a fused F&B pair, each one's "
                       "expert all-to-all running while the other computes.")
    micro_batches: Optional[int] = _f(
        None, "Micro-batches per step; null: global_batch_size / (micro_batch_size x DP).")
    collective_timeout_s: float = _f(
        600.0, "Seconds a collective may wait for the other ranks before the run fails with an error (a rank that "
               "died must not leave the others hanging); the first collectives, while ranks start, get the same.")


@dataclass
class DataConfig:
    """Where training text comes from and how it is tokenized."""

    source: str = _f("stdlib", "'stdlib' (this Python's own standard-library sources) or a path to text files.")
    tokenizer: Literal["bpe", "byte"] = _f("bpe", "Byte-level BPE trained on the corpus, or raw bytes.")
    max_bytes: int = _f(4_000_000, "Use at most this many bytes of the source text.")
    cache_dir: Optional[str] = _f(None, "Tokenized-data cache; null: ~/.cache/megads.")
    valid_fraction: float = _f(0.01, "Fraction of token windows held out for validation (of each dataset of "
                                     "data.datasets).")
    datasets: Optional[list[dict]] = _f(
        None, "Preprocessed datasets to train on instead of data.source: a list of {path: PREFIX (of PREFIX.bin/.idx "
              "made by megads preprocess), weight: W (positive, default 1)}; every global batch draws from them in "
              "proportion to the weights. null: data.source (source, tokenizer and max_bytes are unused otherwise).")
    tokenizer_file: Optional[str] = _f(
        None, "With data.datasets: the tokenizer file they were preprocessed with (megads preprocess --tokenizer); "
              "a dataset made by another tokenizer is refused.")


@dataclass(frozen=True)
class Fp8Config:
    """FP8 training with DeepSeek-V3's fine-grained scaling (megads.fp8): the ``fp8`` section.

    The one FP8 config type: ``megads.fp8.convert_to_fp8(model, cfg.fp8)`` and the FP8 layers take it
    as it is (they ignore ``enabled``, which only tells the trainer whether to convert). Frozen, so a
    config shared by every converted layer cannot change under them (and it is hashable).
    """

    enabled: bool = _f(False, "Run the GEMMs of attention, dense/shared FFNs, MTP projection and routed experts in "
                              "E4M3 (embedding, output head, router, norms and attention core stay high precision).")
    backend: Literal["emulated", "te", "torch"] = _f(
        "emulated", "emulated (pure PyTorch, any device), te (Transformer Engine >= 2.3, Hopper) or torch "
                    "(blockwise scaled matmul, SM90, cuBLASLt >= 12.9).")
    accumulation: Literal["fp32", "hopper"] = _f(
        "fp32", "Emulated backend only: exact FP32 accumulation, or Hopper's limited-precision chain.")
    promote_every: Optional[int] = _f(128, "Hopper accumulation: promote partial sums to FP32 every N elements of K "
                                           "(null: one chain over all of K, never promoted).")
    pow2_scales: bool = _f(False, "Round scales up to powers of two (exact dequantization).")
    eps: float = _f(1e-12, "Floor of a tile's amax before it becomes a scale (keeps all-zero tiles finite).")
    cache_activations: bool = _f(True, "Save layer inputs for backward in FP8 (with their scales) instead of FP32.")
    dispatch: bool = _f(
        False, "Send the routed experts' input tokens through the expert-parallel all-to-all in FP8 (1x128 tiles, "
               "power-of-two scales: about 1/4 of the FP32 bytes); combine and gradients stay high precision. "
               "Quantized at expert_parallel 1 too, so results do not depend on it. Needs fp8.enabled; best with "
               "fp8.pow2_scales (DeepSeek-V3's setting): the experts' GEMM then re-quantizes the tokens losslessly.")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = _f(200, "Optimizer steps to run (a resumed run continues up to this step).")
    global_batch_size: int = _f(8, "Sequences per optimizer step, over all data-parallel ranks.")
    micro_batch_size: int = _f(8, "Sequences per forward/backward pass; gradients accumulate over micro-batches.")
    seq_length: int = _f(256, "Tokens per training sequence.")
    lr: float = _f(3e-3, "Peak learning rate.")
    min_lr: float = _f(3e-4, "Learning rate at the end of cosine decay.")
    warmup_steps: int = _f(20, "Linear warm-up steps.")
    decay_steps: Optional[int] = _f(None, "Cosine decay ends at this step; null: max_steps.")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (not applied to norms and biases).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.95, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    adam_moments: Literal["fp32", "bf16"] = _f(
        "fp32", "Storage of AdamW's moments: fp32, or bf16 (DeepSeek-V3's choice: half the memory; the update "
        "is computed in FP32).")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 disables clipping).")
    precision: Literal["fp32", "bf16"] = _f(
        "fp32", "Compute precision: fp32, or bf16 autocast (weights and optimizer stay FP32 masters).")
    recompute: Literal["none", "selective", "full"] = _f(
        "none", "Activation recomputation: none; selective (DeepSeek-V3's choice: every RMSNorm, MLA's "
        "up-projections and the SwiGLU activations are recomputed in backward, their outputs not kept); full (each transformer block keeps "
        "only its input and reruns its forward in backward). Same losses and gradients, less activation memory, "
        "more time.")
    seed: int = _f(1234, "Seed for initialisation and data order.")
    output_dir: str = _f("runs/tiny", "Where metrics.jsonl, TensorBoard events and checkpoints go.")
    save_every: int = _f(100, "Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = _f(2, "Keep the newest N checkpoints (0: keep all).")
    log_every: int = _f(10, "Print a progress line every N steps.")
    eval_every: int = _f(0, "Evaluate the validation loss every N steps (0: never).")
    expert_load_every: Optional[int] = _f(
        None, "Log every MoE layer's per-expert load (tokens over the mean, metrics.jsonl `expert_load`) every N "
              "steps; null: every log_every steps; 0: never (the per-layer max/mean is logged every step anyway).")
    eval_batches: int = _f(4, "Micro-batches per validation-loss evaluation.")
    num_threads: Optional[int] = _f(None, "torch intra-op threads on CPU; null: torch's default.")
    max_skipped_steps: int = _f(
        20, "Stop with an error after this many consecutive skipped steps (non-finite loss, gradient or update: "
            "never applied); 0: never stop for that.")
    profile_steps: list[int] = _f(
        [], "Steps (1-based) to trace with torch.profiler: OUTPUT_DIR/profile/rank{R}.{STEP}.pt.trace.json, for "
            "TensorBoard's profiler view (torch-tb-profiler) or Perfetto; e.g. [5, 6]. Tracing slows those steps.")


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class RLConfig:
    """Post-training, DeepSeek-R1's recipe: cold-start SFT (`megads sft`) and GRPO (`megads grpo`) on a
    verifiable task generated in code, with rule-based rewards. Both use the train section for the
    optimiser, steps, batch (`megads grpo`: train.global_batch_size = prompts_per_step x group_size
    sequences, in micro-batches of train.micro_batch_size) and checkpoints."""

    task: str = _f("arithmetic", "The verifiable task (megads.rl.tasks).")
    task_options: dict = _f({}, "Options of the task, e.g. {max_digits: 2}.")
    init_from: Optional[str] = _f(
        None, "Checkpoint (or run directory: its latest checkpoint) whose weights SFT or GRPO starts from; "
              "null: SFT starts from the seeded initialisation; GRPO needs one.")
    sft_problems: int = _f(4000, "Demonstrations (train-split problems) the cold-start SFT cycles through.")
    max_prompt_length: int = _f(16, "Prompts are left-padded with end-of-text tokens to this many tokens.")
    max_new_tokens: int = _f(64, "Completion tokens at most (end-of-text included).")
    prompts_per_step: int = _f(16, "GRPO: prompts per optimizer step (over all data-parallel ranks).")
    group_size: int = _f(8, "GRPO: G, samples per prompt (advantages are relative within a group).")
    temperature: float = _f(1.0, "Sampling temperature of the rollouts (log-probabilities use the same).")
    top_p: float = _f(1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability (1: off).")
    top_k: int = _f(0, "Sample among the k most likely tokens (0: off).")
    epsilon_low: float = _f(0.2, "PPO clip: the ratio may not fall below 1 - epsilon_low.")
    epsilon_high: float = _f(0.2, "PPO clip: the ratio may not rise above 1 + epsilon_high (DAPO's clip-higher: 0.28).")
    beta: float = _f(0.0, "Coefficient of the k3 KL to the frozen reference policy (0: no reference model is built).")
    scale_rewards: bool = _f(True, "Advantages (r - mean) / (std + eps) per group; false: r - mean (Dr. GRPO).")
    loss_aggregation: str = _f("token-mean", "How per-token losses make the loss: one of " + ", ".join(LOSS_AGGREGATIONS)
                               + " (over the global batch).")
    policy_iterations: int = _f(1, "mu: optimizer steps per rollout batch (ratios against the rollout's policy).")
    truncated: Literal["keep", "mask", "penalize"] = _f(
        "keep", "Completions without end-of-text within max_new_tokens: kept as they are, masked out of the loss, "
                "or given reward truncation_penalty.")
    truncation_penalty: float = _f(0.0, "Reward of a truncated completion with truncated: penalize.")
    dynamic_sampling: bool = _f(False, "DAPO's dynamic sampling: re-sample groups whose rewards are all equal "
                                       "(zero advantage), with new prompts, up to max_resample_rounds.")
    max_resample_rounds: int = _f(2, "Extra rollout rounds dynamic sampling may run per step.")
    routing_replay: bool = _f(True, "MoE: the log-probability and policy passes route every token to the experts the "
                                    "rollout chose (router scores still computed, so the gates keep their gradients).")
    rewards: dict = _f({"accuracy": 1.0, "partial": 1.0},
                       "Reward functions and their weights (megads.rl.rewards): accuracy (1 for the right answer), "
                       "format (1 when well formed), partial (0.1 for a well-formed wrong integer answer: TinyZero's "
                       "scheme with the default weights).")
    eval_problems: int = _f(500, "Held-out problems of each evaluation (greedy pass@1, and pass@G with group_size samples).")
    eval_every: int = _f(10, "GRPO: evaluate every N steps (0: only before the first and after the last).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    rl: RLConfig = field(default_factory=RLConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "train": TrainConfig,
                    "fp8": Fp8Config, "rl": RLConfig}


# ----------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        tp, str(tp))


# A number in exponent notation without a dot, which YAML 1.1 does not read as a float ("1e-4").
_YAML11_FLOAT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}.")
        return [_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-4 (no dot) as a string: it is the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}.")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}.")
        return dict(value)
    raise TypeError(f"unsupported annotation {tp} for {where}")


def _section_from_dict(cls, values: dict, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"Section '{section}' must be a mapping of keys to values, got {values!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"Unknown key '{section}.{key}'; known keys of '{section}': {', '.join(sorted(known))}.")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    """Build a Config from nested dicts (unknown sections and keys are errors), then validate it."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"A config file must be a mapping of sections, got {type(raw).__name__}.")
    for section in raw:
        if section not in _SECTION_CLASSES:
            raise ConfigError(f"Unknown section '{section}'; sections are: {', '.join(_SECTION_CLASSES)}.")
    sections = {name: {} if raw.get(name) is None else raw[name] for name in _SECTION_CLASSES}
    cfg = Config(**{name: _section_from_dict(cls, sections[name], name) for name, cls in _SECTION_CLASSES.items()})
    validate(cfg)
    return cfg


def model_config_from_dict(values: dict) -> ModelConfig:
    """A ModelConfig from a model section alone (e.g. a Hugging Face config.json's), checked by the
    model's own rules; the rules that join it to other sections wait for a whole config, so a model
    meant for fewer positions than the default train.seq_length is not refused here."""
    model = _section_from_dict(ModelConfig, values, "model")
    _raise_problems([msg for ok, msg in _model_rules(model) if not ok and msg])
    return model


def config_for_model(model: ModelConfig) -> Config:
    """A valid Config around `model` with defaults elsewhere, except train.seq_length, which is capped at
    model.max_position_embeddings (what `megads import-hf` writes as a checkpoint's config.yaml)."""
    train = TrainConfig(seq_length=min(TrainConfig().seq_length, model.max_position_embeddings))
    cfg = Config(model=model, train=train)
    validate(cfg)
    return cfg


def _parse_yaml(text: str, what: str) -> Any:
    """yaml.safe_load(text), or a ConfigError saying `what` is not valid YAML and why, on one line.

    Besides YAMLError, PyYAML raises ValueError for values it cannot construct (a timestamp
    2001-13-01, `!!int x`) and RecursionError for very deep nesting."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
        mark = getattr(err, "problem_mark", None)  # PyYAML's own str() spans several lines
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{what} is not valid YAML ({problem}{where}).") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `SECTION.KEY=VALUE` overrides (VALUE parsed as YAML) to the raw nested dict."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"A config file must be a mapping of sections, got {type(raw).__name__}.")
    # Copy mapping sections; leave anything else for config_from_dict to reject with its message.
    raw = {k: ({} if v is None else dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like SECTION.KEY=VALUE.")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"Override key '{key}' must be SECTION.KEY, e.g. train.max_steps.")
        section, name = parts
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"Section '{section}' must be a mapping of keys to values, got {target!r}.")
        target[name] = _parse_yaml(text, f"The value of override '{item}'") if text.strip() else None
    return raw


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_config_file(path: str | Path) -> dict:
    """The raw sections of a YAML config file (an empty file: none). A file that cannot be read, is not
    UTF-8, is not YAML, or is not a mapping of sections to mappings is a ConfigError naming the file
    (a damaged file, e.g. a checkpoint's config.yaml, is one sentence, not a traceback)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Config file {path} is a directory, not a YAML file.")
    if not path.exists():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"Config file {path} cannot be read ({err.strerror}).") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"Config file {path} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset "
                          f"{err.start} cannot be decoded.") from None
    raw = _parse_yaml(text, f"Config file {path}")
    if raw is None:  # empty, or only comments; a falsy non-mapping ([], 0, '') is an error below
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {path} must be a mapping of sections (model:, train:, ...), "
                          f"got {type(raw).__name__} {_short(raw)}.")
    for section, values in raw.items():
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"Section '{section}' of config file {path} must be a mapping of keys to values, "
                              f"got {_short(values)}.")
    return raw


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config (None: all defaults), apply overrides, validate."""
    raw = {} if path is None else read_config_file(path)
    return config_from_dict(apply_overrides(raw, overrides or []))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe_fields() -> str:
    """Every field with its default and documentation (for `megads train --help-config`)."""
    lines = []
    for section, cls in _SECTION_CLASSES.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- validation

# rope_scaling (YaRN): the parameters, and the keys that name the kind ("type" in DeepSeek's config.json,
# "rope_type" in transformers 5); model.rope_scaling may hold any of ROPE_SCALING_KEYS.
YARN_KEYS = frozenset({"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                       "mscale_all_dim", "attention_factor", "truncate"})
ROPE_TYPE_KEYS = ("type", "rope_type")
ROPE_SCALING_KEYS = YARN_KEYS | frozenset(ROPE_TYPE_KEYS)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _model_rules(m: ModelConfig):
    """Yield (ok, sentence) for each model rule."""
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                 "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
        yield getattr(m, name) >= 1, f"model.{name} must be at least 1, got {getattr(m, name)}."
    for name in ("qk_nope_head_dim", "n_shared_experts", "num_nextn_predict_layers", "n_routed_experts"):
        yield getattr(m, name) >= 0, f"model.{name} must not be negative, got {getattr(m, name)}."
    yield m.qk_rope_head_dim % 2 == 0, f"model.qk_rope_head_dim must be even (rotary pairs), got {m.qk_rope_head_dim}."
    yield m.q_lora_rank is None or m.q_lora_rank >= 1, f"model.q_lora_rank must be null or at least 1, got {m.q_lora_rank}."
    yield 0 <= m.first_k_dense_replace <= m.num_hidden_layers, (
        f"model.first_k_dense_replace must be between 0 and num_hidden_layers ({m.num_hidden_layers}), "
        f"got {m.first_k_dense_replace}.")
    if m.first_k_dense_replace > 0:
        yield m.intermediate_size >= 1, f"model.intermediate_size must be at least 1 when there are dense layers, got {m.intermediate_size}."
    has_moe = m.first_k_dense_replace < m.num_hidden_layers or m.num_nextn_predict_layers > 0
    if has_moe:
        yield m.n_routed_experts >= 1, "model.n_routed_experts must be at least 1 when there are MoE layers."
        yield m.moe_intermediate_size >= 1, f"model.moe_intermediate_size must be at least 1, got {m.moe_intermediate_size}."
        yield 1 <= m.num_experts_per_tok <= m.n_routed_experts, (
            f"model.num_experts_per_tok ({m.num_experts_per_tok}) must be between 1 and "
            f"n_routed_experts ({m.n_routed_experts}).")
        yield m.n_group >= 1, f"model.n_group must be at least 1, got {m.n_group}."
        if m.n_group >= 1:
            yield m.n_routed_experts % m.n_group == 0, (
                f"model.n_routed_experts ({m.n_routed_experts}) must be divisible by n_group ({m.n_group}).")
            yield 1 <= m.topk_group <= m.n_group, (
                f"model.topk_group ({m.topk_group}) must be between 1 and n_group ({m.n_group}).")
            per_group = m.n_routed_experts // m.n_group if m.n_routed_experts % m.n_group == 0 else 0
            if m.topk_method == "noaux_tc" and m.n_group > 1 and per_group:
                yield per_group >= 2, (
                    f"model.n_group ({m.n_group}) leaves fewer than 2 experts per group; noaux_tc scores a "
                    f"group by the sum of its top-2 experts.")
            if m.topk_method != "greedy" and m.n_group >= 1 and per_group:
                yield m.topk_group * per_group >= m.num_experts_per_tok, (
                    f"model.num_experts_per_tok ({m.num_experts_per_tok}) exceeds the experts in topk_group "
                    f"({m.topk_group}) groups of {per_group}.")
        yield m.routed_scaling_factor > 0, f"model.routed_scaling_factor must be positive, got {m.routed_scaling_factor}."
    yield m.rms_norm_eps > 0, f"model.rms_norm_eps must be positive, got {m.rms_norm_eps}."
    yield m.rope_theta > 0, f"model.rope_theta must be positive, got {m.rope_theta}."
    yield m.initializer_range > 0, f"model.initializer_range must be positive, got {m.initializer_range}."
    yield not m.tie_word_embeddings, "model.tie_word_embeddings must be false: DeepSeek-V3 keeps embedding and head separate."
    yield m.mtp_loss_weight >= 0, f"model.mtp_loss_weight must not be negative, got {m.mtp_loss_weight}."
    yield m.bias_update_speed >= 0, f"model.bias_update_speed must not be negative, got {m.bias_update_speed}."
    yield m.aux_loss_alpha >= 0, f"model.aux_loss_alpha must not be negative, got {m.aux_loss_alpha}."
    if m.rope_scaling is not None:
        rs = m.rope_scaling
        unknown = set(rs) - ROPE_SCALING_KEYS
        yield not unknown, f"model.rope_scaling has unknown keys {sorted(unknown)}; known: {sorted(ROPE_SCALING_KEYS)}."
        kind = rs.get("type", rs.get("rope_type"))
        yield kind == "yarn", f"model.rope_scaling.type must be 'yarn' (the only scaling DeepSeek-V3 uses), got {kind!r}."
        factor = rs.get("factor")
        yield _is_number(factor) and factor >= 1, f"model.rope_scaling.factor must be a number >= 1, got {factor!r}."
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            if rs.get(key) is not None:
                yield _is_number(rs[key]), f"model.rope_scaling.{key} must be a number, got {rs[key]!r}."
        if "truncate" in rs:
            yield isinstance(rs["truncate"], bool), f"model.rope_scaling.truncate must be true or false, got {rs['truncate']!r}."
        ompe = rs.get("original_max_position_embeddings")
        yield isinstance(ompe, int) and not isinstance(ompe, bool) and ompe >= 1, (
            f"model.rope_scaling.original_max_position_embeddings must be a positive integer, got {ompe!r}.")


def _train_rules(t: TrainConfig, m: ModelConfig):
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "seq_length", "log_every", "eval_batches"):
        yield getattr(t, name) >= 1, f"train.{name} must be at least 1, got {getattr(t, name)}."
    for name in ("save_every", "keep_checkpoints", "eval_every", "warmup_steps", "weight_decay", "grad_clip",
                 "max_skipped_steps"):
        yield getattr(t, name) >= 0, f"train.{name} must not be negative, got {getattr(t, name)}."
    yield t.global_batch_size % max(t.micro_batch_size, 1) == 0, (
        f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.micro_batch_size "
        f"({t.micro_batch_size}).")
    yield t.lr > 0, f"train.lr must be positive, got {t.lr}."
    yield 0 <= t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must be between 0 and train.lr ({t.lr})."
    yield 0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "train.adam_beta1 and train.adam_beta2 must be in [0, 1)."
    yield t.adam_eps > 0, f"train.adam_eps must be positive, got {t.adam_eps}."
    yield t.decay_steps is None or t.decay_steps >= 1, f"train.decay_steps must be null or at least 1, got {t.decay_steps}."
    yield t.num_threads is None or t.num_threads >= 1, f"train.num_threads must be null or at least 1, got {t.num_threads}."
    yield t.expert_load_every is None or t.expert_load_every >= 0, (
        f"train.expert_load_every must be null or not negative, got {t.expert_load_every}.")
    bad_steps = [s for s in t.profile_steps if not 1 <= s <= t.max_steps]
    yield not bad_steps, (f"train.profile_steps must name steps between 1 and train.max_steps ({t.max_steps}), "
                          f"got {bad_steps}.")
    # A longer sequence would train, silently, on rotary positions outside the context the model is meant for.
    # Under YaRN max_position_embeddings is already the extended length (DeepSeek-V3: 163840 = factor 40 x
    # original 4096), so it is the bound either way.
    yield t.seq_length <= m.max_position_embeddings, (
        f"train.seq_length ({t.seq_length}) must not exceed model.max_position_embeddings "
        f"({m.max_position_embeddings}).")


def pipeline_stage_count(p: ParallelConfig) -> int:
    """How many stages the model is cut into under parallel.schedule."""
    if p.schedule == "interleaved-1f1b":
        return p.pipeline_parallel * p.virtual_stages
    if p.schedule == "dualpipev":
        return 2 * p.pipeline_parallel
    return p.pipeline_parallel


def micro_batch_rules(p: ParallelConfig, n: int, what: str = "parallel.micro_batches"):
    """What the pipeline schedule needs of the number of micro-batches per step, n (given by
    parallel.micro_batches, or derived from the batch sizes and the data-parallel size: `what`
    names it in the messages)."""
    pp = p.pipeline_parallel
    if pp == 1:
        return
    if p.schedule == "interleaved-1f1b":
        yield n % pp == 0, (f"{what} ({n}) must be a multiple of parallel.pipeline_parallel "
                            f"({pp}) for interleaved-1f1b (otherwise its warm-up deadlocks).")
    if p.schedule in ("dualpipe", "dualpipev"):
        yield n >= 2 * pp and (n % 2 == 0 or p.schedule == "dualpipev"), (
            f"{what} ({n}) must be at least 2 x parallel.pipeline_parallel ({2 * pp})"
            f"{' and even' if p.schedule == 'dualpipe' else ''} for {p.schedule}.")


def _parallel_rules(p: ParallelConfig, m: ModelConfig, t: TrainConfig):
    for name in ("tensor_parallel", "pipeline_parallel", "expert_parallel", "virtual_stages"):
        yield getattr(p, name) >= 1, f"parallel.{name} must be at least 1, got {getattr(p, name)}."
    yield p.schedule in SCHEDULES, f"parallel.schedule must be one of {', '.join(SCHEDULES)}, got {p.schedule!r}."
    yield p.micro_batches is None or p.micro_batches >= 1, "parallel.micro_batches must be null or at least 1."
    yield p.collective_timeout_s > 0, f"parallel.collective_timeout_s must be positive, got {p.collective_timeout_s}."
    tp = max(p.tensor_parallel, 1)
    yield m.num_attention_heads % tp == 0, (
        f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by parallel.tensor_parallel ({tp}).")
    yield m.vocab_size % tp == 0, f"model.vocab_size ({m.vocab_size}) must be divisible by parallel.tensor_parallel ({tp})."
    if m.first_k_dense_replace > 0:
        yield m.intermediate_size % tp == 0, (
            f"model.intermediate_size ({m.intermediate_size}) must be divisible by parallel.tensor_parallel ({tp}).")
    ep = max(p.expert_parallel, 1)
    yield m.n_routed_experts % ep == 0 or m.n_routed_experts == 0, (
        f"model.n_routed_experts ({m.n_routed_experts}) must be divisible by parallel.expert_parallel ({ep}).")
    yield m.num_hidden_layers >= p.pipeline_parallel * p.virtual_stages, (
        f"model.num_hidden_layers ({m.num_hidden_layers}) must be at least parallel.pipeline_parallel x "
        f"virtual_stages ({p.pipeline_parallel * p.virtual_stages}).")
    pp = p.pipeline_parallel
    if p.schedule == "interleaved-1f1b" and pp > 1:
        yield p.virtual_stages >= 2, (
            f"parallel.virtual_stages must be at least 2 for interleaved-1f1b, got {p.virtual_stages}.")
    if p.micro_batches is not None:
        yield from micro_batch_rules(p, p.micro_batches)
    if p.schedule == "dualpipev" and pp > 1:
        yield m.num_hidden_layers >= 2 * pp, (
            f"model.num_hidden_layers ({m.num_hidden_layers}) must be at least 2 x parallel.pipeline_parallel "
            f"({2 * pp}): dualpipev places two stages on every rank.")
    yield not p.overlap or (p.schedule in ("dualpipe", "dualpipev") and pp > 1), (
        f"parallel.overlap overlaps DualPipe's fused forward-backward pairs: it needs parallel.schedule dualpipe or "
        f"dualpipev and pipeline_parallel > 1 (got {p.schedule}, {pp}).")
    if p.schedule == "dualpipe":
        yield p.pipeline_parallel % 2 == 0, (
            f"parallel.schedule dualpipe needs an even parallel.pipeline_parallel, got {p.pipeline_parallel}.")
    if p.layers_per_stage is not None and pp > 1:
        stages = pipeline_stage_count(p)
        yield (len(p.layers_per_stage) == stages and sum(p.layers_per_stage) == m.num_hidden_layers
               and min(p.layers_per_stage) >= 1), (
            f"parallel.layers_per_stage {p.layers_per_stage} must give each of the {stages} pipeline stages of "
            f"{p.schedule} at least one layer and sum to model.num_hidden_layers ({m.num_hidden_layers}).")
    if p.sequence_parallel:
        yield t.seq_length % tp == 0, (
            f"train.seq_length ({t.seq_length}) must be divisible by parallel.tensor_parallel ({tp}) "
            f"with sequence_parallel.")


# Rules that need the world size, and the sizes derived from it. Each rule is one function returning
# (ok, sentence): _layout_rules lists it, and the helper that needs it raises its sentence.


def _world_size_rule(p: ParallelConfig, world_size: int) -> tuple[bool, str]:
    return world_size % (p.tensor_parallel * p.pipeline_parallel) == 0, (
        f"The world size ({world_size}) must be a multiple of parallel.tensor_parallel x "
        f"parallel.pipeline_parallel ({p.tensor_parallel} x {p.pipeline_parallel}).")


def _batch_split_rule(t: TrainConfig, data_parallel_size: int) -> tuple[bool, str]:
    return t.global_batch_size % (data_parallel_size * t.micro_batch_size) == 0, (
        f"train.global_batch_size ({t.global_batch_size}) must be divisible by the data-parallel "
        f"size ({data_parallel_size}) x train.micro_batch_size ({t.micro_batch_size}).")


def _require(rule: tuple[bool, str]) -> None:
    ok, message = rule
    if not ok:
        raise ConfigError(message)


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """The data-parallel size on `world_size` ranks: world_size / (TP x PP) (ConfigError unless it divides)."""
    _require(_world_size_rule(cfg.parallel, world_size))
    return world_size // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)


def micro_batches_per_step(cfg: Config, data_parallel_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank: global_batch_size / (DP x
    micro_batch_size) (ConfigError unless it divides; parallel.micro_batches, when set, must equal it)."""
    _require(_batch_split_rule(cfg.train, data_parallel_size))
    return cfg.train.global_batch_size // (data_parallel_size * cfg.train.micro_batch_size)


def _layout_rules(cfg: Config, world_size: int):
    """Yield (ok, sentence) for each rule of running `cfg` on `world_size` ranks."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    yield world_size >= 1, f"The world size must be at least 1, got {world_size}."
    if world_size < 1 or min(p.tensor_parallel, p.pipeline_parallel, p.expert_parallel, t.micro_batch_size) < 1:
        return  # the sizes' own rules report them; nothing can be derived from them
    ok, message = _world_size_rule(p, world_size)
    yield ok, message
    if ok:
        dp = data_parallel_size(cfg, world_size)
        yield (p.tensor_parallel * dp) % p.expert_parallel == 0, (
            f"parallel.expert_parallel ({p.expert_parallel}) must divide the {p.tensor_parallel * dp} ranks of a "
            f"pipeline stage (tensor_parallel x data-parallel size {p.tensor_parallel} x {dp}).")
        ok, message = _batch_split_rule(t, dp)
        yield ok, message
        if ok:
            n = micro_batches_per_step(cfg, dp)
            if p.micro_batches is not None:
                yield p.micro_batches == n, (
                    f"parallel.micro_batches ({p.micro_batches}) must equal train.global_batch_size / (data-parallel "
                    f"size x train.micro_batch_size) = {t.global_batch_size} / ({dp} x {t.micro_batch_size}) = {n}, "
                    f"or be null.")
            else:  # a given parallel.micro_batches meets micro_batch_rules in _parallel_rules
                yield from micro_batch_rules(p, n, f"the number of micro-batches per step, train.global_batch_size / "
                                                   f"(data-parallel size {dp} x train.micro_batch_size),")
    # Without sequence parallelism MoE layers split whole sequences across TP ranks; with it each TP
    # rank already holds a chunk of every sequence (_parallel_rules requires seq_length % TP == 0).
    # Checked with the layout, where it always was (a config alone may name TP > 1 without running it).
    yield not (p.tensor_parallel > 1 and not p.sequence_parallel and m.num_moe_layers + m.num_nextn_predict_layers > 0
               and t.micro_batch_size % p.tensor_parallel), (
        f"train.micro_batch_size ({t.micro_batch_size}) must be divisible by parallel.tensor_parallel "
        f"({p.tensor_parallel}): MoE layers split whole sequences across tensor-parallel ranks (or set "
        f"parallel.sequence_parallel).")


DATASET_KEYS = ("path", "weight")


def dataset_weight(entry: dict) -> Any:
    """The weight of a data.datasets entry: its number (default 1; YAML 1.1's 1e-3, read as a string, is the
    number), or the value as written when it is not one (the rules report it)."""
    weight = entry.get("weight", 1.0)
    if isinstance(weight, str) and _YAML11_FLOAT.fullmatch(weight.strip()):
        return float(weight)
    return weight


def _data_rules(d: DataConfig):
    yield d.max_bytes >= 1000, f"data.max_bytes must be at least 1000, got {d.max_bytes}."
    yield 0 <= d.valid_fraction < 0.5, f"data.valid_fraction must be in [0, 0.5), got {d.valid_fraction}."
    if d.datasets is not None:
        yield len(d.datasets) >= 1, (
            "data.datasets must list at least one dataset, or be null to train on the text corpus.")
        for i, entry in enumerate(d.datasets):
            unknown = sorted(set(entry) - set(DATASET_KEYS))
            yield not unknown, f"data.datasets[{i}] has unknown keys {unknown}; its keys are {', '.join(DATASET_KEYS)}."
            path = entry.get("path")
            yield isinstance(path, str) and path != "", (
                f"data.datasets[{i}].path must be the PREFIX of a preprocessed PREFIX.bin/.idx, got {path!r}.")
            weight = dataset_weight(entry)
            yield _is_number(weight) and math.isfinite(weight) and weight > 0, (
                f"data.datasets[{i}].weight must be a positive number, got {weight!r}.")
    yield d.datasets is None or d.tokenizer_file is not None, (
        "data.tokenizer_file must name the tokenizer file that data.datasets were preprocessed with.")
    yield d.tokenizer_file is None or d.datasets is not None, (
        "data.tokenizer_file is read only with data.datasets (the text corpus trains its own tokenizer).")


def _fp8_rules(f: Fp8Config, p: ParallelConfig):
    yield f.promote_every is None or f.promote_every >= 1, f"fp8.promote_every must be null or at least 1, got {f.promote_every}."
    yield not (f.accumulation == "hopper" and f.backend != "emulated"), (
        "fp8.accumulation hopper is a model of the tensor cores for the emulated backend; real backends accumulate "
        "as the hardware does (use accumulation fp32).")
    yield f.eps > 0, f"fp8.eps must be positive (an all-zero tile would get a zero scale), got {f.eps}."
    yield not (f.dispatch and not f.enabled), (
        "fp8.dispatch (FP8 expert all-to-all) needs fp8.enabled: true.")


def _rl_rules(r: RLConfig):
    for name in ("max_prompt_length", "max_new_tokens", "prompts_per_step", "policy_iterations", "eval_problems",
                 "sft_problems"):
        yield getattr(r, name) >= 1, f"rl.{name} must be at least 1, got {getattr(r, name)}."
    for name in ("top_k", "max_resample_rounds", "eval_every"):
        yield getattr(r, name) >= 0, f"rl.{name} must not be negative, got {getattr(r, name)}."
    yield r.group_size >= 2, (f"rl.group_size must be at least 2 (advantages compare the samples of a prompt), "
                              f"got {r.group_size}.")
    for name in ("epsilon_low", "epsilon_high"):
        yield 0 < getattr(r, name) < 1, f"rl.{name} must be in (0, 1), got {getattr(r, name)}."
    yield r.beta >= 0, f"rl.beta must not be negative, got {r.beta}."
    yield r.temperature >= 0, f"rl.temperature must not be negative (0: greedy), got {r.temperature}."
    yield 0 < r.top_p <= 1, f"rl.top_p must be in (0, 1], got {r.top_p}."
    yield r.loss_aggregation in LOSS_AGGREGATIONS, (
        f"rl.loss_aggregation must be one of {', '.join(LOSS_AGGREGATIONS)}, got {r.loss_aggregation!r}.")
    yield isinstance(r.rewards, dict) and len(r.rewards) > 0 and all(
        isinstance(k, str) and _is_number(v) and v == v and abs(v) != float("inf") for k, v in r.rewards.items()), (
        f"rl.rewards must map reward names to finite numbers, got {r.rewards!r}.")


def _rl_job_rules(cfg: Config, job: str):
    """Rules of `megads sft` / `megads grpo` (a plain `megads train` ignores the rl section)."""
    r, m, t = cfg.rl, cfg.model, cfg.train
    yield from _rl_rules(r)
    context = r.max_prompt_length + r.max_new_tokens
    yield context <= m.max_position_embeddings, (
        f"rl.max_prompt_length + rl.max_new_tokens ({context}) must not exceed model.max_position_embeddings "
        f"({m.max_position_embeddings}).")
    yield m.vocab_size >= 257, f"model.vocab_size ({m.vocab_size}) must be at least 257: the tasks are byte-level."
    yield not cfg.parallel.sequence_parallel, (
        "parallel.sequence_parallel is not supported by megads sft/grpo yet (decoding one token per step cannot "
        "be split into sequence chunks).")
    yield t.seq_length == context - 1, (
        f"train.seq_length ({t.seq_length}) must be rl.max_prompt_length + rl.max_new_tokens - 1 = {context - 1} "
        f"(the tokens a sequence feeds the model).")
    if job == "grpo":
        rows = r.prompts_per_step * r.group_size
        yield t.global_batch_size == rows, (
            f"train.global_batch_size ({t.global_batch_size}) must be rl.prompts_per_step x rl.group_size "
            f"({r.prompts_per_step} x {r.group_size} = {rows}): the sequences of one GRPO step.")
        yield r.init_from is not None, "rl.init_from must name the checkpoint GRPO starts from (e.g. the SFT run)."


def validate(cfg: Config, world_size: Optional[int] = None, job: str = "train") -> None:
    """Raise ConfigError listing every violated rule (one sentence each); given `world_size`, the
    rules of running on that many ranks too (checked at launch, before any process group exists);
    `job` "sft" or "grpo" adds the post-training rules of the rl section."""
    layout = () if world_size is None else _layout_rules(cfg, world_size)
    rl = _rl_job_rules(cfg, job) if job in ("sft", "grpo") else _rl_rules(cfg.rl)
    problems = [msg for ok, msg in (*_model_rules(cfg.model), *_train_rules(cfg.train, cfg.model),
                                    *_parallel_rules(cfg.parallel, cfg.model, cfg.train), *_data_rules(cfg.data),
                                    *_fp8_rules(cfg.fp8, cfg.parallel), *rl, *layout)
                if not ok and msg]
    if cfg.data.tokenizer == "byte" and cfg.model.vocab_size < 260:
        problems.append(f"model.vocab_size ({cfg.model.vocab_size}) must be at least 260 for data.tokenizer byte.")
    _raise_problems(problems)


def _raise_problems(problems: list[str]) -> None:
    """ConfigError with the one violated rule's sentence, or a list of them; nothing if none."""
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else
                          "Invalid configuration:\n  " + "\n  ".join(problems))
