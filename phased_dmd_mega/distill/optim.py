"""Optimisation of one role under tensor, sequence and data parallelism.

Gradients are finalised the way megatron does it: replicated parameters that only saw this
rank's tokens (tagged ``sequence_parallel``) are summed over the tensor-parallel group, then
every gradient is summed over the Ulysses ranks (each saw its own tokens of the same samples)
and averaged over the data-parallel ranks (different samples). The
gradient norm for clipping counts each tensor-parallel shard once and each replicated
parameter once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from phased_dmd_mega import parallel


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_adamw(model: nn.Module, lr: float, betas, eps: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(trainable_parameters(model), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def finalize_gradients(model: nn.Module) -> None:
    """Sum sequence-parallel partial gradients over TP and all over Ulysses; average over DP."""
    if not parallel.is_initialized():
        return
    params = [p for p in trainable_parameters(model) if p.grad is not None]
    tp_group = parallel.tensor_parallel_group()
    if _group_size(tp_group) > 1:
        for p in params:
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=tp_group)
    # Ulysses ranks hold partial gradients of the same samples (each saw its own tokens): they
    # are summed; data-parallel ranks saw different samples: they are averaged.
    dp_group = parallel.data_parallel_group(with_ulysses=True)
    if _group_size(dp_group) > 1:
        samples_split = parallel.layout().data_parallel
        for p in params:
            dist.all_reduce(p.grad, group=dp_group)
            if samples_split > 1:
                p.grad.div_(samples_split)


def gradient_norm(model: nn.Module) -> float:
    """The L2 norm of the whole (unsharded) gradient."""
    params = [p for p in trainable_parameters(model) if p.grad is not None]
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in params:
        square = p.grad.detach().double().square().sum().cpu()
        if getattr(p, "tensor_model_parallel", False):
            sharded += square
        else:
            replicated += square
    if parallel.is_initialized() and _group_size(parallel.tensor_parallel_group()) > 1:
        dist.all_reduce(sharded, group=parallel.tensor_parallel_group())
    return math.sqrt(float(sharded + replicated))


def all_ranks_agree(ok: bool) -> bool:
    """True only if every rank says so: a step skipped on one data-parallel rank must be
    skipped on all, or their gradient all-reduces would no longer pair up."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([1.0 if ok else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@dataclass
class RoleOptimizer:
    """A trainable role, its optimizer and its clipping."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    grad_clip: Optional[float] = None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """Finalise, clip and apply the gradients; returns the gradient norm before clipping.
        A non-finite norm skips the update (the caller logs and counts it)."""
        finalize_gradients(self.model)
        norm = gradient_norm(self.model)
        if not math.isfinite(norm):
            self.zero_grad()
            return norm
        if self.grad_clip is not None and norm > self.grad_clip:
            scale = self.grad_clip / (norm + 1e-6)
            for p in trainable_parameters(self.model):
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()
        self.zero_grad()
        return norm
