"""Optimisation of one role under tensor, sequence and data parallelism.

Gradients are finalised the way megatron does it: replicated parameters that only saw this
rank's tokens (tagged ``sequence_parallel``) are summed over the tensor-parallel group, then
every gradient is summed over the Ulysses ranks (each saw its own tokens of the same samples)
and averaged over the data-parallel ranks (different samples). The
gradient norm for clipping counts each tensor-parallel shard once and each replicated
parameter once. A non-finite norm skips the update on every rank alike (the norm is the same
number everywhere), and a parameter no rank computed a gradient for is left alone (no weight
decay, no moment decay), as torch's AdamW does with a gradient of None.

Two optimizers give the same updates:
- ``RoleOptimizer``: torch AdamW on every rank, each holding the whole AdamW state of its
  tensor-parallel shard (``optimizer.distributed: false``).
- ``DistributedRoleOptimizer``: megatron-core's DistributedDataParallel and DistributedOptimizer.
  Gradients live in one contiguous fp32 buffer, are reduce-scattered over the data-parallel
  group, and each data-parallel rank updates only its contiguous slice of that buffer, so the
  AdamW states (and, for bf16/fp16 weights, the fp32 main weights) are split over the
  data-parallel ranks; the updated weights are all-gathered after the step. Each slice is
  updated by torch's AdamW, whichever Adam megatron would pick (see ``_torch_adamw_in_megatron``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from phased_dmd_mega import parallel
from phased_dmd_mega.parallel.megatron_config import stand_in_transformer_config

ADAM_STATES = ("exp_avg", "exp_avg_sq")
MAIN_PARAM = "main_param"  # the fp32 copy the distributed optimizer keeps of bf16/fp16 weights


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_adamw(
    model: nn.Module, lr: float, betas, eps: float, weight_decay: float, fused: bool = True
) -> torch.optim.AdamW:
    """torch's AdamW; ``fused``: its one-pass kernel (CPU and CUDA), else the for-loop one."""
    params = trainable_parameters(model)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)


def use_fused_adamw(optimizer: torch.optim.AdamW, fused: bool) -> None:
    """Switch an AdamW built elsewhere (megatron-core passes no such option) to the fused kernel:
    torch reads ``fused`` from each group at every step. Same updates, one pass over each state
    instead of one per arithmetic operation."""
    for group in (optimizer.defaults, *optimizer.param_groups):
        group["fused"] = fused
        if fused:
            group["foreach"] = False  # torch refuses both at once


def step_counter(value: float, param: torch.Tensor, fused: bool) -> torch.Tensor:
    """AdamW's step count of one parameter, where torch keeps it: the fused kernel reads it on
    the parameter's device, the for-loop AdamW on the CPU (a CUDA one would cost a sync per step)."""
    return torch.tensor(float(value), dtype=torch.float32, device=param.device if fused else "cpu")


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


def sum_partial_gradients_over_tp(params_and_grads: Iterable[Tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Replicated parameters tagged ``sequence_parallel`` hold partial sums over the
    tensor-parallel group (their rank's tokens only, or LoRA factors next to a split weight)."""
    if not parallel.is_initialized():
        return
    tp_group = parallel.tensor_parallel_group()
    for param, grad in params_and_grads:
        if getattr(param, "sequence_parallel", False):
            parallel.all_reduce(grad, tp_group)


def finalize_gradients(model: nn.Module) -> None:
    """Sum sequence-parallel partial gradients over TP and all over Ulysses; average over DP."""
    if not parallel.is_initialized():
        return
    params = [p for p in trainable_parameters(model) if p.grad is not None]
    sum_partial_gradients_over_tp((p, p.grad) for p in params)
    # Ulysses ranks hold partial gradients of the same samples (each saw its own tokens): they
    # are summed; data-parallel ranks saw different samples: they are averaged.
    dp_group = parallel.data_parallel_group(with_ulysses=True)
    samples_split = parallel.layout().data_parallel
    for p in params:
        parallel.all_reduce(p.grad, dp_group)
        if samples_split > 1:
            p.grad.div_(samples_split)


def gradient_norm(model: nn.Module) -> float:
    """The L2 norm of the whole (unsharded) gradient."""
    params = [p for p in trainable_parameters(model) if p.grad is not None]
    sharded = [p.grad for p in params if getattr(p, "tensor_model_parallel", False)]
    replicated = [p.grad for p in params if not getattr(p, "tensor_model_parallel", False)]
    sharded_square = sum_of_squares(sharded)
    if parallel.is_initialized():
        parallel.all_reduce(sharded_square, parallel.tensor_parallel_group())
    return math.sqrt(float(sharded_square + sum_of_squares(replicated)))


def sum_of_squares(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Sum of the squares of every element, in float64, on this rank's device. Each tensor's norm
    is taken in one pass with float32 accumulation (no float64 copies of the gradients), and only
    those norms are squared and summed in float64."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=parallel.device())
    norms = torch._foreach_norm(tensors, 2.0, dtype=torch.float32)
    return torch.stack(norms).to(parallel.device(), torch.float64).square().sum()


def clip_gradients(grads: List[torch.Tensor], norm: float, grad_clip: Optional[float]) -> None:
    """Scale the gradients whose whole norm is ``norm`` down to ``grad_clip`` (if above it)."""
    scale = 1.0 if grad_clip is None else grad_clip / (norm + 1e-6)
    if scale < 1.0 and grads:
        torch._foreach_mul_(grads, scale)  # one multi-tensor kernel on a GPU, not one per tensor


def all_ranks_agree(ok: bool) -> bool:
    """True only if every rank says so: a step skipped on one data-parallel rank must be
    skipped on all, or their gradient all-reduces would no longer pair up."""
    if parallel.world_size() == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=parallel.device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def set_learning_rate(role, lr: float) -> None:
    """This step's rate for a role (RoleOptimizer or DistributedRoleOptimizer): the schedule
    lives with the caller, the optimizer only reads ``lr`` from its groups."""
    for group in role.optimizer.param_groups:
        group["lr"] = lr


def state_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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
        clip_gradients([p.grad for p in trainable_parameters(self.model) if p.grad is not None], norm, self.grad_clip)
        self.optimizer.step()
        self.zero_grad()
        return norm

    def ensure_state(self) -> None:
        """AdamW creates its state at the first step; saving and loading need it before."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state[param]
                if not state:
                    state["step"] = step_counter(0, param, is_fused(self.optimizer))
                    for name in ADAM_STATES:
                        state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def set_steps(self, steps: Dict[str, float]) -> None:
        """AdamW step counts by parameter name (a checkpoint's); parameters not named keep theirs."""
        self.ensure_state()
        fused = is_fused(self.optimizer)
        for name, param in self.model.named_parameters():
            if name in steps:
                self.optimizer.state[param]["step"] = step_counter(steps[name], param, fused)

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (AdamW moments and step counters)."""
        self.ensure_state()
        return state_bytes(t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t))


# ----------------------------------------------------------------------------- distributed


@dataclass
class OwnedSlice:
    """This rank's part of one parameter's optimizer state: elements [start, stop) of the
    flattened (tensor-parallel-local) parameter; each state is a 1-D tensor of that length."""

    start: int
    stop: int
    states: Dict[str, torch.Tensor]  # ADAM_STATES, and MAIN_PARAM when the weights are not fp32


def _ddp_stand_in_config():
    """megatron's DDP wants a TransformerConfig; it reads nothing from it that describes the
    model (only ``calculate_per_token_loss``, false: gradients are averaged over ranks)."""
    return stand_in_transformer_config()


def _megatron_optimizer_config(lr, betas, eps, weight_decay, dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=lr,
        weight_decay=weight_decay,
        adam_beta1=float(betas[0]),
        adam_beta2=float(betas[1]),
        adam_eps=eps,
        decoupled_weight_decay=True,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        clip_grad=0.0,  # clipping is ours: it must follow the skip of non-finite steps
        use_distributed_optimizer=True,
    )


@contextlib.contextmanager
def _torch_adamw_in_megatron():
    """megatron-core builds its Adam from TE's (or apex's) FusedAdam whenever one is installed.
    FusedAdam counts steps per parameter group, and advances the count at every step even for
    the parameters it skips for want of a gradient: the low-noise expert of a two-expert role,
    which no sample reached on a step, would get the bias correction of steps it never took.
    torch's AdamW counts steps per parameter, as the per-rank optimizer does and as checkpoints
    (``steps``/``set_steps``) record them; megatron uses it when it found neither package."""
    import megatron.core.optimizer as mcore_optimizer

    found = mcore_optimizer.USING_PYTORCH_OPTIMIZER
    mcore_optimizer.USING_PYTORCH_OPTIMIZER = True
    try:
        yield
    finally:
        mcore_optimizer.USING_PYTORCH_OPTIMIZER = found


class DistributedRoleOptimizer:
    """A trainable role under megatron's DistributedDataParallel + DistributedOptimizer.

    ``model`` stays the module the trainer calls (megatron's DDP only owns the gradient buffer
    and its hooks); ``optimizer`` is megatron's optimizer, whose ``param_groups`` are the
    AdamW groups (the trainer sets ``lr`` there each step)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        betas,
        eps: float,
        weight_decay: float,
        grad_clip: Optional[float] = None,
        fused: bool = True,
    ):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import get_megatron_optimizer

        params = trainable_parameters(model)
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise")
        self.model, self.grad_clip = model, grad_clip
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
        self.ddp = DistributedDataParallel(_ddp_stand_in_config(), ddp_config, model)
        config = _megatron_optimizer_config(lr, betas, eps, weight_decay, params[0].dtype)
        # config_overrides={}: weight decay on every parameter, as torch's AdamW does (megatron
        # would otherwise exempt biases and 1-D parameters).
        with _torch_adamw_in_megatron():
            self.optimizer = get_megatron_optimizer(
                config, [self.ddp], config_overrides={}, use_gloo_process_groups=False
            )
        self.fused = fused
        for sub in self.optimizer.chained_optimizers:
            if sub.optimizer is not None:
                use_fused_adamw(sub.optimizer, fused)
        self._names = {param: name for name, param in model.named_parameters() if param.requires_grad}
        self._index = {param: i for i, param in enumerate(self._names)}
        self._touched = torch.zeros(len(self._names), device=parallel.device())
        for param, i in self._index.items():
            param.register_hook(self._mark_touched(i))

    def _mark_touched(self, index: int):
        def hook(grad):
            self._touched[index] = 1.0

        return hook

    @property
    def _dp_group(self):
        return parallel.data_parallel_group(with_ulysses=True)

    def _pairs(self):
        """(model parameter, its fp32 main shard, megatron's optimizer) on this rank."""
        for sub in self.optimizer.chained_optimizers:
            for param, shard in _pairs_of(sub):
                yield param, shard, sub

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._touched.zero_()

    def _finish_gradients(self) -> None:
        """TP sum of partial gradients, then the reduce-scatter over DP + Ulysses, which averages:
        scaled first by the Ulysses size, so that Ulysses ranks' partial gradients (their own
        tokens of the same samples) are summed and only data-parallel ranks are averaged.
        (megatron's finalize_model_grads sums tagged gradients only under Megatron sequence
        parallelism; LoRA factors next to a split weight are partial sums without it too.)"""
        sum_partial_gradients_over_tp((p, p.main_grad) for p in self._names)
        ulysses = parallel.layout().ulysses_parallel
        if ulysses > 1:
            for param in self._names:
                param.main_grad.mul_(ulysses)
        self.ddp.finish_grad_sync()
        parallel.all_reduce(self._touched, self._dp_group, op=dist.ReduceOp.MAX)

    def _drop_untouched(self) -> None:
        touched = self._touched.tolist()  # one read, not one per parameter (each a host sync on a GPU)
        for param, shard, _ in self._pairs():
            if not touched[self._index[param]]:
                shard.grad = None

    def step(self) -> float:
        """Finalise, clip and apply the gradients; returns the gradient norm before clipping.
        A non-finite norm skips the update (the caller logs and counts it)."""
        self._finish_gradients()
        self.optimizer.prepare_grads()  # the reduced slice of the buffer -> .grad of the main shards
        self._drop_untouched()
        norm = float(self.optimizer.get_grad_norm())  # over every rank, TP shards counted once
        if not math.isfinite(norm):
            self.zero_grad()
            return norm
        # megatron's clip_grad_by_total_norm_fp32 scales with a per-tensor copy where neither TE
        # nor apex is installed; the main shards' gradients are scaled in place here instead.
        grads = [
            p.grad for sub in self.optimizer.chained_optimizers for p in sub.get_parameters() if p.grad is not None
        ]
        clip_gradients(grads, norm, self.grad_clip)
        self.optimizer.step_with_ready_grads()  # AdamW on the slices, then all-gather the weights
        self.zero_grad()
        return norm

    # ------------------------------------------------------------- state, for checkpoints

    def ensure_state(self) -> None:
        """AdamW creates its state at the first step; saving and loading need it before."""
        for sub in self.optimizer.chained_optimizers:
            if sub.optimizer is None:
                continue
            sub.init_state_fn(sub.optimizer, sub.config)
            for shard, state in sub.optimizer.state.items():
                if "step" not in state:
                    state["step"] = step_counter(0, shard, self.fused)

    def owned_slices(self) -> Dict[str, OwnedSlice]:
        """Parameter name -> the slice of its optimizer state that this rank holds."""
        self.ensure_state()
        slices = {}
        for param, shard, sub in self._pairs():
            owned = sub._get_model_param_range_map(param)["param"]  # megatron-core 0.16
            states = {name: sub.optimizer.state[shard][name] for name in ADAM_STATES}
            if param.dtype != torch.float32:  # else the shard is a view of the weights themselves
                states[MAIN_PARAM] = shard
            slices[self._names[param]] = OwnedSlice(owned.start, owned.end, states)
        return slices

    def steps(self) -> Dict[str, float]:
        """AdamW step count of every trainable parameter, the same on every rank."""
        self.ensure_state()
        counts = torch.zeros(len(self._names), dtype=torch.float64, device=parallel.device())
        for param, shard, sub in self._pairs():
            counts[self._index[param]] = float(sub.optimizer.state[shard]["step"])
        # a parameter's slices may all be on other ranks
        parallel.all_reduce(counts, self._dp_group, op=dist.ReduceOp.MAX)
        counts = counts.tolist()
        return {name: counts[self._index[p]] for p, name in self._names.items()}

    def set_steps(self, steps: Dict[str, float]) -> None:
        self.ensure_state()
        for param, shard, sub in self._pairs():
            sub.optimizer.state[shard]["step"] = step_counter(steps[self._names[param]], shard, self.fused)

    def reload_main_params(self) -> None:
        """After the weights were overwritten (a checkpoint load): main shards from the weights."""
        self.optimizer.reload_model_params()

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: AdamW moments and step counters, and the
        fp32 main weights where they are not the weights themselves."""
        self.ensure_state()
        total = 0
        for param, shard, sub in self._pairs():
            total += state_bytes(t for t in sub.optimizer.state[shard].values() if torch.is_tensor(t))
            if param.dtype != torch.float32:
                total += state_bytes([shard])
        return total


def _pairs_of(sub):
    """(model parameter, fp32 main shard) pairs of one megatron DistributedOptimizer."""
    for models, shards in (
        (sub.model_float16_groups, sub.shard_fp32_from_float16_groups),
        (sub.model_fp32_groups, sub.shard_fp32_groups),
    ):
        for model_group, shard_group in zip(models, shards):
            yield from zip(model_group, shard_group)


def make_role_optimizer(
    model: nn.Module,
    lr: float,
    betas,
    eps: float,
    weight_decay: float,
    grad_clip: Optional[float],
    distributed: bool,
    fused: bool = True,
) -> Union[RoleOptimizer, DistributedRoleOptimizer]:
    """The role's optimizer: megatron's distributed optimizer, or torch AdamW on every rank."""
    if distributed:
        return DistributedRoleOptimizer(model, lr, betas, eps, weight_decay, grad_clip, fused)
    return RoleOptimizer(model, make_adamw(model, lr, betas, eps, weight_decay, fused), grad_clip)
