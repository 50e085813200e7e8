"""phased-dmd-mega: Phased DMD distillation of large DiTs on megatron-core."""

import warnings

__version__ = "0.1.0"

# Noise from megatron-core that users can do nothing about, silenced before any submodule
# imports it: its import-time notice that it falls back from Transformer Engine and Apex to torch
# (always so on CPU machines; on a GPU the trainer picks its layers and optimizer itself, README
# "GPU paths"), and torch's deprecation of the collectives megatron-core 0.16 calls.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning,
)
