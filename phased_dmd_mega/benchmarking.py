"""Timing for the benchmark scripts and bench/gpu_check.py: wall-clock seconds between
synchronisations (of the CUDA device, where there is one), and the device's own dense
matrix-multiply and copy rates that achieved figures are compared with."""

from __future__ import annotations

import time
from typing import Callable, Dict

import torch


def seconds_per_call(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Mean seconds of ``fn`` after ``warmup`` calls, the device synchronised around the timed ones."""
    for _ in range(warmup):
        fn()
    _synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _synchronize()
    return (time.perf_counter() - start) / iters


def alternating_seconds(fns: Dict[str, Callable[[], object]], warmup: int = 1, iters: int = 3) -> Dict[str, float]:
    """Mean seconds per call of each of ``fns``, timed in turns (one call of each per round), so
    that a machine that slows down for a while slows all of them alike: a ratio side by side."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds = dict.fromkeys(fns, 0.0)
    for _ in range(iters):
        for name, fn in fns.items():
            _synchronize()
            start = time.perf_counter()
            fn()
            _synchronize()
            seconds[name] += (time.perf_counter() - start) / iters
    return seconds


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dense_matmul_tflops(
    size: int = 8192, iters: int = 20, dtype: torch.dtype = torch.bfloat16, device: str = "cuda"
) -> float:
    """A size^3 matrix multiply's rate on random data (TFLOP/s)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    return 2 * size**3 / seconds_per_call(lambda: torch.mm(a, b, out=out), warmup=5, iters=iters) / 1e12


def copy_gbps(mib: int = 1024, iters: int = 20) -> float:
    """A device-to-device copy of a buffer far larger than L2: bytes read + written per second (GB/s)."""
    src = torch.empty(mib * 2**20, device="cuda", dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / seconds_per_call(lambda: dst.copy_(src), warmup=3, iters=iters) / 1e9
