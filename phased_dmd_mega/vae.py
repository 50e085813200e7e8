"""diffusers' VAEs as the pipelines use them: where a VAE's folder is (the folder itself or a
pipeline root's ``vae/``), and the per-channel latent normalisation both ways (encoding first
frames normalises, decoding samples denormalises), and the Wan VAEs' compressions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from phased_dmd_mega.files import component_folder

SUBFOLDER = "vae"


@dataclass(frozen=True)
class WanVAE:
    """One of the Wan VAEs (AutoencoderKLWan configs): its compression, and how the pipelines made
    for it condition on a first-frame image."""

    name: str
    temporal: int  # scale_factor_temporal
    spatial: int  # scale_factor_spatial
    # "channels": mask + first-frame latents concatenated to the noisy latents (WanImageToVideoPipeline,
    # expand_timesteps off: Wan2.2-I2V-A14B); "first_frame": the first latent frame replaced by the
    # image's latents, its tokens at timestep 0 (expand_timesteps on: Wan2.2-TI2V-5B)
    image_condition: str


# Told apart by their latent channels (config z_dim, the DiT's out_channels).
WAN_VAES = {
    16: WanVAE("the Wan2.1 VAE", temporal=4, spatial=8, image_condition="channels"),
    48: WanVAE("the Wan2.2 VAE", temporal=4, spatial=16, image_condition="first_frame"),
}


def wan_vae(latent_channels: int) -> WanVAE:
    """The Wan VAE of ``latent_channels``; other counts (the tests' tiny models) compress as Wan2.1's."""
    return WAN_VAES.get(int(latent_channels), WAN_VAES[16])


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
