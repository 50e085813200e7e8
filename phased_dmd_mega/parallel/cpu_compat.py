"""Lets megatron-core 0.16 run on machines without CUDA (development machines and CI).

megatron-core allocates communication buffers on ``torch.cuda.current_device()``, keeps its
RNG tracker in CUDA generator states and calls ``torch.cuda.synchronize()`` around
checkpointing. On a CPU-only build of torch each of those raises "Torch not compiled with CUDA
enabled". ``apply()`` redirects exactly those calls to their CPU equivalents. It is a no-op
when CUDA is available, so GPU runs never see it. Every redirection is listed in ``PATCHES``.

megatron's distributed optimizer goes further: it creates tensors with ``device='cuda'`` and
accepts only parameters whose ``Tensor.type()`` is a ``torch.cuda.*Tensor`` name. The few
functions that do so run inside a torch function mode (``_CudaNamesOnCpu``) that places those
tensors on the CPU and gives CPU parameters their CUDA type names; nothing else sees the mode.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import torch
from torch.overrides import TorchFunctionMode

from phased_dmd_mega import known_noise

_CPU = torch.device("cpu")
_applied = False


def _cpu_current_device() -> torch.device:
    # megatron passes the result as `device=`; the CPU device is the only one there is.
    return _CPU


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe=False) -> None:
    torch.set_rng_state(new_state)


def _no_sync(device=None) -> None:
    return None


# The type names megatron's optimizer checks parameters against, for their CPU twins.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _names_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaNamesOnCpu(TorchFunctionMode):
    """Inside: ``device='cuda'`` means the CPU, and a CPU float tensor's ``type()`` is its CUDA
    name (megatron's distributed optimizer refuses other parameters)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _names_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        return func(*args, **kwargs)


def _with_cuda_names_on_cpu(function: Callable) -> Callable:
    @functools.wraps(function)
    def on_cpu(*args, **kwargs):
        with _CudaNamesOnCpu():
            return function(*args, **kwargs)

    return on_cpu


def _torch_cuda_patches() -> Dict[str, Tuple[object, str, Callable]]:
    return {
        "torch.cuda.current_device": (torch.cuda, "current_device", _cpu_current_device),
        "torch.cuda.get_rng_state": (torch.cuda, "get_rng_state", _cpu_get_rng_state),
        "torch.cuda.set_rng_state": (torch.cuda, "set_rng_state", _cpu_set_rng_state),
        "torch.cuda.manual_seed": (torch.cuda, "manual_seed", torch.manual_seed),
        "torch.cuda.synchronize": (torch.cuda, "synchronize", _no_sync),
    }


def _megatron_patches() -> Dict[str, Tuple[object, str, Callable]]:
    from megatron.core.tensor_parallel import random as mcore_random

    return {
        "megatron.core.tensor_parallel.random._get_cuda_rng_state": (
            mcore_random,
            "_get_cuda_rng_state",
            _cpu_get_rng_state,
        ),
        "megatron.core.tensor_parallel.random._set_cuda_rng_state": (
            mcore_random,
            "_set_cuda_rng_state",
            _cpu_set_rng_state,
        ),
    }


def _megatron_optimizer_patches() -> Dict[str, Tuple[object, str, Callable]]:
    """The distributed optimizer's constructor and the gradient norm and clipping helpers (bound
    both in ``clip_grads`` and in ``optimizer``, which imported them by name)."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    patches = {
        "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.__init__": (
            distrib_optimizer.DistributedOptimizer,
            "__init__",
            _with_cuda_names_on_cpu(distrib_optimizer.DistributedOptimizer.__init__),
        )
    }
    for name in ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32"):
        replacement = _with_cuda_names_on_cpu(getattr(clip_grads, name))
        for module in (clip_grads, optimizer):
            patches[f"{module.__name__}.{name}"] = (module, name, replacement)
    return patches


# Filled by apply(): dotted name -> replacement, for inspection and tests.
PATCHES: Dict[str, Callable] = {}


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Apply the CPU redirections once. Returns True when they are (or already were) active."""
    global _applied
    if _applied:
        return True
    if not needed():
        return False
    patches = {**_torch_cuda_patches(), **_megatron_patches(), **_megatron_optimizer_patches()}
    for name, (owner, attr, replacement) in patches.items():
        setattr(owner, attr, replacement)
        PATCHES[name] = replacement
    known_noise.install_without_cuda()  # what megatron says that is untrue or moot without CUDA
    _applied = True
    return True


def is_applied() -> bool:
    return _applied
