"""Rectified-flow conversions (arXiv 2510.27684's flow prediction, Eq. 5, and its subintervals,
Eq. 12): alpha_t = 1 - t, sigma_t = t, and a network that predicts the flow psi(x_t, t) ~ eps - x_0.

Time arguments are floats or tensors broadcastable against the data: a [B] tensor is reshaped
to [B, 1, ..., 1]. Everything here is differentiable and elementwise.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Time = Union[float, torch.Tensor]


def per_sample(time: Time, like: torch.Tensor) -> Time:
    """A [B] time tensor as [B, 1, ..., 1] so it broadcasts over each sample; floats pass."""
    if isinstance(time, torch.Tensor) and time.dim() == 1 and like.dim() > 1:
        return time.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))
    return time


def x0_from_flow(x_t: torch.Tensor, flow: torch.Tensor, t: Time) -> torch.Tensor:
    """x0_hat = x_t - sigma_t * psi: the Euler step from t straight to 0."""
    return x_t - per_sample(t, x_t) * flow


def eps_from_flow(x_t: torch.Tensor, flow: torch.Tensor, t: Time) -> torch.Tensor:
    """eps_hat = x_t + alpha_t * psi (so that x_t = alpha_t x0_hat + sigma_t eps_hat)."""
    return x_t + (1 - per_sample(t, x_t)) * flow


def score_from_flow(x_t: torch.Tensor, flow: torch.Tensor, t: Time) -> torch.Tensor:
    """grad log p_t(x_t) = -(alpha_t psi + x_t) / (sigma_t (alpha_t + sigma_t)); here
    alpha_t + sigma_t = 1."""
    t = per_sample(t, x_t)
    return -((1 - t) * flow + x_t) / t


def subinterval_coefficients(s: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``(alpha_{t|s}, sigma_{t|s}, sigma_{t|s}^2, c_eps, 1/alpha_s)`` for times s < t (tensors,
    elementwise; the paper's Eq. 12 and its derivation, Eq. 19-23), in the times' dtype (callers pass float64):
    x_t = alpha_{t|s} x_s + sigma_{t|s} eps, and the flow target is c_eps eps - x_s / alpha_s."""
    alpha_s, alpha_t = 1.0 - s, 1.0 - t
    sigma_s, sigma_t = s, t
    alpha_ts = alpha_t / alpha_s
    sigma_ts_sq = sigma_t**2 - alpha_ts**2 * sigma_s**2
    sigma_ts = sigma_ts_sq.sqrt()
    c_eps = (alpha_s**2 * sigma_t + alpha_t * sigma_s**2) / (alpha_s**2 * sigma_ts)
    return alpha_ts, sigma_ts, sigma_ts_sq, c_eps, 1.0 / alpha_s


def subinterval_tweedie(x_t: torch.Tensor, flow: torch.Tensor, s: Time, t: Time) -> torch.Tensor:
    """E[x_s | x_t] under the model: (x_t + sigma_{t|s}^2 score(x_t)) / alpha_{t|s} (the
    paper's Eq. 12). With s = 0 this is x0_hat."""
    s64, t64 = (torch.as_tensor(per_sample(v, x_t), dtype=torch.float64, device=x_t.device) for v in (s, t))
    alpha_ts, _, sigma_ts_sq, _, _ = subinterval_coefficients(s64, t64)
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    return (x_t + sigma_ts_sq.to(dtype) * score_from_flow(x_t, flow, t)) / alpha_ts.to(dtype)


def euler_step(x_t: torch.Tensor, flow: torch.Tensor, t: Time, t_next: Time) -> torch.Tensor:
    """Deterministic ODE step from t to t_next (the official Phased DMD step rule)."""
    return x_t + (per_sample(t_next, x_t) - per_sample(t, x_t)) * flow


def renoise_step(x_t: torch.Tensor, flow: torch.Tensor, t: Time, t_next: Time, noise: torch.Tensor) -> torch.Tensor:
    """Stochastic step (DMD2 / Self-Forcing): predict x0, then fresh noise to level t_next."""
    t_next = per_sample(t_next, x_t)
    return (1 - t_next) * x0_from_flow(x_t, flow, t) + t_next * noise


def host_to_device(draw: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """A tensor drawn on the CPU (the trainer's keyed CPU generators: the same numbers on every
    rank and device), on ``device``, with the same values. To a GPU it goes through pinned
    memory without blocking: a copy from pageable memory would make the host wait for the GPU
    at every draw. The copy is queued on the current stream, before the kernels that read it."""
    device = torch.device(device)
    if draw.device.type == "cpu" and device.type == "cuda":
        return draw.pin_memory().to(device, non_blocking=True)
    return draw.to(device)


def seeded_normal(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """N(0, 1) noise shaped like ``like``, drawn where ``generator`` lives (the trainer's are CPU
    generators, the same numbers on every rank and device) and then moved to ``like``'s device."""
    device = generator.device if generator is not None else like.device
    return host_to_device(torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype), like.device)
