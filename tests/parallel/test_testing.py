"""The multi-process test runner itself: results by rank, remote errors, dead and hung ranks,
no CUDA for the ranks unless asked; and the suite's rule (conftest.py) that hides CUDA from
every run but ``pytest -m gpu``."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from phased_dmd_mega.testing import DistributedRunError, run_distributed

from helpers import REPO_ROOT

CUDA_VARIABLES = ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")
# In a rank, read when the function's module is imported (unpickling it), before any of its code.
AT_IMPORT = {name: os.environ.get(name) for name in CUDA_VARIABLES}


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


def _cuda_variables():
    return AT_IMPORT, {name: os.environ.get(name) for name in CUDA_VARIABLES}


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


@pytest.mark.slow
def test_ranks_see_no_cuda_unless_asked(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # as on a GPU host
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden = {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    assert run_distributed(_cuda_variables, 2) == [(hidden, hidden)] * 2  # set before the rank imports anything
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and "TRITON_INTERPRET" not in os.environ  # this process's own
    inherited = {"CUDA_VISIBLE_DEVICES": "0", "TRITON_INTERPRET": None}
    assert run_distributed(_cuda_variables, 1, use_cuda=True) == [(inherited, inherited)]


PROBE = """
import os

import pytest

print("seen:", {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")})


@pytest.mark.gpu
def test_on_a_gpu():
    pass


def test_on_a_cpu():
    pass
"""


def _pytest_with_the_suites_conftest(folder: Path, *args: str) -> str:
    """The output of a pytest run, with this suite's conftest.py, on PROBE; the GPU ids given
    ("-1": none, on any host) and TRITON_INTERPRET unset."""
    shutil.copy(REPO_ROOT / "tests" / "conftest.py", folder / "conftest.py")
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n    slow: long\n")
    (folder / "test_probe.py").write_text(PROBE)
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-s", "-rs", "-p", "no:cacheprovider", *args],
        cwd=folder,
        env={**env, "CUDA_VISIBLE_DEVICES": "-1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _skip_reasons(out: str):
    return re.findall(r"^SKIPPED \[1\] test_probe\.py:\d+: (.*)$", out, re.MULTILINE)


@pytest.mark.slow
@pytest.mark.parametrize(
    "marks, gpu_test_collected",
    [([], True), (["-m", "not gpu"], False), (["-m", "not slow"], True)],
    ids=["no -m", "not gpu", "not slow"],
)
def test_the_suite_hides_cuda_from_a_run_that_is_not_for_gpu_tests(tmp_path, marks, gpu_test_collected):
    out = _pytest_with_the_suites_conftest(tmp_path, *marks)
    assert "seen: {'CUDA_VISIBLE_DEVICES': '', 'TRITON_INTERPRET': '1'}" in out
    assert "1 passed" in out
    assert _skip_reasons(out) == (["needs CUDA: run `pytest -m gpu` on a CUDA machine"] if gpu_test_collected else [])


@pytest.mark.slow
def test_the_suite_leaves_cuda_to_a_run_of_gpu_tests(tmp_path):
    out = _pytest_with_the_suites_conftest(tmp_path, "-m", "gpu")
    assert "seen: {'CUDA_VISIBLE_DEVICES': '-1', 'TRITON_INTERPRET': None}" in out
    assert _skip_reasons(out) == ["needs CUDA"] and "1 deselected" in out
