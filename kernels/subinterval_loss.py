"""Fused Triton kernel for the subinterval score-matching loss (arXiv
2510.27684's Eq. 12-13).

One pass over ``v_pred``, ``x_s`` and ``eps`` computes, per element,
``diff = v_pred - psi* = v_pred - (c_eps[b] * eps - x_s / alpha_s[b])`` in fp32, and writes

* per-block sums of ``w_b / N * diff**2`` into a ``[B, n_blocks]`` buffer (summed afterwards in
  torch, so the result is deterministic), and
* ``d loss_b / d v_pred = 2 w_b / N * diff`` (saved for backward, where it is multiplied by
  ``grad_output[b]``).

Neither the target nor ``x_t`` is ever written to memory. The per-sample coefficients
(``c_eps``, ``1/alpha_s`` and the weight ``w_b``) are computed in-kernel, in fp32, from the
``[B]`` times: no separate small torch ops, whose launches would cost more than the pass.

This module also holds the helpers shared with ``dmd.py``: the per-sample row view of a batch
and a kernel that scales every sample by its own factor.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Large blocks keep the grid small: that matters little on a GPU but a lot in the
# interpreter, where every program runs as Python. Read at launch time, so a benchmark may
# change it. Each thread handles ELEMENTS_PER_THREAD elements (16-byte vector loads and more).
DEFAULT_BLOCK = 4096
ELEMENTS_PER_THREAD = 16


# ----------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------


def is_interpreted() -> bool:
    """True when these kernels were decorated under ``TRITON_INTERPRET=1`` (CPU tensors work)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_scale_rows_kernel, InterpretedFunction)


def check_device(*tensors: torch.Tensor) -> None:
    """Refuse tensors the kernels cannot read: CPU tensors outside the interpreter, or mixed devices."""
    device = tensors[0].device
    for tensor in tensors:
        if tensor.device != device:
            raise ValueError(f"tensors on different devices: {device} and {tensor.device}")
    if device.type != "cuda" and not is_interpreted():
        raise RuntimeError(
            "the Triton loss kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "phased_dmd_mega.kernels is first imported (CPU interpreter)"
        )


def sample_rows(x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """View ``x`` ([B, ...]) as B rows of contiguous elements without copying when possible.

    Returns ``(tensor, batch_stride, elements_per_sample)``. The kernels index sample ``b``,
    element ``i`` at ``b * batch_stride + i``, so each sample's own elements must be contiguous
    (a batch slice such as ``x[::2]`` is fine); anything else is copied once.
    """
    if x.dim() == 0:
        raise ValueError("expected a batch tensor [B, ...], got a 0-d tensor")
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.shape[0] > 0 and not x[0].is_contiguous():
        x = x.contiguous()
    per_sample = x[0].numel() if x.shape[0] > 0 else 0
    batch_stride = x.stride(0) if x.shape[0] > 1 else per_sample
    return x, batch_stride, per_sample


def launch_config(per_sample: int, block: Optional[int]) -> Tuple[int, int, int]:
    """``(block, blocks per sample, num_warps)``: a power-of-two block no larger than needed."""
    block = triton.next_power_of_2(block or DEFAULT_BLOCK)
    block = min(block, max(triton.next_power_of_2(per_sample), 16))
    num_warps = min(16, max(1, block // (32 * ELEMENTS_PER_THREAD)))
    return block, triton.cdiv(per_sample, block), num_warps


def device_guard(x: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current device)."""
    if x.is_cuda:
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def software_bf16_rounding() -> bool:
    """Round fp32 -> bf16 in software? Only in the interpreter, whose cast truncates
    (GPUs round to nearest even in hardware, which the software path reproduces)."""
    return is_interpreted()


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def sample_block(per_sample, blocks_per_sample, BLOCK: tl.constexpr):
    """The 1-D grid runs over (sample, block) pairs, so one sample has no 65535-block limit.
    Returns this program's id, its sample, the sample as int64 (batch offsets can exceed 2**31
    elements), the element offsets of its block and their in-bounds mask."""
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    offsets = (pid % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    return pid, sample, sample.to(tl.int64), offsets, offsets < per_sample


@triton.jit
def cast_for_store(x, dtype: tl.constexpr, SOFTWARE_BF16: tl.constexpr):
    """fp32 ``x`` as ``dtype``, rounding to nearest even also where the cast itself would not."""
    if SOFTWARE_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # Round half to even: add just under half an ulp, plus one when the kept part is odd.
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _subinterval_loss_kernel(
    v_ptr,
    xs_ptr,
    eps_ptr,
    s_ptr,
    t_ptr,
    grad_ptr,
    partial_ptr,
    per_sample,
    v_batch_stride,
    xs_batch_stride,
    eps_batch_stride,
    blocks_per_sample,
    inv_per_sample,
    weight_clamp,
    HAS_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    pid, sample, row, offsets, mask = sample_block(per_sample, blocks_per_sample, BLOCK)

    # Per-sample coefficients (scalar fp32 maths, IEEE-rounded). The spec's
    # sigma_{t|s}^2 = t^2 - (alpha_t s / alpha_s)^2 is evaluated as
    # (t - s)(t alpha_s + s alpha_t) / alpha_s^2, the same value without cancellation.
    s = tl.load(s_ptr + sample).to(tl.float32)
    t = tl.load(t_ptr + sample).to(tl.float32)
    alpha_s = 1.0 - s
    alpha_t = 1.0 - t
    alpha_s_sq = alpha_s * alpha_s
    sigma_ts_sq = tl.div_rn((t - s) * (t * alpha_s + s * alpha_t), alpha_s_sq)
    c_eps = tl.div_rn(alpha_s_sq * t + alpha_t * s * s, alpha_s_sq * tl.sqrt_rn(sigma_ts_sq))
    inv_alpha_s = tl.div_rn(1.0, alpha_s)
    weight = 1.0
    if HAS_CLAMP:
        weight = tl.minimum(weight_clamp * sigma_ts_sq, 1.0)
    loss_scale = weight * inv_per_sample  # the mean over the sample's elements

    v = tl.load(v_ptr + row * v_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    x_s = tl.load(xs_ptr + row * xs_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + row * eps_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)

    # Masked lanes load zeros everywhere, so their diff is exactly 0.
    diff = v - (c_eps * eps - x_s * inv_alpha_s)
    tl.store(partial_ptr + pid, tl.sum(diff * diff, axis=0) * loss_scale)
    if WRITE_GRAD:
        tl.store(
            grad_ptr + row * per_sample + offsets,
            cast_for_store((2.0 * loss_scale) * diff, grad_ptr.dtype.element_ty, SOFTWARE_BF16),
            mask=mask,
        )


@triton.jit
def _scale_rows_kernel(
    x_ptr,
    scale_ptr,
    out_ptr,
    per_sample,
    x_batch_stride,
    scale_stride,
    blocks_per_sample,
    BLOCK: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    pid, sample, row, offsets, mask = sample_block(per_sample, blocks_per_sample, BLOCK)
    x = tl.load(x_ptr + row * x_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + sample * scale_stride).to(tl.float32)
    tl.store(
        out_ptr + row * per_sample + offsets,
        cast_for_store(x * scale, out_ptr.dtype.element_ty, SOFTWARE_BF16),
        mask=mask,
    )


# ----------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------


def scale_rows(
    x: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: Optional[torch.dtype] = None,
    block: Optional[int] = None,
) -> torch.Tensor:
    """``x[b] * scale[b]`` in fp32, written as ``out_dtype`` (default: ``x.dtype``).

    ``scale`` is ``[B]`` or a single element (then shared by every sample); it stays on the
    device, so no host synchronisation happens.
    """
    check_device(x, scale)
    rows, batch_stride, per_sample = sample_rows(x)
    batch = rows.shape[0]
    scale = scale.reshape(-1)
    if scale.numel() not in (1, batch):
        raise ValueError(f"scale has {scale.numel()} elements for a batch of {batch}")
    scale_stride = 0 if scale.numel() == 1 else scale.stride(0)
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block, blocks, num_warps = launch_config(per_sample, block)
    with device_guard(x):
        _scale_rows_kernel[(batch * blocks,)](
            rows,
            scale,
            out,
            per_sample,
            batch_stride,
            scale_stride,
            blocks,
            BLOCK=block,
            SOFTWARE_BF16=software_bf16_rounding(),
            num_warps=num_warps,
        )
    return out


def per_sample_times(times: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[B]`` contiguous times on ``device`` (no copy when they already are)."""
    times = torch.as_tensor(times, device=device).detach().to(torch.float32)
    if times.dim() == 0:
        times = times.expand(batch)
    if times.shape != (batch,):
        raise ValueError(f"times must have shape [{batch}], got {tuple(times.shape)}")
    return times.contiguous()


def subinterval_loss_partials(
    v_pred: torch.Tensor,
    x_s: torch.Tensor,
    eps: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    weight_clamp: Optional[float] = None,
    write_grad: bool = True,
    block: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the fused pass.

    Returns ``(partials, grad)``: ``partials`` is fp32 ``[B, n_blocks]``, block sums of
    ``w_b / N * (v_pred - psi*)**2`` (``N`` elements per sample), so that a row sum is the
    sample's loss; ``grad`` (shape and dtype of ``v_pred``) is ``2 w_b / N * (v_pred - psi*)``,
    or None without ``write_grad``. ``w_b = min(1, weight_clamp * sigma_{t|s}^2)`` (1 when
    ``weight_clamp`` is None or infinite).
    """
    if not (v_pred.shape == x_s.shape == eps.shape):
        raise ValueError(f"shape mismatch: {v_pred.shape}, {x_s.shape}, {eps.shape}")
    check_device(v_pred, x_s, eps)
    v_rows, v_stride, per_sample = sample_rows(v_pred)
    xs_rows, xs_stride, _ = sample_rows(x_s)
    eps_rows, eps_stride, _ = sample_rows(eps)
    batch = v_rows.shape[0]
    s = per_sample_times(s, batch, v_pred.device)
    t = per_sample_times(t, batch, v_pred.device)
    has_clamp = weight_clamp is not None and math.isfinite(weight_clamp)
    block, blocks, num_warps = launch_config(per_sample, block)
    partials = torch.empty(batch, blocks, dtype=torch.float32, device=v_pred.device)
    # When no gradient is wanted the kernel never stores through grad_ptr; any tensor will do.
    grad = torch.empty(v_pred.shape, dtype=v_pred.dtype, device=v_pred.device) if write_grad else partials
    if batch * per_sample == 0:
        return partials, (grad if write_grad else None)
    with device_guard(v_pred):
        _subinterval_loss_kernel[(batch * blocks,)](
            v_rows,
            xs_rows,
            eps_rows,
            s,
            t,
            grad,
            partials,
            per_sample,
            v_stride,
            xs_stride,
            eps_stride,
            blocks,
            1.0 / per_sample,
            float(weight_clamp) if has_clamp else 0.0,
            HAS_CLAMP=has_clamp,
            BLOCK=block,
            WRITE_GRAD=write_grad,
            SOFTWARE_BF16=software_bf16_rounding(),
            num_warps=num_warps,
        )
    return partials, (grad if write_grad else None)


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------


class SubintervalFlowLossFunction(torch.autograd.Function):
    """Per-sample ``mean_i w_b * (v_pred - psi*)**2`` (fp32 ``[B]``); differentiable in ``v_pred`` only."""

    @staticmethod
    def forward(ctx, v_pred, x_s, eps, s, t, weight_clamp=None, block=None):
        wants_grad = ctx.needs_input_grad[0]
        partials, grad = subinterval_loss_partials(
            v_pred, x_s, eps, s, t, weight_clamp, write_grad=wants_grad, block=block
        )
        if wants_grad:
            ctx.save_for_backward(grad)
        ctx.block = block
        return partials.sum(dim=1)  # fixed order over a few block sums: deterministic

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        grad_v = scale_rows(grad, grad_output, block=ctx.block)
        return grad_v, None, None, None, None, None, None


def subinterval_flow_loss_triton(
    v_pred: torch.Tensor,
    x_s: torch.Tensor,
    eps: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    weight_clamp: Optional[float] = None,
    block: Optional[int] = None,
) -> torch.Tensor:
    """Fused subinterval flow loss, fp32 ``[B]`` (see ``phased_dmd_mega.losses``).

    ``s`` and ``t`` are ``[B]`` times (or scalars); the coefficients are computed in-kernel.
    """
    return SubintervalFlowLossFunction.apply(v_pred, x_s.detach(), eps.detach(), s, t, weight_clamp, block)
