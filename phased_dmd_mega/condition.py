"""What a DiT is conditioned on: prompt embeddings, their mask, the I2V first frame (extra input
channels, or TI2V's clean first latent frame) and model keywords, batched like the latents. The
data layer makes conditions; the roles and the sampler consume them.

The two image conditions of the Wan pipelines: Wan2.2-I2V-A14B concatenates a mask and the
first-frame latents to the noisy latents (``concat_latents``, WanImageToVideoPipeline with
``expand_timesteps`` off); Wan2.2-TI2V-5B (``expand_timesteps`` on) replaces the first latent
frame by the image's latents (``first_frame``) and gives its tokens timestep 0, the others the
step's: that frame is given, never generated, so rollouts keep it and the losses leave it out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import torch


@dataclass
class Condition:
    """What a DiT is conditioned on, batched like the latents."""

    context: torch.Tensor  # prompt embeddings [B, L, D]
    context_mask: Optional[torch.Tensor] = None  # [B, L], Qwen-Image
    concat_latents: Optional[torch.Tensor] = None  # extra input channels (Wan2.2 I2V: 20 more)
    model_kwargs: Dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. image embeddings
    first_frame: Optional[torch.Tensor] = None  # TI2V: the image's latents [B, C, 1, h, w], the clean first frame

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    def select(self, index: torch.Tensor) -> "Condition":
        """The samples at ``index`` (expert routing splits a batch)."""
        pick = lambda x: None if x is None else x.index_select(0, index)  # noqa: E731
        return Condition(
            pick(self.context),
            pick(self.context_mask),
            pick(self.concat_latents),
            {k: v.index_select(0, index) for k, v in self.model_kwargs.items()},
            pick(self.first_frame),
        )

    def to(self, device: torch.device) -> "Condition":
        """The same condition on ``device`` (caches are read on the CPU)."""
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return Condition(
            move(self.context),
            move(self.context_mask),
            move(self.concat_latents),
            {k: v.to(device) for k, v in self.model_kwargs.items()},
            move(self.first_frame),
        )

    def with_context(self, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None) -> "Condition":
        """The same condition with other prompt embeddings (the negative prompt for CFG)."""
        return replace(
            self, context=context, context_mask=context_mask if context_mask is not None else self.context_mask
        )

    @staticmethod
    def cat(first: "Condition", second: "Condition") -> "Condition":
        """Both conditions in one batch (conditional and unconditional CFG branches in one call)."""
        join = lambda a, b: None if a is None else torch.cat([a, b], 0)  # noqa: E731
        kwargs = {k: torch.cat([v, second.model_kwargs[k]], 0) for k, v in first.model_kwargs.items()}
        return Condition(
            join(first.context, second.context),
            join(first.context_mask, second.context_mask),
            join(first.concat_latents, second.concat_latents),
            kwargs,
            join(first.first_frame, second.first_frame),
        )

    # ------------------------------------------------------------------ TI2V: the given first frame

    @property
    def given_frames(self) -> int:
        """Leading latent frames that are given, not generated (TI2V: the image's one)."""
        return 0 if self.first_frame is None else self.first_frame.shape[2]

    def pin_first_frame(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents`` [B, C, F, h, w] with their given frames replaced by the image's latents (the
        pipeline's ``(1 - mask) * condition + mask * latents``); the others keep their gradient."""
        if self.first_frame is None:
            return latents
        given = self.first_frame.to(latents.device, latents.dtype)
        if given.shape[1:2] + given.shape[3:] != latents.shape[1:2] + latents.shape[3:]:
            raise ValueError(
                f"first-frame latents of shape {tuple(given.shape[1:])} do not fit latents {tuple(latents.shape[1:])}"
            )
        return torch.cat([given, latents[:, :, given.shape[2] :]], dim=2)

    def token_timesteps(self, timestep: torch.Tensor, latent_shape, token_patch) -> torch.Tensor:
        """The DiT's per-token timestep [B, L] (tokens in (f, h, w) order) of ``timestep`` [B]:
        0 on the given frame's tokens (the pipeline's ``mask[:, ::2, ::2] * t``)."""
        frames, height, width = (size // patch for size, patch in zip(latent_shape[2:], token_patch))
        generated = torch.ones(frames, height * width, dtype=timestep.dtype, device=timestep.device)
        generated[: self.given_frames // token_patch[0]] = 0
        return timestep[:, None] * generated.flatten()[None]
