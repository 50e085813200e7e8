"""Process groups: tensor parallel, Ulysses sequence parallel, and data parallel over the rest.

megatron-core's ``parallel_state`` owns every group. The Ulysses group is megatron's
context-parallel group: both hold different tokens of the same samples, so megatron's data
parallel groups "with context parallel" are exactly the groups that must average gradients.
Rank order (fastest first): tensor parallel, Ulysses, data parallel.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from phased_dmd_mega.parallel import cpu_compat


@dataclass(frozen=True)
class ParallelLayout:
    """What one rank knows about the layout after ``initialize``."""

    world_size: int
    rank: int
    tensor_parallel: int
    ulysses_parallel: int
    data_parallel: int
    sequence_parallel: bool
    backend: str
    device: torch.device

    @property
    def tensor_parallel_rank(self) -> int:
        return self.rank % self.tensor_parallel

    @property
    def ulysses_rank(self) -> int:
        return (self.rank // self.tensor_parallel) % self.ulysses_parallel

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // (self.tensor_parallel * self.ulysses_parallel)


_layout: Optional[ParallelLayout] = None
_owns_process_group = False


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _start_process_group(backend: str, timeout: datetime.timedelta) -> bool:
    """Start torch.distributed from torchrun's environment, or as one process. Returns True
    when this call created the default group (and so ``destroy`` must end it)."""
    if dist.is_initialized():
        return False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return True


def local_cuda_device() -> int:
    """This process's GPU: torchrun's LOCAL_RANK, which must be one of the GPUs it sees."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"
        raise RuntimeError(
            f"LOCAL_RANK is {local_rank}, but this process sees {count} GPU(s){shown}: "
            f"start at most {count} processes per node (torchrun --nproc_per_node)"
        )
    return local_rank


def use_tf32(enabled: bool) -> None:
    """TF32 (or strict IEEE float32) for the float32 matmuls and cuDNN convolutions of this
    process on CUDA; the flags exist, and do nothing, on CPU. The allow_tf32 setters write torch's
    legacy and new (``fp32_precision``, 2.9+) settings alike: setting the new ones alone leaves the
    two disagreeing, and torch then raises wherever the legacy ones are read (its own
    ``allowTF32CuBLAS``, libraries that read ``allow_tf32``)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def initialize(
    tensor_parallel: int = 1,
    ulysses_parallel: int = 1,
    sequence_parallel: bool = False,
    seed: int = 0,
    timeout_s: float = 1800.0,
    allow_tf32: Optional[bool] = None,
) -> ParallelLayout:
    """Start torch.distributed (gloo without CUDA, nccl with it) and megatron-core's groups.

    ``sequence_parallel`` is Megatron sequence parallelism inside the tensor-parallel group;
    ``ulysses_parallel`` is the size of the Ulysses (all-to-all) sequence-parallel group.
    ``allow_tf32``: see :func:`use_tf32` (None leaves torch's settings as they are).
    """
    global _layout, _owns_process_group
    if _layout is not None:
        raise RuntimeError("parallel.initialize() was already called; call parallel.destroy() first")
    _check_size("tensor_parallel", tensor_parallel)
    _check_size("ulysses_parallel", ulysses_parallel)

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_cuda_device())
    else:
        cpu_compat.apply()
    if allow_tf32 is not None:
        use_tf32(allow_tf32)
    backend = "nccl" if use_cuda else "gloo"
    owns = _start_process_group(backend, datetime.timedelta(seconds=timeout_s))

    world_size = dist.get_world_size()
    model_parallel = tensor_parallel * ulysses_parallel
    if world_size % model_parallel != 0:
        if owns:
            dist.destroy_process_group()
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel ({tensor_parallel}) "
            f"x ulysses_parallel ({ulysses_parallel}) = {model_parallel}"
        )

    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mcore_tp

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        context_parallel_size=ulysses_parallel,
    )
    _seed_everything(seed)
    mcore_tp.model_parallel_cuda_manual_seed(seed)

    _owns_process_group = owns
    _layout = ParallelLayout(
        world_size=world_size,
        rank=dist.get_rank(),
        tensor_parallel=tensor_parallel,
        ulysses_parallel=ulysses_parallel,
        data_parallel=world_size // model_parallel,
        sequence_parallel=sequence_parallel,
        backend=backend,
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
    )
    return _layout


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is a dependency, but seeding must never be the failure
        pass


def destroy() -> None:
    """Tear down megatron's groups and, if ``initialize`` started it, torch.distributed."""
    global _layout, _owns_process_group
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _layout = None
    _owns_process_group = False


def is_initialized() -> bool:
    return _layout is not None


def layout(needed_by: Optional[str] = None) -> ParallelLayout:
    """The layout ``initialize`` set up; without one, a RuntimeError, which begins with
    ``needed_by`` (what needs it) where given."""
    if _layout is None:
        if needed_by is None:
            raise RuntimeError("parallel.initialize() has not been called")
        raise RuntimeError(f"{needed_by}: call parallel.initialize() first")
    return _layout


@contextlib.contextmanager
def ensure_layout() -> Iterator[ParallelLayout]:
    """The current layout, or else a one-process layout set up for the duration and torn down after."""
    if _layout is not None:
        yield _layout
        return
    initialize(1, 1, False, 0)
    try:
        yield layout()
    finally:
        destroy()


# The accessors below give the one-process answer where nothing is set up, so that code written
# for a parallel run works unchanged in one plain process.


def global_rank() -> int:
    """This process's rank among all processes; 0 where torch.distributed is not started."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """How many processes take part; 1 where torch.distributed is not started."""
    return dist.get_world_size() if dist.is_initialized() else 1


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """How many processes ``group`` holds (None: all of them, as in torch.distributed); 1 where
    torch.distributed is not started."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def data_parallel_rank() -> int:
    """This rank's place among the data-parallel ranks; 0 without a layout."""
    return _layout.data_parallel_rank if _layout is not None else 0


def device(default: torch.device = torch.device("cpu")) -> torch.device:
    """The layout's device, where collectives take their tensors (the GPU under nccl, the CPU
    under gloo); ``default`` without a layout."""
    return _layout.device if _layout is not None else default


def all_reduce(
    tensor: torch.Tensor, group: Optional[dist.ProcessGroup], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> torch.Tensor:
    """Reduce ``tensor`` over ``group`` in place and return it. Nothing to do where the group is
    one process, or None: here None means that this rank holds the whole, not torch's default group."""
    if group is not None and group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def barrier() -> None:
    """Wait for every process; nothing to wait for where torch.distributed is not started."""
    if dist.is_initialized():
        dist.barrier()


def tensor_parallel_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def ulysses_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()


def token_split_group(tensor_parallel_split: bool) -> dist.ProcessGroup:
    """The ranks that hold different tokens of the same samples: the Ulysses ranks, times the
    tensor-parallel ranks when sequence parallelism splits tokens over them too."""
    from megatron.core import parallel_state

    if tensor_parallel_split:
        return parallel_state.get_tensor_and_context_parallel_group()
    return parallel_state.get_context_parallel_group()


def data_parallel_group(with_ulysses: bool = True) -> dist.ProcessGroup:
    """Ranks holding different samples; ``with_ulysses`` adds the Ulysses ranks, which hold
    different tokens of the same samples: the group over which gradients are averaged."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=with_ulysses)


def tensor_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def tensor_parallel_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def ulysses_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_world_size()


def ulysses_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_rank()


def amax_reduction_group() -> dist.ProcessGroup:
    """The group over which FP8 delayed scaling all-reduces its amax history: the tensor- and
    Ulysses-parallel ranks, which run the same samples through the same modules (data-parallel
    ranks may route samples to different experts, so they are left out)."""
    from megatron.core import parallel_state

    return parallel_state.get_amax_reduction_group(with_context_parallel=True, tp_only_amax_red=True)
