"""What a DiT is conditioned on: prompt embeddings, their mask, extra input channels (the I2V
first frame) and model keywords, batched like the latents. The data layer makes conditions; the
roles and the sampler consume them."""

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
        )

    def to(self, device: torch.device) -> "Condition":
        """The same condition on ``device`` (caches are read on the CPU)."""
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return Condition(
            move(self.context),
            move(self.context_mask),
            move(self.concat_latents),
            {k: v.to(device) for k, v in self.model_kwargs.items()},
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
        )
