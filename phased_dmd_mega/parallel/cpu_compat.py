"""Lets megatron-core 0.16 run on machines without CUDA (development machines and CI).

megatron-core allocates communication buffers on ``torch.cuda.current_device()``, keeps its
RNG tracker in CUDA generator states and calls ``torch.cuda.synchronize()`` around
checkpointing. On a CPU-only build of torch each of those raises "Torch not compiled with CUDA
enabled". ``apply()`` redirects exactly those calls to their CPU equivalents. It is a no-op
when CUDA is available, so GPU runs never see it. Every redirection is listed in ``PATCHES``.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Tuple

import torch

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


class _SameGeneratorFilter(logging.Filter):
    """On CPU, megatron's "CUDA" RNG states and the CPU state are one generator, so its
    warning that the CPU state changed inside a forked RNG context is always true and means
    nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


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
    for name, (owner, attr, replacement) in {**_torch_cuda_patches(), **_megatron_patches()}.items():
        setattr(owner, attr, replacement)
        PATCHES[name] = replacement
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_SameGeneratorFilter())
    _applied = True
    return True


def is_applied() -> bool:
    return _applied
