"""The DeepSeek-V3 model as plain PyTorch modules; parallel layers come from `parallel/`."""

from megads.model.model import DeepSeekV3, LossOutput

__all__ = ["DeepSeekV3", "LossOutput"]
