"""Logging with the rank in every line; only rank 0 prints unless asked otherwise. Lines are
written above an open progress bar (progress.py), not into it."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from tqdm import tqdm

_HANDLER_NAME = "phased_dmd_mega"


def current_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def __init__(self, all_ranks: bool):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = current_rank()
        return self.all_ranks or record.rank == 0


class _CurrentStderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written, not the stream it was
    at setup (a caller that swaps and closes it, as pytest's capture does, would leave the
    handler writing to a closed file)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        # tqdm clears its bars on this stream, the line is written, the bars are drawn again.
        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


def setup_logging(level: str = "INFO", all_ranks: bool = False) -> logging.Logger:
    """Configure the project's logger ("phased_dmd_mega"); safe to call more than once."""
    logger = logging.getLogger("phased_dmd_mega")
    logger.setLevel(level)
    logger.propagate = False
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = _CurrentStderr()
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_RankFilter(all_ranks))
    handler.setFormatter(
        logging.Formatter("%(asctime)s [rank %(rank)d] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    logger.addHandler(handler)
    return logger


def get_logger(name: str) -> logging.Logger:
    """A child of the project's logger, e.g. get_logger(__name__)."""
    if not name.startswith("phased_dmd_mega"):
        name = f"phased_dmd_mega.{name}"
    return logging.getLogger(name)


def process_memory_mib(field: str) -> Optional[float]:
    """This process's memory from /proc/self/status: ``VmRSS`` (now) or ``VmHWM`` (peak), in
    MiB; None where /proc is not available."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None
