"""Dependency warnings and log records a user can do nothing about, silenced by name in one place.

Each filter names one message (a regular expression matched at the start of the text, as the
``warnings`` module matches) and its category or logger; everything else still shows. The
package's ``__init__`` installs the ones that hold everywhere before any submodule imports
megatron-core (its notices come at import time), so a process that imports megatron through
this package (``phased-dmd``, torchrun's workers, the demo) never prints them;
``parallel.cpu_compat.apply()`` adds those that are noise only on a machine without CUDA.

This module imports nothing but the standard library: the package's ``__init__`` loads it.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Tuple, Type


@dataclass(frozen=True)
class KnownWarning:
    """One ``warnings.warn`` of a dependency, by message and category."""

    name: str
    message: str  # regex, matched at the start of the warning's text
    category: Type[Warning]
    example: str  # the text the dependency emits (tests raise it)
    without_cuda_only: bool = False  # noise only where there is no CUDA device


@dataclass(frozen=True)
class KnownLogRecord:
    """One log record of a dependency, by logger and message."""

    name: str
    logger: str
    message: str  # regex, searched in the record's formatted message
    example: str
    without_cuda_only: bool = False


KNOWN_WARNINGS: Tuple[KnownWarning, ...] = (
    # megatron-core's import-time notice (from several modules) that it falls back from
    # Transformer Engine and Apex to torch: always so on CPU machines, and on a GPU the trainer
    # picks its layers and optimizer itself (README "GPU paths").
    KnownWarning(
        "megatron-core without Transformer Engine and Apex",
        r"Transformer Engine and Apex are not installed",
        UserWarning,
        "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
    ),
    # torch 2.13 deprecates the tensor collectives megatron-core 0.16 calls (its distributed
    # optimizer, sequence parallelism); only a megatron-core release can change the calls.
    KnownWarning(
        "torch's deprecation of the collectives megatron-core calls",
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        FutureWarning,
        "`torch.distributed.all_gather_into_tensor` is deprecated. "
        "Please use `torch.distributed.all_gather_single` instead.",
    ),
    # megatron's linears advise a CUDA stream setting on their first call; without CUDA there
    # is no stream to set (on a GPU the advice stands: examples/launch_common.sh sets it).
    KnownWarning(
        "megatron-core's CUDA_DEVICE_MAX_CONNECTIONS advice",
        r".*environment variable CUDA_DEVICE_MAX_CONNECTIONS to 1",
        UserWarning,
        "When using sequence parallelism it is recommended to set the environment variable "
        "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup",
        without_cuda_only=True,
    ),
)

KNOWN_LOG_RECORDS: Tuple[KnownLogRecord, ...] = (
    # On CPU, megatron's "CUDA" RNG states and the CPU state are one generator
    # (parallel/cpu_compat.py), so its warning that the CPU state changed inside a forked RNG
    # context is always true and means nothing.
    KnownLogRecord(
        "megatron's RNG-fork notice on CPU",
        "megatron.core.tensor_parallel.random",
        r"CPU RNG state changed within GPU RNG context",
        "CPU RNG state changed within GPU RNG context",
        without_cuda_only=True,
    ),
)


class _KnownRecordFilter(logging.Filter):
    def __init__(self, known: KnownLogRecord):
        super().__init__()
        self.known = known
        self.pattern = re.compile(known.message)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def _install(without_cuda: bool) -> None:
    for known in KNOWN_WARNINGS:
        if known.without_cuda_only == without_cuda:
            warnings.filterwarnings("ignore", message=known.message, category=known.category)
    for record in KNOWN_LOG_RECORDS:
        if record.without_cuda_only == without_cuda:
            logger = logging.getLogger(record.logger)
            if not any(isinstance(f, _KnownRecordFilter) and f.known == record for f in logger.filters):
                logger.addFilter(_KnownRecordFilter(record))


def install() -> None:
    """The filters that hold on every machine (the package's ``__init__`` calls this)."""
    _install(without_cuda=False)


def install_without_cuda() -> None:
    """The filters for noise that only a machine without CUDA makes (``cpu_compat.apply()``)."""
    _install(without_cuda=True)
