"""DeepSeek-V3's FP8 checkpoint format: dequantized on import, written by `megads export-hf --fp8`.

DeepSeek released V3's weights with every linear weight of attention and the FFNs (dense, shared
and routed experts, in the MTP layer too) stored as ``float8_e4m3fn`` codes plus a companion
``<name>_scale_inv``: FP32, one value per 128x128 block, shape ceil(out/128) x ceil(in/128), partial
edge blocks included; the weight is ``codes.float() * scale_inv`` broadcast over each block.
Everything else stays BF16 (embeddings, the output heads, norms, the MTP `eh_proj`) or FP32 (the
router's `mlp.gate.weight` when megads writes it, and `e_score_correction_bias`). config.json says
so in `quantization_config` (megads.hf.config.FP8_QUANTIZATION_CONFIG).

Import dequantizes into FP32, one tensor at a time as it is read (`DequantizingReader`), so the
scales never become megads tensors and memory stays one shard plus one tensor. FP32, not BF16:
megads trains FP32 master weights, so the checkpoint is loaded as FP32 anyway, and only FP32 holds
``code * scale`` closely enough for re-export to be stable (below). The cost is disk: 4 bytes per
parameter where DeepSeek's own fp8_cast_bf16.py writes 2.

Export quantizes with megads.fp8.quantize_blocks, DeepSeek's rule: scale = amax / 448 in FP32
(448 = E4M3's largest value), codes = the saturating round-to-nearest cast of w / scale.

Quantize -> dequantize (FP32) -> quantize is the identity, codes and scales bit for bit, so
`import-hf` then `export-hf --fp8` reproduces an FP8 checkpoint megads wrote. Per block, with
a = the block's amax (at least 1e-12, quantize_blocks' eps) and s = fl(a / 448):
- the amax element's code is +-448 (a / s is 448 within an FP32 rounding), so the dequantized
  block's amax is t = fl(448 s), and no other element exceeds it (every |code| <= 448);
- t is the FP32 number nearest to 448 s, so it is at least as near as a is: |t - 448 s| <= |a - 448 s|.
  Since a / 448 rounds to s (|a/448 - s| <= ulp(s)/2), so does t / 448: the new scale is s again;
- each element dequantizes to fl(c s) = c s (1 + d), |d| <= 2^-24, and fl(c s) / s lands within
  two FP32 ulps of c, far inside c's E4M3 rounding interval (1/16 of c): the code is c again.
A BF16 dequantization breaks the second step (fl(448 s) in BF16 is up to 2^-9 off), which is why
the import keeps FP32. An FP8 checkpoint whose scales were computed another way (say 1 / (448 / a))
re-exports with the same codes but may move a scale by an FP32 ulp, since its s need not equal fl(a / 448).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from megads.fp8.format import E4M3
from megads.fp8.quantize import BLOCK, BLOCK_128x128, Fp8Tensor, ceil_div, quantize_blocks
from megads.hf.names import keeps_fp32
from megads.shards import CheckpointFormatError, NonFiniteTensorError, ShardedReader, count_non_finite

SCALE_SUFFIX = "_scale_inv"

# The weights DeepSeek-V3 stores in FP8: the linear layers of attention and of the FFNs (dense,
# shared expert, routed experts `experts.{e}`), in every layer including the MTP layers' blocks.
# Not quantized: embed_tokens, lm_head, norms, the router (`mlp.gate.weight`, its bias), and the
# MTP layers' eh_proj and shared_head.head (BF16 in DeepSeek's release).
_QUANTIZED = re.compile(
    r"model\.layers\.\d+\."
    r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.((shared_experts|experts\.\d+)\.)?(gate_proj|up_proj|down_proj))\.weight")


def quantized_by_deepseek(hf_name: str) -> bool:
    """True for the Hugging Face tensors DeepSeek-V3 stores as FP8 with a 128x128 block scale."""
    return _QUANTIZED.fullmatch(hf_name) is not None


def block_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scale of an [..., out, in] weight: one per 128x128 block, partial blocks included."""
    *lead, rows, cols = shape
    return (*lead, ceil_div(rows, BLOCK), ceil_div(cols, BLOCK))


class DequantizingReader:
    """A ShardedReader over a Hugging Face directory that shows its FP8 weights dequantized.

    `keys()` hides each `<name>_scale_inv` whose `<name>` is present; `get(name)` returns an FP8
    tensor as FP32 code * scale (its scale checked first) and any other tensor as stored. Every
    inconsistency is a CheckpointFormatError naming the tensor and its shard file. With `fp8` False
    (config.json has no quantization_config) block scales and FP8 tensors are errors.
    """

    def __init__(self, reader: ShardedReader, fp8: bool):
        self.reader, self.fp8 = reader, fp8
        self.directory = reader.directory
        names = reader.keys()
        present = set(names)
        scales = [n for n in names if n.endswith(SCALE_SUFFIX) and n[:-len(SCALE_SUFFIX)] in present]
        if scales and not fp8:
            raise CheckpointFormatError(
                f"Tensor {scales[0]!r} in {reader.file_of(scales[0])} is an FP8 block scale, but "
                f"{reader.directory / 'config.json'} has no quantization_config saying the weights are FP8.")
        self._hidden = set(scales)
        self._keys = [n for n in names if n not in self._hidden]

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self.reader and name not in self._hidden

    def file_of(self, name: str) -> Path:
        return self.reader.file_of(name)

    def get(self, name: str) -> torch.Tensor:
        tensor = self.reader.get(name)
        where = f"Tensor {name!r} in {self.reader.file_of(name)}"
        scale_name = name + SCALE_SUFFIX
        if tensor.dtype.itemsize != 1 or not tensor.is_floating_point():
            if self.fp8 and scale_name in self.reader:
                raise CheckpointFormatError(f"{where} is {_dtype(tensor)} but has a {scale_name!r}; only "
                                            f"float8_e4m3fn weights have block scales.")
            return tensor
        if not self.fp8:
            raise CheckpointFormatError(f"{where} is {_dtype(tensor)}, but config.json has no quantization_config "
                                        f"saying how to dequantize it.")
        if tensor.dtype != E4M3:
            raise CheckpointFormatError(f"{where} is {_dtype(tensor)}; DeepSeek-V3's FP8 format "
                                        f"(quantization_config fmt 'e4m3') stores float8_e4m3fn.")
        if tensor.dim() < 2:
            raise CheckpointFormatError(f"{where} is float8_e4m3fn with shape {tuple(tensor.shape)}; block scales "
                                        f"belong to matrices.")
        if scale_name not in self.reader:
            raise CheckpointFormatError(f"{where} is float8_e4m3fn but its scale {scale_name!r} is missing.")
        scale = self.reader.get(scale_name)
        scale_where = f"Scale {scale_name!r} in {self.reader.file_of(scale_name)}"
        expected = block_scale_shape(tuple(tensor.shape))
        if tuple(scale.shape) != expected:
            raise CheckpointFormatError(
                f"{scale_where} has shape {tuple(scale.shape)}, expected {expected} (one per 128x128 block of "
                f"{name!r}, shape {tuple(tensor.shape)}).")
        if not scale.is_floating_point() or scale.dtype.itemsize == 1:
            raise CheckpointFormatError(f"{scale_where} is {_dtype(scale)}, expected float32.")
        bad = count_non_finite(scale)
        if bad:
            raise CheckpointFormatError(f"{scale_where} has {bad} non-finite value(s) (NaN or inf) of "
                                        f"{scale.numel()}; refusing to dequantize {name!r} with it.")
        # One FP32 multiplication per element, as DeepSeek's weight_dequant computes it.
        return Fp8Tensor(tensor, scale.float(), BLOCK_128x128).dequantize()


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def quantize_for_hf(stream: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """DeepSeek-V3's FP8 format of a stream of (HF name, tensor) at full precision.

    Weights DeepSeek quantizes become float8_e4m3fn codes followed by their `_scale_inv`; the router
    keeps FP32; every other floating tensor becomes BF16, as DeepSeek stores them. Quantization
    starts from the tensor as given (FP32 master weights, or an FP8 import's FP32 dequantization),
    never from a BF16 copy, which would round it twice.
    """
    for name, tensor in stream:
        if quantized_by_deepseek(name):
            # Checked here, not by the writer: NaN or inf in the weight would reach it as a whole block
            # of NaN codes and a NaN scale, which would misreport how many values were bad.
            bad = count_non_finite(tensor)
            if bad:
                raise NonFiniteTensorError(name, bad, tensor.numel(), destination="the Hugging Face directory")
            quantized = quantize_blocks(tensor)
            yield name, quantized.data
            yield name + SCALE_SUFFIX, quantized.scale
        elif tensor.is_floating_point() and not keeps_fp32(name):
            yield name, tensor.to(torch.bfloat16)
        else:
            yield name, tensor
