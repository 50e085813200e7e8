"""Which part of each sample this rank's losses cover (the per-sample
normaliser of the DMD gradient, the paper's Eq. 11, needs whole samples).

Under sequence parallelism (Megatron SP and/or Ulysses) a DiT splits its tokens over a group of
ranks and gathers its output at the end; the gather's backward hands each rank the gradient of
its own tokens only. So each rank computes the losses on exactly those tokens, with the group's
sums making the normalisers and the logged values cover whole samples. Without a token split
the shard is the whole sample and nothing communicates.

A sample's given frames (TI2V's conditioning frame, ``Condition.given_frames``) are no part of
what the losses cover: neither the DMD gradient nor the fake model's flow matching sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from phased_dmd_mega import parallel
from phased_dmd_mega.models.architectures import architecture_of
from phased_dmd_mega.models.token_sharding import latent_tokens


@dataclass(frozen=True)
class LossShard:
    patch: Sequence[int] = (1, 1, 1)
    start: int = 0  # this rank's real tokens (padding and given frames excluded): [start, stop)
    stop: int = 0
    num_tokens: int = 0
    group: Optional[dist.ProcessGroup] = None  # None: the whole sample is here
    given_frames: int = 0  # leading latent frames left out of the losses
    given_tokens: int = 0  # their tokens, the first of the sequence

    @classmethod
    def for_model(cls, model, latent_shape, given_frames: int = 0) -> "LossShard":
        """The shard of ``model``'s token split (a WanModel or QwenImageModel) for latents of
        ``latent_shape`` [B, C, F, H, W], under the current parallel state, without the first
        ``given_frames`` latent frames."""
        whole = cls(given_frames=given_frames)
        if not parallel.is_initialized():
            return whole
        layout = parallel.layout()
        if layout.ulysses_parallel == 1 and not (layout.sequence_parallel and layout.tensor_parallel > 1):
            return whole  # no rank splits tokens
        patch = model.token_patch
        num_tokens = architecture_of(model.dims).dit_tokens(model.dims, tuple(latent_shape[2:]))
        sharding = model.token_sharding(num_tokens)
        if sharding.ulysses * sharding.tp == 1:
            return whole
        given = architecture_of(model.dims).dit_tokens(model.dims, (given_frames, *latent_shape[3:]))
        start = min(max(sharding.local_start, given), num_tokens)
        stop = min(max(sharding.local_start + sharding.local_tokens, given), num_tokens)
        group = parallel.token_split_group(sharding.tp > 1)
        return cls(tuple(patch), start, stop, num_tokens, group, given_frames, given)

    @property
    def is_whole(self) -> bool:
        return self.group is None

    @property
    def fraction(self) -> float:
        """This rank's share of every sample's elements."""
        return 1.0 if self.is_whole else (self.stop - self.start) / self.loss_tokens

    @property
    def loss_tokens(self) -> int:
        """The tokens of a sample the losses cover."""
        return self.num_tokens - self.given_tokens

    def take(self, latents: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a latent-shaped [B, C, F, H, W] tensor, as [B, tokens, features]."""
        if self.is_whole:
            return latents[:, :, self.given_frames :] if self.given_frames else latents
        return latent_tokens(latents, self.patch)[:, self.start : self.stop]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """A detached per-shard partial summed over the group (for logging)."""
        value = value.detach().clone()
        return parallel.all_reduce(value, self.group)

    def mean(self, local: torch.Tensor) -> torch.Tensor:
        """The whole-batch mean of a quantity of which this rank holds ``take``'s elements."""
        per_sample = local.numel() // max(local.shape[0], 1) if self.is_whole else self.loss_tokens * local.shape[-1]
        return self.sum(local.detach().sum(dtype=torch.float64) / (local.shape[0] * per_sample)).float()
