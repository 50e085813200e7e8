"""DiT backbones on megatron-core and their Hugging Face weight adapters."""

from phased_dmd_mega.models.loading import load_pretrained
from phased_dmd_mega.models.options import ModelParallelOptions
from phased_dmd_mega.models.qwen_image import QWEN_IMAGE_PRESETS, QwenImageDims, QwenImageModel
from phased_dmd_mega.models.wan import WAN_PRESETS, WanDims, WanModel

__all__ = [
    "ModelParallelOptions",
    "QWEN_IMAGE_PRESETS",
    "QwenImageDims",
    "QwenImageModel",
    "WAN_PRESETS",
    "WanDims",
    "WanModel",
    "load_pretrained",
]
