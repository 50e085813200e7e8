"""Progress of long work on the console: a tqdm bar with its ETA on a terminal, log lines elsewhere.

Only global rank 0 shows anything. Where stderr is not a terminal (a CI log, a file, pytest's
capture) no bar is drawn, so no carriage returns reach the file: a log line every
``log_every_s`` seconds stands in for it, or none where the caller logs lines of its own (the
trainer's ``logging.log_every``). Log lines written while a bar is open go above it (log.py
writes through tqdm).
"""

from __future__ import annotations

import sys
import time
from typing import Dict, Optional, TextIO

from tqdm import tqdm

from phased_dmd_mega.log import current_rank, get_logger

log = get_logger(__name__)


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def announce_stage(number: int, count: int, title: str) -> None:
    """A one-line header for a stage of a longer job (the demo's pretraining, training, sampling)."""
    log.info("==== stage %d/%d: %s ====", number, count, title)


class Progress:
    """``total`` units of work named ``desc``; ``update`` after each piece, with the figures to
    show beside the bar (losses, TFLOP/s). ``initial``: units already done (a resumed run)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        *,
        initial: int = 0,
        log_every_s: Optional[float] = 30.0,
        unit_scale: bool = False,
        stream: Optional[TextIO] = None,
        rank: Optional[int] = None,
    ):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.initial = self.done = initial
        self.log_every_s = log_every_s
        self.start = self.last_line = time.perf_counter()
        self.shown = (current_rank() if rank is None else rank) == 0
        stream = sys.stderr if stream is None else stream
        self.bar = None
        if self.shown and is_terminal(stream):
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                unit_scale=unit_scale,
                file=stream,
                dynamic_ncols=True,
                leave=None,  # kept when it is the only bar; one inside another's loop goes away
            )

    @property
    def drawing(self) -> bool:
        return self.bar is not None

    def update(self, count: int = 1, figures: Optional[Dict[str, object]] = None) -> None:
        self.done += count
        if self.bar is not None:
            if figures:
                self.bar.set_postfix(figures, refresh=False)
            self.bar.update(count)
        elif self.shown and self.log_every_s is not None:
            now = time.perf_counter()
            if now - self.last_line >= self.log_every_s:
                self.last_line = now
                log.info("%s: %s", self.desc, self.summary())

    @property
    def rate(self) -> float:
        """Units per second since the start (those done before it not counted)."""
        return (self.done - self.initial) / max(time.perf_counter() - self.start, 1e-9)

    def eta(self) -> str:
        """The time left at the rate so far, as tqdm writes it ("?" before any unit is done)."""
        if self.done <= self.initial:
            return "?"
        return tqdm.format_interval(max(self.total - self.done, 0) / self.rate)

    def summary(self) -> str:
        done, total = (
            (tqdm.format_sizeof(self.done), tqdm.format_sizeof(self.total))
            if self.unit_scale
            else (str(self.done), str(self.total))
        )
        rate = tqdm.format_sizeof(self.rate) if self.unit_scale else f"{self.rate:.3g}"
        return f"{done}/{total} {self.unit} ({rate} {self.unit}/s, ETA {self.eta()})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
