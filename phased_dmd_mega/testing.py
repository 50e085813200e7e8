"""Run a function on N local processes joined by torch.distributed, as torchrun would.

Multi-process tests are ordinary pytest tests: ``run_distributed(fn, 2, *args)`` spawns two
processes with torchrun's environment variables (free port on loopback), calls ``fn`` in each,
and returns the per-rank results in rank order. An exception on any rank is raised in the
caller with that rank's traceback; a rank that dies or hangs fails the call instead of hanging
the test session. ``fn`` must be importable (a module-level function), as with any spawn.

The ranks see no GPU unless asked (``use_cuda=True``): a CPU test's ranks use gloo and CPU
tensors on a GPU host too (where LOCAL_RANK could name a GPU that does not exist), and their
Triton kernels run in Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.multiprocessing as mp

# Set in the environment the ranks start with: read before any of their code runs (CUDA when
# torch first touches it, Triton when a kernel module is imported).
HIDDEN_CUDA = {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}


class DistributedRunError(RuntimeError):
    """A rank raised, died or timed out."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_bytes(value: Any) -> bytes:
    # torch.save keeps tensors intact without relying on shared-memory handles, which do
    # not survive a worker that exits before the parent reads the queue.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@contextlib.contextmanager
def _environment(values: Dict[str, str]):
    """``os.environ`` with ``values`` set (processes started meanwhile inherit them), then as before."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _worker(fn, rank, world_size, port, args, kwargs, env, threads, results) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    try:
        results.put((rank, "ok", _to_bytes(fn(*args, **kwargs))))
    except BaseException:  # report everything, KeyboardInterrupt included, to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    env: Optional[Dict[str, str]] = None,
    threads: int = 1,
    use_cuda: bool = False,
    **kwargs: Any,
) -> List[Any]:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return results by rank.
    ``use_cuda``: the ranks see this process's GPUs (else none, see the module docstring)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, args, kwargs, dict(env or {}), threads, results),
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    with _environment({} if use_cuda else HIDDEN_CUDA):
        for proc in procs:
            proc.start()
    try:
        return _collect(procs, results, world_size, timeout_s)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _collect(procs, results, world_size: int, timeout_s: float) -> List[Any]:
    outputs: Dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(outputs) < world_size:
        try:
            rank, status, payload = results.get(timeout=0.5)
        except queue.Empty:
            _fail_if_dead_or_late(procs, outputs, deadline, timeout_s)
            continue
        if status == "error":
            raise DistributedRunError(f"rank {rank} of {world_size} raised:\n{payload}")
        outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    return [outputs[rank] for rank in range(world_size)]


def _fail_if_dead_or_late(procs, outputs, deadline: float, timeout_s: float) -> None:
    for rank, proc in enumerate(procs):
        if rank not in outputs and not proc.is_alive() and proc.exitcode not in (None, 0):
            raise DistributedRunError(f"rank {rank} died with exit code {proc.exitcode}")
    if time.monotonic() > deadline:
        missing = [rank for rank in range(len(procs)) if rank not in outputs]
        raise DistributedRunError(f"ranks {missing} did not finish within {timeout_s:.0f} s")


def with_parallel_state(
    fn: Callable[..., Any], *args: Any, parallel_sizes: Optional[Dict[str, Any]] = None, **kwargs: Any
) -> Any:
    """``fn(*args, **kwargs)`` between ``parallel.initialize(**parallel_sizes)`` and
    ``parallel.destroy()``: in this process (one rank), or on each rank under ``run_distributed``."""
    from phased_dmd_mega import parallel

    parallel.initialize(**(parallel_sizes or {}))
    try:
        return fn(*args, **kwargs)
    finally:
        parallel.destroy()
