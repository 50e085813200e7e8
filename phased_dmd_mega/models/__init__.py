"""DiT backbones on megatron-core and their Hugging Face weight adapters."""

from phased_dmd_mega.models.wan import WAN_PRESETS, WanArch, WanModel, WanParallel

__all__ = ["WAN_PRESETS", "WanArch", "WanModel", "WanParallel"]
