"""Rank-aware logging: the rank in every line, rank 0 only unless all ranks are asked for."""

import logging

import pytest

from phased_dmd_mega.log import get_logger, setup_logging


@pytest.mark.parametrize("rank, all_ranks, shown", [("0", False, True), ("1", False, False), ("1", True, True)])
def test_rank_filter(monkeypatch, capsys, rank, all_ranks, shown):
    monkeypatch.setenv("RANK", rank)
    setup_logging("INFO", all_ranks=all_ranks)
    get_logger("test").info("hello %d", 5)
    err = capsys.readouterr().err
    assert (f"[rank {rank}] INFO phased_dmd_mega.test: hello 5" in err) is shown


def test_setup_twice_does_not_duplicate_lines(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    setup_logging()
    setup_logging()
    get_logger("phased_dmd_mega.x").warning("once")
    assert capsys.readouterr().err.count("once") == 1
    ours = [h for h in logging.getLogger("phased_dmd_mega").handlers if h.get_name() == "phased_dmd_mega"]
    assert len(ours) == 1


def test_lines_go_to_the_stderr_of_the_moment_not_the_one_at_setup(monkeypatch):
    """A caller that swaps sys.stderr and closes the old one (pytest's capture between tests,
    a tool's redirection) must not leave the logger writing to a closed file."""
    import io
    import sys

    monkeypatch.setenv("RANK", "0")
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging()
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("phased_dmd_mega.x").warning("after the swap")
    assert "after the swap" in second.getvalue() and "Logging error" not in second.getvalue()
