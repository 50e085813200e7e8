"""Embeddings both DiTs share: the sinusoidal timestep embedding and its MLP, and rotary
position embeddings over a (frames, height, width) token grid."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """[cos, sin] of ``scale * (timesteps * 10000^(-i/half))``, computed in fp32 as diffusers
    does (its ``Timesteps(scale=...)`` multiplies after the product, kept in that order)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[..., None] * torch.exp(exponent)
    if scale != 1.0:
        args = scale * args
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """sinusoid -> Linear -> SiLU -> Linear (diffusers' TimestepEmbedding)."""

    def __init__(self, freq_dim: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim, dtype=dtype)
        self.linear_2 = nn.Linear(dim, dim, dtype=dtype)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(sinusoid.to(self.linear_1.weight.dtype))))


class PatchEmbedding(nn.Conv3d):
    """A patch embedding whose stride is its kernel (Wan's Conv3d: diffusers' layout and keys),
    applied as the linear map it is to tokens of flattened patches [..., C * prod(patch)]: to
    this rank's tokens only, and seen by the FLOP counter as the linear layer it is."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches, self.weight.flatten(1), self.bias)


def grid_positions(index: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
    """Integer (f, h, w) positions [S, 3] of flat token indices in (f, h, w) order; indices
    past the grid (sharding padding) get position 0."""
    f, h, w = grid
    index = torch.where(index < f * h * w, index, torch.zeros_like(index))
    return torch.stack([index // (h * w), (index // w) % h, index % w], dim=-1)


def rope_frequencies(positions: torch.Tensor, axis_dims: Tuple[int, ...], theta: float) -> torch.Tensor:
    """Rotation angles [S, sum(axis_dims)/2] (float64) for integer positions [S, n_axes]: each
    axis of size n rotates pairs with frequencies theta^(-arange(0, n, 2)/n)."""
    angles = []
    for axis, n in enumerate(axis_dims):
        freqs = 1.0 / theta ** (torch.arange(0, n, 2, dtype=torch.float64, device=positions.device) / n)
        angles.append(positions[:, axis].to(torch.float64)[:, None] * freqs[None, :])
    return torch.cat(angles, dim=-1)


def apply_rope_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [S, B, H, D] by angles [S, D/2]."""
    cos = torch.cos(angles).float()[:, None, None, :]
    sin = torch.sin(angles).float()[:, None, None, :]
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
