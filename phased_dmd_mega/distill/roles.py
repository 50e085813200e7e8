"""The roles of a Phased DMD run, as velocity functions of (x_t, t, condition).

Every DiT of the project is called as ``model(latents, 1000 * t, context, **extras)`` and returns
the flow ``psi ~ eps - x0``. A role wraps one model (or a pair of experts split at a noise
boundary, Wan2.2-A14B) behind ``velocity(x_t, t, condition)`` with ``t`` in [0, 1], shape [B].
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from phased_dmd_mega.condition import Condition
from phased_dmd_mega.schedule import expert_for_t


def call_dit(model: Callable, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
    """One DiT evaluation on the 0..1000 timestep scale, the image condition given as the Wan
    pipelines give it: extra channels concatenated after the noisy latents (I2V), or the first
    latent frame replaced by the image's, its tokens at timestep 0 (TI2V)."""
    latents = condition.pin_first_frame(x_t)
    extra = condition.concat_latents
    if extra is not None:
        latents = torch.cat([latents, extra.to(x_t.device, x_t.dtype)], dim=1)
    kwargs = dict(condition.model_kwargs)
    if condition.context_mask is not None:
        kwargs["context_mask"] = condition.context_mask
    timestep = 1000.0 * t
    if condition.first_frame is not None:
        timestep = condition.token_timesteps(timestep, x_t.shape, model.dims.token_patch)
    out = model(latents, timestep, condition.context, **kwargs)
    return out.to(x_t.dtype)


class Experts(nn.Module):
    """One velocity model, or a high-noise and a low-noise expert split at ``boundary``
    (t >= boundary goes to the high-noise expert). Samples of one batch may go to different
    experts: each expert runs on its own samples."""

    def __init__(self, high: nn.Module, low: Optional[nn.Module] = None, boundary: Optional[float] = None):
        super().__init__()
        if (low is None) != (boundary is None):
            raise ValueError("two experts need a boundary, and a boundary needs two experts")
        self.high, self.low, self.boundary = high, low, boundary

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        if self.low is None:
            return call_dit(self.high, x_t, t, condition)
        high = expert_for_t(t, self.boundary)
        if bool(high.all()):
            return call_dit(self.high, x_t, t, condition)
        if not bool(high.any()):
            return call_dit(self.low, x_t, t, condition)
        out = torch.empty_like(x_t)
        for model, mask in ((self.high, high), (self.low, ~high)):
            index = mask.nonzero().squeeze(1)
            out[index] = call_dit(model, x_t[index], t[index], condition.select(index))
        return out


CFG_NORMS = ("none", "layer_norm", "scalar")


def normalize_guidance(guided: torch.Tensor, conditional: torch.Tensor, mode: str) -> torch.Tensor:
    """The official recipes' ``cfg_norm`` of a guided velocity (docs/official_recipes.md 3.4):
    ``layer_norm`` rescales every row along the last axis (the latent width) to the conditional
    velocity's norm there, up or down; ``scalar`` scales the whole tensor down (never up) to the
    conditional's norm. Norms in float32; no value is read to the host."""
    if mode == "none":
        return guided
    g, c = guided.float(), conditional.float()
    if mode == "layer_norm":
        factor = c.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    elif mode == "scalar":
        factor = (c.norm() / g.norm().clamp_min(1e-12)).clamp(max=1.0)
    else:
        raise ValueError(f"cfg_norm {mode!r} is not one of {', '.join(CFG_NORMS)}")
    return (g * factor).to(guided.dtype)


class GuidedTeacher(nn.Module):
    """The frozen teacher with classifier-free guidance:
    psi = psi(x, t, null) + g * (psi(x, t, c) - psi(x, t, null)), with its own scale per expert,
    then ``cfg_norm`` (``normalize_guidance``; "none" by default)."""

    def __init__(
        self,
        experts: Experts,
        guidance_scale: float,
        guidance_scale_low_noise: Optional[float] = None,
        cfg_norm: str = "none",
    ):
        super().__init__()
        self.experts = experts
        self.guidance_scale = guidance_scale
        self.guidance_scale_low_noise = guidance_scale if guidance_scale_low_noise is None else guidance_scale_low_noise
        self.cfg_norm = cfg_norm

    def scales(self, t: torch.Tensor) -> torch.Tensor:
        if self.experts.boundary is None:
            return torch.full_like(t, self.guidance_scale)
        high = expert_for_t(t, self.experts.boundary)
        return torch.where(
            high, torch.full_like(t, self.guidance_scale), torch.full_like(t, self.guidance_scale_low_noise)
        )

    def _unguided(self, t: torch.Tensor) -> bool:
        """Every sample's scale is 1 (no unconditional branch): told by the settings when the
        experts share a scale, without reading ``t`` back from the device."""
        if self.experts.boundary is None or self.guidance_scale == self.guidance_scale_low_noise:
            return self.guidance_scale == 1
        return bool((self.scales(t) == 1).all())

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition, negative: Condition) -> torch.Tensor:
        if self._unguided(t):
            return self.experts(x_t, t, condition)
        scale = self.scales(t).reshape(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
        both = self.experts(torch.cat([x_t, x_t]), torch.cat([t, t]), Condition.cat(condition, negative))
        conditional, unconditional = both.chunk(2)
        return normalize_guidance(unconditional + scale * (conditional - unconditional), conditional, self.cfg_norm)
