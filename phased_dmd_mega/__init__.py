"""phased-dmd-mega: Phased DMD distillation of large DiTs on megatron-core."""

from phased_dmd_mega import known_noise

__version__ = "0.1.0"

# Before any submodule imports megatron-core: its notices come at import time (known_noise.py).
known_noise.install()
