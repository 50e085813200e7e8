"""Fused Triton kernels for the DMD generator loss (the gradient of
arXiv 2510.27684's Eq. 11).

Two passes over the batch, with an optional all-reduce in a sequence-parallel group between
them (a sample split along the sequence must be normalised by its *whole* mean):

1. block sums of ``|x0_student - x0_teacher|`` into a ``[B, n_blocks]`` buffer;
2. with ``norm[b] = max(mean_b |x0_student - x0_teacher|, norm_min)`` (computed in-kernel from
   the reduced sums), the direction ``nan_to_num((x0_fake - x0_teacher) / norm[b])``: the pass
   writes ``direction / numel_global`` (the gradient, saved for backward) and block sums of
   ``0.5 * direction**2 / numel_global``, whose total is the loss.

Backward is a scaled copy: ``(direction / numel_global) * grad_output``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from phased_dmd_mega import parallel
from phased_dmd_mega.kernels.subinterval_loss import (
    cast_for_store,
    check_device,
    device_guard,
    launch_config,
    sample_block,
    sample_rows,
    scale_rows,
    software_bf16_rounding,
)

# nan_to_num's replacement for +-inf: the largest finite fp32, as the spec fixes.
FP32_MAX = float(torch.finfo(torch.float32).max)


@triton.jit
def _abs_diff_partial_kernel(
    a_ptr,
    b_ptr,
    partial_ptr,
    per_sample,
    a_batch_stride,
    b_batch_stride,
    blocks_per_sample,
    BLOCK: tl.constexpr,
):
    pid, sample, row, offsets, mask = sample_block(per_sample, blocks_per_sample, BLOCK)
    a = tl.load(a_ptr + row * a_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * b_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(tl.abs(a - b), axis=0))


@triton.jit
def _dmd_direction_kernel(
    fake_ptr,
    teacher_ptr,
    stats_ptr,
    grad_ptr,
    partial_ptr,
    per_sample,
    fake_batch_stride,
    teacher_batch_stride,
    blocks_per_sample,
    batch,
    norm_min,
    FMAX: tl.constexpr,
    BLOCK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    pid, sample, row, offsets, mask = sample_block(per_sample, blocks_per_sample, BLOCK)

    # stats (float64) = [sum_b |x0_student - x0_teacher| for each sample, elements per sample],
    # both already summed over the ranks that hold pieces of the samples.
    abs_sum = tl.load(stats_ptr + sample)
    count = tl.load(stats_ptr + batch)
    mean_abs = abs_sum / count
    # clamp(min=norm_min) as torch does it: a NaN mean stays NaN (and zeroes the sample below).
    norm = tl.where(mean_abs < norm_min, norm_min, mean_abs).to(tl.float32)
    inv_norm = tl.div_rn(1.0, norm)
    inv_numel = (1.0 / (count * batch)).to(tl.float32)  # over all samples, all ranks

    fake = tl.load(fake_ptr + row * fake_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    teacher = tl.load(teacher_ptr + row * teacher_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    direction = (fake - teacher) * inv_norm
    # torch.nan_to_num: NaN -> 0, +-inf -> +-FMAX.
    direction = tl.where(direction != direction, 0.0, direction)
    direction = tl.where(direction > FMAX, FMAX, direction)
    direction = tl.where(direction < -FMAX, -FMAX, direction)
    direction = tl.where(mask, direction, 0.0)

    tl.store(partial_ptr + pid, tl.sum(direction * direction, axis=0) * (0.5 * inv_numel))
    if WRITE_GRAD:
        tl.store(
            grad_ptr + row * per_sample + offsets,
            cast_for_store(direction * inv_numel, grad_ptr.dtype.element_ty, SOFTWARE_BF16),
            mask=mask,
        )


# ----------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------


def abs_diff_partials(a: torch.Tensor, b: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
    """Pass 1: fp32 ``[B, n_blocks]`` block sums of ``|a - b|`` per sample."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    check_device(a, b)
    a_rows, a_stride, per_sample = sample_rows(a)
    b_rows, b_stride, _ = sample_rows(b)
    batch = a_rows.shape[0]
    block, blocks, num_warps = launch_config(per_sample, block)
    partials = torch.empty(batch, blocks, dtype=torch.float32, device=a.device)
    if batch * per_sample == 0:
        return partials
    with device_guard(a):
        _abs_diff_partial_kernel[(batch * blocks,)](
            a_rows,
            b_rows,
            partials,
            per_sample,
            a_stride,
            b_stride,
            blocks,
            BLOCK=block,
            num_warps=num_warps,
        )
    return partials


def abs_diff_stats(student: torch.Tensor, teacher: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
    """Pass 1 reduced: float64 ``[B + 1]``, per-sample sums of ``|student - teacher|`` then the
    number of elements per sample. Summing it over ranks gives whole-sample statistics."""
    partials = abs_diff_partials(student, teacher, block)
    batch = partials.shape[0]
    stats = partials.new_empty(batch + 1, dtype=torch.float64)
    torch.sum(partials, dim=1, dtype=torch.float64, out=stats[:batch])
    stats[batch] = float(student[0].numel() if student.dim() > 1 else 1)
    return stats


def dmd_direction_partials(
    fake: torch.Tensor,
    teacher: torch.Tensor,
    stats: torch.Tensor,
    norm_min: float,
    grad_dtype: Optional[torch.dtype],
    block: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pass 2: ``(partials, grad)``.

    With ``n_b = max(stats[b] / stats[B], norm_min)`` and ``numel = B * stats[B]``:
    ``direction = nan_to_num((fake - teacher) / n_b)``; ``partials`` (fp32 ``[B, n_blocks]``)
    holds block sums of ``0.5 * direction**2 / numel``, so their total is the loss, and
    ``grad = direction / numel`` (shape of ``fake``, dtype ``grad_dtype``; None when that is
    None) is the loss's gradient w.r.t. the student.
    """
    if fake.shape != teacher.shape:
        raise ValueError(f"shape mismatch: {fake.shape} vs {teacher.shape}")
    check_device(fake, teacher, stats)
    f_rows, f_stride, per_sample = sample_rows(fake)
    t_rows, t_stride, _ = sample_rows(teacher)
    batch = f_rows.shape[0]
    if stats.shape != (batch + 1,) or stats.dtype != torch.float64:
        raise ValueError(f"stats must be float64 [{batch + 1}], got {stats.dtype} {tuple(stats.shape)}")
    block, blocks, num_warps = launch_config(per_sample, block)
    partials = torch.empty(batch, blocks, dtype=torch.float32, device=fake.device)
    write = grad_dtype is not None
    # Without a gradient to keep the kernel never stores through that pointer.
    grad = torch.empty(fake.shape, dtype=grad_dtype, device=fake.device) if write else partials
    if batch * per_sample == 0:
        return partials, (grad if write else None)
    with device_guard(fake):
        _dmd_direction_kernel[(batch * blocks,)](
            f_rows,
            t_rows,
            stats.contiguous(),
            grad,
            partials,
            per_sample,
            f_stride,
            t_stride,
            blocks,
            batch,
            float(norm_min),
            FMAX=FP32_MAX,
            BLOCK=block,
            WRITE_GRAD=write,
            SOFTWARE_BF16=software_bf16_rounding(),
            num_warps=num_warps,
        )
    return partials, (grad if write else None)


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------


class DMDLossFunction(torch.autograd.Function):
    """``0.5 * mean(direction**2)`` whose gradient w.r.t. ``x0_student`` is ``direction / numel``.

    The normaliser is a constant of the backward pass (DMD computes it without gradient), so
    the gradient is the DMD update by design, not the derivative of the returned value.
    """

    @staticmethod
    def forward(ctx, x0_student, x0_fake, x0_teacher, norm_min, group, block=None):
        # Pass 1, then one all-reduce of the |.| sums and element counts over the ranks that
        # hold the same samples (counts are summed, so uneven shards are fine).
        stats = parallel.all_reduce(abs_diff_stats(x0_student, x0_teacher, block), group)

        wants_grad = ctx.needs_input_grad[0]
        partials, grad = dmd_direction_partials(
            x0_fake, x0_teacher, stats, norm_min, x0_student.dtype if wants_grad else None, block
        )
        # The block sums are already divided by the global numel: their total over ranks is the loss.
        loss = parallel.all_reduce(partials.sum().reshape(1), group)
        if wants_grad:
            ctx.save_for_backward(grad)
        ctx.block = block
        return loss.reshape(())

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # grad_output is one number for the whole batch: every sample reads it (stride 0).
        return scale_rows(grad, grad_output, block=ctx.block), None, None, None, None, None


def dmd_loss_triton(
    x0_student: torch.Tensor,
    x0_fake: torch.Tensor,
    x0_teacher: torch.Tensor,
    norm_min: float = 1e-4,
    group=None,
    block: Optional[int] = None,
) -> torch.Tensor:
    """Fused DMD loss (fp32 scalar); gradient flows to ``x0_student`` only.

    With ``group``, every rank holds a shard of the same samples (along non-batch dims): the
    normaliser and the mean are over whole samples, so all ranks return the unsplit loss.
    """
    if not (x0_student.shape == x0_fake.shape == x0_teacher.shape):
        raise ValueError(f"shape mismatch: {x0_student.shape}, {x0_fake.shape}, {x0_teacher.shape}")
    return DMDLossFunction.apply(x0_student, x0_fake.detach(), x0_teacher.detach(), float(norm_min), group, block)
