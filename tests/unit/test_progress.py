"""The console's progress (phased_dmd_mega/progress.py): a bar with its total and ETA on a
terminal, no carriage returns elsewhere, nothing at all on ranks other than 0, and log lines
written above an open bar rather than into it."""

import io
import re
import sys

import pytest

from phased_dmd_mega.log import get_logger, setup_logging
from phased_dmd_mega.progress import Progress, announce_stage


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a console's stderr does."""

    def isatty(self) -> bool:
        return True


def run(progress: Progress, steps: int) -> None:
    with progress:
        for step in range(steps):
            progress.update(1, {"loss": 1.0 / (step + 1)})


def test_a_terminal_gets_a_bar_with_its_total_eta_and_figures():
    terminal = Terminal()
    progress = Progress(5, "training", stream=terminal, rank=0)
    assert progress.drawing
    run(progress, 5)
    drawn = terminal.getvalue()
    assert "\r" in drawn  # redrawn in place
    assert re.search(r"training: 100%.*\| 5/5 \[\d\d:\d\d<\d\d:\d\d", drawn)  # elapsed<ETA
    assert "loss=0.2" in drawn
    assert re.fullmatch(r"\d\d:\d\d", progress.eta())


def test_a_resumed_run_counts_from_where_it_was():
    terminal = Terminal()
    run(Progress(5, "training", initial=3, stream=terminal, rank=0), 2)
    assert " 3/5 " in terminal.getvalue() and " 5/5 " in terminal.getvalue()


def test_a_stream_that_is_not_a_terminal_gets_no_carriage_returns(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    setup_logging()
    stream = io.StringIO()
    progress = Progress(3, "encoding", "prompt", log_every_s=0.0, stream=stream)  # a line per update
    assert not progress.drawing
    run(progress, 3)
    err = capsys.readouterr().err
    assert stream.getvalue() == "" and "\r" not in err
    assert re.search(r"encoding: 3/3 prompt \(\S+ prompt/s, ETA 00:00\)", err)


def test_without_periodic_lines_a_pipe_gets_nothing(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    setup_logging()
    run(Progress(3, "training", log_every_s=None, stream=io.StringIO()), 3)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("log_every_s", [None, 0.0])
def test_other_ranks_draw_and_log_nothing(monkeypatch, capsys, log_every_s):
    monkeypatch.setenv("RANK", "1")
    setup_logging(all_ranks=True)  # even where every rank's log lines show
    terminal = Terminal()
    progress = Progress(3, "training", log_every_s=log_every_s, stream=terminal)
    assert not progress.drawing
    run(progress, 3)
    assert terminal.getvalue() == "" and capsys.readouterr().err == ""


def test_log_lines_go_above_an_open_bar_not_into_it(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    setup_logging()
    with Progress(4, "training", rank=0) as progress:
        progress.update(1)
        get_logger("test").info("a log line")
        progress.update(1)
    pieces = re.split(r"[\r\n]", terminal.getvalue())
    line = next(piece for piece in pieces if "a log line" in piece)
    assert line.endswith("INFO phased_dmd_mega.test: a log line") and "training" not in line
    after = terminal.getvalue().split("a log line", 1)[1]
    assert "2/4" in after  # the bar is drawn again below the line


def test_a_stage_header_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    setup_logging()
    announce_stage(2, 4, "Phased DMD training")
    assert capsys.readouterr().err.count("\n") == 1
