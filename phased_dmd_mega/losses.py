"""The losses of Phased DMD (arXiv 2510.27684: Eq. 12-13 and Eq. 11), on rectified flow (alpha_t = 1 - t, sigma_t = t).

* ``subinterval_noise`` / ``subinterval_target``: re-noise an anchor ``x_s`` to time ``t`` and the
  fake model's velocity target within the subinterval (plain torch).
* ``subinterval_flow_loss``: the fake model's per-sample loss.
* ``dmd_loss``: the generator's DMD loss, optionally over a sequence-parallel group.

The two losses have a plain torch path and a fused Triton path (``phased_dmd_mega.kernels``).
Which one runs: ``set_backend`` / ``use_backend`` if set, else the environment variable
``PHASED_DMD_LOSS_BACKEND``, else ``"auto"``: Triton for CUDA tensors (and for CPU tensors
when the kernels run in Triton's interpreter, ``TRITON_INTERPRET=1``), torch otherwise. Under
``"auto"``, float64 inputs use the torch path, since the kernels compute in fp32.

All time arguments are ``[B]`` tensors (python floats and 0-d tensors are broadcast) with
``0 <= s < t <= 1``; data tensors are ``[B, ...]``. The times are not checked (that would
synchronise with the GPU).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist

from phased_dmd_mega import parallel
from phased_dmd_mega.flow import subinterval_coefficients

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "PHASED_DMD_LOSS_BACKEND"
_FP32_MAX = float(torch.finfo(torch.float32).max)

_backend: Optional[str] = None  # None: follow the environment variable

Time = Union[torch.Tensor, float]


# ----------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown loss backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force ``"torch"`` or ``"triton"``, or ``"auto"``; None goes back to the environment."""
    global _backend
    _backend = None if name is None else _check_backend(name)


def get_backend() -> str:
    """The configured backend name (not yet resolved against a tensor)."""
    if _backend is not None:
        return _backend
    return _check_backend(os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with ``name`` as the backend, then restore the previous setting."""
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def _triton_can_run_on(device: torch.device) -> bool:
    try:
        from phased_dmd_mega.kernels import is_interpreted
    except ImportError:  # triton missing: the torch path still works
        return False
    return device.type == "cuda" or is_interpreted()


def resolve_backend(tensor: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"``: the path that the losses take for this tensor."""
    name = get_backend()
    if name == "auto":
        if tensor.dtype == torch.float64:
            return "torch"
        return "triton" if _triton_can_run_on(tensor.device) else "torch"
    return name


# ----------------------------------------------------------------------------------------
# Subinterval coefficients (the paper's Eq. 12, derived in its Eq. 19-23)
# ----------------------------------------------------------------------------------------


def _as_times(value: Time, batch: int, device: torch.device) -> torch.Tensor:
    """``[B]`` float64 times; coefficients are computed in float64 since they are only ``[B]``."""
    times = torch.as_tensor(value, device=device).detach().to(torch.float64)
    if times.dim() == 0:
        times = times.expand(batch)
    if times.shape != (batch,):
        raise ValueError(f"times must have shape [{batch}], got {tuple(times.shape)}")
    return times


def _per_sample(coefficient: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` so it broadcasts over one sample's elements."""
    return coefficient.to(dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs (fp32 accumulation), float64 stays float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def subinterval_weight(s: Time, t: Time, weight_clamp: Optional[float] = None) -> torch.Tensor:
    """The loss weight ``w = min(1, C * sigma_{t|s}^2)`` in float64; ``C = None`` gives ``w = 1``."""
    s64 = torch.as_tensor(s, dtype=torch.float64)
    t64 = torch.as_tensor(t, dtype=torch.float64, device=s64.device)
    sigma_ts_sq = subinterval_coefficients(s64, t64)[2]
    if weight_clamp is None:
        return torch.ones_like(sigma_ts_sq)
    return torch.clamp(float(weight_clamp) * sigma_ts_sq, max=1.0)


def subinterval_noise(x_s: torch.Tensor, eps: torch.Tensor, s: Time, t: Time) -> torch.Tensor:
    """``x_t = alpha_{t|s} x_s + sigma_{t|s} eps``: the forward process from time s to time t."""
    batch, device = x_s.shape[0], x_s.device
    alpha_ts, sigma_ts, *_ = subinterval_coefficients(_as_times(s, batch, device), _as_times(t, batch, device))
    dtype = _compute_dtype(x_s, eps)
    x_t = _per_sample(alpha_ts, x_s, dtype) * x_s.to(dtype) + _per_sample(sigma_ts, eps, dtype) * eps.to(dtype)
    return x_t.to(torch.promote_types(x_s.dtype, eps.dtype))


def subinterval_target(x_s: torch.Tensor, eps: torch.Tensor, s: Time, t: Time) -> torch.Tensor:
    """``psi* = c_eps * eps - x_s / alpha_s``, the velocity target given the anchor ``x_s``.

    With ``s = 0`` this is the flow-matching target ``eps - x0``.
    """
    batch, device = x_s.shape[0], x_s.device
    *_, c_eps, inv_alpha_s = subinterval_coefficients(_as_times(s, batch, device), _as_times(t, batch, device))
    dtype = _compute_dtype(x_s, eps)
    target = _per_sample(c_eps, eps, dtype) * eps.to(dtype) - x_s.to(dtype) * _per_sample(inv_alpha_s, x_s, dtype)
    return target.to(torch.promote_types(x_s.dtype, eps.dtype))


# ----------------------------------------------------------------------------------------
# Subinterval flow loss (fake model)
# ----------------------------------------------------------------------------------------


def subinterval_flow_loss(
    v_pred: torch.Tensor,
    x_s: torch.Tensor,
    eps: torch.Tensor,
    s: Time,
    t: Time,
    weight_clamp: Optional[float] = None,
) -> torch.Tensor:
    """Per-sample ``mean(w * (v_pred - psi*)**2)`` ``[B]``, differentiable w.r.t. ``v_pred`` only.

    ``w = min(1, C * sigma_{t|s}^2)`` with ``C = weight_clamp`` (None: ``w = 1``). The result is
    fp32 for fp32/bf16/fp16 inputs (fp32 accumulation) and float64 on the torch path for float64.
    """
    if not (v_pred.shape == x_s.shape == eps.shape):
        raise ValueError(f"shape mismatch: {v_pred.shape}, {x_s.shape}, {eps.shape}")
    if resolve_backend(v_pred) == "triton":
        from phased_dmd_mega.kernels import subinterval_flow_loss_triton

        return subinterval_flow_loss_triton(v_pred, x_s, eps, s, t, weight_clamp)
    batch, device = v_pred.shape[0], v_pred.device
    s64, t64 = _as_times(s, batch, device), _as_times(t, batch, device)
    weight = subinterval_weight(s64, t64, weight_clamp)
    return _subinterval_flow_loss_torch(v_pred, x_s.detach(), eps.detach(), s64, t64, weight)


def _subinterval_flow_loss_torch(v_pred, x_s, eps, s64, t64, weight) -> torch.Tensor:
    dtype = _compute_dtype(v_pred, x_s, eps)
    target = subinterval_target(x_s.to(dtype), eps.to(dtype), s64, t64)
    squared = (v_pred.to(dtype) - target).square()
    per_sample = squared.reshape(squared.shape[0], -1).mean(dim=1)
    return per_sample * weight.to(dtype)


# ----------------------------------------------------------------------------------------
# DMD loss (generator)
# ----------------------------------------------------------------------------------------


def dmd_loss(
    x0_student: torch.Tensor,
    x0_fake: torch.Tensor,
    x0_teacher: torch.Tensor,
    norm_min: float = 1e-4,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """The DMD loss, a scalar: ``0.5 * mean(direction**2)``, gradient ``direction / numel``.

    ``direction = nan_to_num((x0_fake - x0_teacher) / n_b)`` with the per-sample normaliser
    ``n_b = max(mean_b |x0_student - x0_teacher|, norm_min)``; the gradient reaches
    ``x0_student`` only (normaliser and direction are constants). With ``group``, the ranks of
    the group hold shards of the same samples along non-batch dims: means are over whole
    samples, the value is the unsplit loss on every rank, and each rank's gradient is its slice
    of the unsplit gradient.
    """
    if not (x0_student.shape == x0_fake.shape == x0_teacher.shape):
        raise ValueError(f"shape mismatch: {x0_student.shape}, {x0_fake.shape}, {x0_teacher.shape}")
    if resolve_backend(x0_student) == "triton":
        from phased_dmd_mega.kernels import dmd_loss_triton

        return dmd_loss_triton(x0_student, x0_fake, x0_teacher, norm_min, group)
    return _dmd_loss_torch(x0_student, x0_fake.detach(), x0_teacher.detach(), norm_min, group)


def _dmd_loss_torch(x0_student, x0_fake, x0_teacher, norm_min, group) -> torch.Tensor:
    dtype = _compute_dtype(x0_student, x0_fake, x0_teacher)
    batch = x0_student.shape[0]
    student = x0_student.detach().to(dtype)
    teacher = x0_teacher.to(dtype)
    fake = x0_fake.to(dtype)

    # Normaliser over whole samples: all-reduce |.| sums and element counts together.
    abs_sums = (student - teacher).abs().reshape(batch, -1).sum(dim=1, dtype=torch.float64)
    local_count = abs_sums.new_full((1,), float(student[0].numel() if student.dim() > 1 else 1))
    stats = parallel.all_reduce(torch.cat([abs_sums, local_count]), group)
    count = stats[batch:]
    norm = torch.clamp(stats[:batch] / count, min=norm_min)

    direction = (fake - teacher) / _per_sample(norm, fake, dtype)
    direction = torch.nan_to_num(direction, nan=0.0, posinf=_FP32_MAX, neginf=-_FP32_MAX)

    square_sum = parallel.all_reduce(direction.square().sum(dtype=torch.float64).reshape(1), group)
    numel = count * batch
    value = (0.5 * square_sum / numel).to(dtype).reshape(())
    return _DirectionGradient.apply(x0_student, value, direction, numel)


class _DirectionGradient(torch.autograd.Function):
    """Returns the loss value; backward hands ``x0_student`` the DMD gradient ``direction / numel``.

    This is ``0.5*mean((x - sg(x - d))**2)`` without its rounding (``x - (x - d)`` is not ``d``
    in floating point) and without NaNs from non-finite ``x``.
    """

    @staticmethod
    def forward(ctx, x0_student, value, direction, numel):
        ctx.save_for_backward(direction, numel)
        ctx.student_dtype = x0_student.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        direction, numel = ctx.saved_tensors
        scale = (grad_output.to(torch.float64) / numel).to(direction.dtype)
        return (direction * scale).to(ctx.student_dtype), None, None, None
