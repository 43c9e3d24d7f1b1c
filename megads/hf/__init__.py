"""Import from and export to the Hugging Face DeepSeek-V3 format (config.json + sharded safetensors).

- `megads.hf.config`: config.json <-> ModelConfig (both config dialects), read_hf_config;
- `megads.hf.names`: tensor names and tensors between megads and HF checkpoints (stacked experts,
  MTP layers and their copies of the embedding and head);
- `megads.hf.fp8`: DeepSeek-V3's FP8 weights (E4M3 codes, 128x128 block `weight_scale_inv`),
  dequantized on read and written by export with `fp8=True`;
- `megads.hf.io`: directories: load_hf / save_hf, import_hf / export_hf, streaming and atomic.

    import megads.hf
    model = megads.hf.load_hf("hf/tiny")
    megads.hf.save_hf(model, "hf/copy")
"""

from megads.hf.config import (
    FP8_QUANTIZATION_CONFIG,
    HF_CONFIG,
    INFERENCE_ONLY_KEYS,
    Log,
    fp8_weights,
    hf_config_from_model_config,
    model_config_from_hf,
    read_hf_config,
)
from megads.hf.fp8 import DequantizingReader, quantize_for_hf, quantized_by_deepseek
from megads.hf.io import export_hf, import_hf, load_hf, save_hf
from megads.hf.names import (
    hf_mtp_depths,
    hf_tensors_to_megads,
    megads_state_shapes,
    megads_tensors_to_hf,
    megads_to_hf_name,
)

__all__ = [
    "HF_CONFIG", "INFERENCE_ONLY_KEYS", "Log", "hf_config_from_model_config", "model_config_from_hf", "read_hf_config",
    "FP8_QUANTIZATION_CONFIG", "fp8_weights", "DequantizingReader", "quantize_for_hf", "quantized_by_deepseek",
    "hf_mtp_depths", "hf_tensors_to_megads", "megads_state_shapes", "megads_tensors_to_hf", "megads_to_hf_name",
    "load_hf", "save_hf", "import_hf", "export_hf",
]
