"""The multi-process test runner itself: results by rank, remote errors, dead and hung ranks."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from phased_dmd_mega.testing import DistributedRunError, run_distributed


def _rank_sum(scale):
    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return rank, value * scale, os.environ["WORLD_SIZE"]


def _raise_on_rank_one():
    if os.environ["RANK"] == "1":
        raise KeyError("the key at fault")
    return "fine"


def _die_on_rank_one():
    if os.environ["RANK"] == "1":
        os._exit(3)
    time.sleep(60)


def _hang():
    time.sleep(60)


@pytest.mark.slow
def test_results_come_back_in_rank_order_from_real_collectives():
    results = run_distributed(_rank_sum, 3, 2.0)
    assert [r[0] for r in results] == [0, 1, 2]
    assert all(torch.equal(r[1], torch.tensor([12.0])) and r[2] == "3" for r in results)


@pytest.mark.slow
def test_exception_on_a_rank_is_raised_with_its_traceback():
    with pytest.raises(DistributedRunError, match=r"rank 1 of 2 raised:(.|\n)*KeyError: 'the key at fault'"):
        run_distributed(_raise_on_rank_one, 2)


@pytest.mark.slow
def test_a_dead_rank_fails_the_call_instead_of_hanging():
    started = time.monotonic()
    with pytest.raises(DistributedRunError, match="rank 1 died with exit code 3"):
        run_distributed(_die_on_rank_one, 2, timeout_s=50)
    assert time.monotonic() - started < 40


@pytest.mark.slow
def test_a_hung_rank_times_out():
    with pytest.raises(DistributedRunError, match=r"ranks \[0\] did not finish within 3 s"):
        run_distributed(_hang, 1, timeout_s=3)
