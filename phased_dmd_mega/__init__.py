"""phased-dmd-mega: Phased DMD distillation of large DiTs on megatron-core."""

__version__ = "0.1.0"
