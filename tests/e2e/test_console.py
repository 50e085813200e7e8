"""What a person sees of a tiny `phased-dmd train` under torchrun when stderr is not a terminal
(a CI log, a file): the trainer's log lines with their ETA, no progress bar's carriage returns,
and none of the dependency noise known_noise.py filters by name, in the worker processes too."""

import re
import subprocess
import sys

import pytest

from phased_dmd_mega.known_noise import KNOWN_LOG_RECORDS, KNOWN_WARNINGS

from helpers.tiny_runs import write_config


@pytest.mark.slow
def test_tiny_train_run_logs_its_lines_and_no_known_noise(tmp_path):
    config = write_config(tmp_path, phases={"iterations_per_phase": 1}, checkpoint={"save_every": 100})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "phased_dmd_mega", "train", "--config", str(config)]
    # Tensor parallel with Megatron sequence parallelism: the layers whose first calls advise
    # CUDA_DEVICE_MAX_CONNECTIONS and whose collectives torch deprecates.
    command += ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    for known in KNOWN_WARNINGS:
        assert not re.search(known.message, err), f"{known.name} reached stderr:\n{err}"
    for record in KNOWN_LOG_RECORDS:
        assert not re.search(record.message, err), f"{record.name} reached stderr:\n{err}"
    assert "\r" not in err  # no bar drawn into a file
    assert re.search(r"\[rank 0\] INFO phased_dmd_mega\.distill\.trainer: iter 1/2 phase 0 .* ETA \d\d:\d\d", err)
    assert re.search(r"iter 2/2 phase 1 .* ETA 00:00", err)
    assert "[rank 1]" not in err  # rank 0 alone speaks
