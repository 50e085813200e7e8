"""diffusers' VAEs as the pipelines use them: where a VAE's folder is (the folder itself or a
pipeline root's ``vae/``), and the per-channel latent normalisation both ways (encoding first
frames normalises, decoding samples denormalises)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch

from phased_dmd_mega.files import component_folder

SUBFOLDER = "vae"


def find_vae_folder(path) -> Optional[Path]:
    """The VAE's folder: a pipeline root's ``vae/``, or ``path`` itself; None when neither holds a
    config.json."""
    return component_folder(path, SUBFOLDER)


def latent_statistics(config, dtype: torch.dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) per latent channel, shaped [1, C, 1, 1, 1], as the pipelines compute them."""
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(device, dtype)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(device, dtype)
    return mean, inverse_std


def normalize(config, latents: torch.Tensor) -> torch.Tensor:
    """Encoded latents as the DiT sees them: ``(x - mean) * (1 / std)`` (prepare_latents)."""
    mean, inverse_std = latent_statistics(config, latents.dtype, latents.device)
    return (latents - mean) * inverse_std


def denormalize(config, latents: torch.Tensor) -> torch.Tensor:
    """The DiT's latents as the VAE decodes them: ``latents / (1 / std) + mean``, in the
    latents' dtype and in the pipelines' order of operations."""
    mean, inverse_std = latent_statistics(config, latents.dtype, latents.device)
    return latents / inverse_std + mean
