"""examples/run_wan22_a14b.sh and run_qwen_image.sh in dry-run mode on CPU: the torchrun
command they would run (cluster layout from the variables or from SLURM's), the resolved
config and memory estimate they print, and the errors for missing paths and parallel sizes
that do not fit the GPUs."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT

ROOT = REPO_ROOT


@pytest.fixture
def inputs(tmp_path):
    """A teacher folder and a prompt cache that exist (the dry run reads neither)."""
    weights, cache = tmp_path / "weights", tmp_path / "prompts"
    weights.mkdir()
    cache.mkdir()
    (cache / "prompts.json").write_text('{"shards": []}')
    return {
        "WAN_WEIGHTS": str(weights),
        "QWEN_WEIGHTS": str(weights),
        "PROMPT_CACHE": str(cache),
        "OUTPUT": str(tmp_path / "out"),
    }


def run_script(script, env, *args):
    ours = ("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "GPUS_", "CUDA_DEVICE_MAX_CONNECTIONS")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    full_env = {**clean, "PYTHON": sys.executable, "DRY_RUN": "1", **env}
    return subprocess.run(
        ["bash", str(ROOT / "examples" / script), *args],
        env=full_env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def launch_command(stdout):
    """The printed command, as arguments."""
    lines = stdout.splitlines()
    marker = next(i for i, line in enumerate(lines) if line.startswith("# launch command"))
    return shlex.split(lines[marker + 1])


def option(command, name):
    return command[command.index(name) + 1]


def test_wan_dry_run_prints_config_estimate_and_command(inputs, tmp_path):
    result = run_script(
        "run_wan22_a14b.sh",
        {
            **inputs,
            "GPUS_PER_NODE": "8",
            "NNODES": "2",
            "NODE_RANK": "1",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "4242",
        },
        "--dry-run",
        "optimizer.generator.lr=1e-5",
        "phases.iterations_per_phase=10",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "teacher_path: " + inputs["WAN_WEIGHTS"] in out and "iterations_per_phase: 10" in out  # resolved config
    assert "total (estimate)" in out and "wan2.2-t2v-a14b" in out
    assert "global batch: data.batch_size 2 x 2 data-parallel ranks = 4" in out
    command = launch_command(out)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert [
        option(command, o) for o in ("--nnodes", "--node_rank", "--nproc_per_node", "--master_addr", "--master_port")
    ] == ["2", "1", "8", "node7", "4242"]
    train = command[command.index("-m", 3) :]
    assert train[:5] == ["-m", "phased_dmd_mega", "train", "--config", str(ROOT / "examples/wan22_t2v_a14b.yaml")]
    out_dir = inputs["OUTPUT"]
    assert train[5:] == [
        f"model.teacher_path={inputs['WAN_WEIGHTS']}",
        f"data.prompt_cache={inputs['PROMPT_CACHE']}",
        f"run.output_dir={out_dir}",
        f"checkpoint.dir={out_dir}/checkpoints",
        f"logging.tensorboard_dir={out_dir}/tensorboard",
        "optimizer.generator.lr=1e-5",
        "phases.iterations_per_phase=10",
    ]
    assert not Path(out_dir).exists()  # a dry run writes nothing


def test_slurm_variables_give_the_layout(inputs, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # what `scontrol show hostnames gpu[03-04]` prints
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[03-04]" ] && printf "gpu03\\ngpu04\\n"\n')
    scontrol.chmod(0o755)
    env = {
        **inputs,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[03-04]",
        "SLURM_GPUS_ON_NODE": "8",
        "CONFIG": "examples/qwen_image.yaml",
    }
    result = run_script("run_qwen_image.sh", env)
    assert result.returncode == 0, result.stderr
    command = launch_command(result.stdout)
    assert [
        option(command, o) for o in ("--nnodes", "--node_rank", "--nproc_per_node", "--master_addr", "--master_port")
    ] == ["2", "1", "8", "gpu03", "29500"]
    assert f"model.teacher_path={inputs['QWEN_WEIGHTS']}" in command
    assert "global batch: data.batch_size 32 x 2 data-parallel ranks = 64" in result.stdout


@pytest.mark.parametrize(
    "change, message",
    [
        ({"WAN_WEIGHTS": "/nonexistent/wan"}, "WAN_WEIGHTS=/nonexistent/wan: no such directory"),
        ({"WAN_WEIGHTS": ""}, "WAN_WEIGHTS is not set"),
        ({"PROMPT_CACHE": "/nonexistent/cache"}, "PROMPT_CACHE=/nonexistent/cache: no such directory"),
        ({"CONFIG": "examples/nope.yaml"}, "CONFIG=examples/nope.yaml: no such file"),
    ],
)
def test_missing_paths_stop_the_launch(inputs, change, message):
    result = run_script("run_wan22_a14b.sh", {**inputs, "GPUS_PER_NODE": "8", **change})
    assert result.returncode == 2
    assert f"run_wan22_a14b.sh: error: {message}" in result.stderr
    assert "launch command" not in result.stdout


def test_a_folder_without_prompts_json_is_not_a_prompt_cache(inputs):
    result = run_script("run_wan22_a14b.sh", {**inputs, "GPUS_PER_NODE": "8", "PROMPT_CACHE": inputs["WAN_WEIGHTS"]})
    assert result.returncode == 2
    assert "is not a prompt cache: prompts.json is missing" in result.stderr


@pytest.mark.parametrize(
    "env, overrides, message",
    [
        (
            {"GPUS_PER_NODE": "4"},
            [],
            "parallel.tensor_parallel=4 x parallel.ulysses_parallel=2 = 8 GPUs per model replica, "
            "but the launch has 4 (1 node(s) x 4 GPUs)",
        ),
        (
            {"GPUS_PER_NODE": "8", "NNODES": "3", "MASTER_ADDR": "node0"},
            ["parallel.tensor_parallel=8", "parallel.ulysses_parallel=2"],
            "parallel.tensor_parallel=8 x parallel.ulysses_parallel=2 = 16 "
            "does not divide the 24 GPUs (3 node(s) x 8 GPUs)",
        ),
        ({"GPUS_PER_NODE": "8", "NNODES": "2"}, [], "MASTER_ADDR must be set for a launch on 2 nodes"),
        (
            {"GPUS_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "node0"},
            [],
            "NODE_RANK must be in 0..1 for NNODES=2, got '2'",
        ),
        ({"GPUS_PER_NODE": "eight"}, [], "GPUS_PER_NODE must be a positive integer, got 'eight'"),
        (
            {"GPUS_PER_NODE": "8", "NNODES": "2", "MASTER_ADDR": "node0"},
            ["parallel.tensor_parallel=8", "parallel.ulysses_parallel=2"],
            "wan2.2-t2v-a14b has 40 attention heads, not divisible by tensor_parallel 8 x ulysses_parallel 2 = 16",
        ),
    ],
)
def test_a_layout_that_does_not_fit_stops_the_launch(inputs, env, overrides, message):
    result = run_script("run_wan22_a14b.sh", {**inputs, **env}, *overrides)
    assert result.returncode == 2
    assert message in result.stderr
    assert "launch command" not in result.stdout


def test_bad_overrides_and_arguments_are_reported(inputs):
    bad_key = run_script("run_wan22_a14b.sh", {**inputs, "GPUS_PER_NODE": "8"}, "phases.num_phases=3")
    assert bad_key.returncode == 2
    assert "configuration error: phases.num_phases: 3 does not divide num_steps 4" in bad_key.stderr
    stray = run_script("run_wan22_a14b.sh", {**inputs, "GPUS_PER_NODE": "8"}, "fast")
    assert stray.returncode == 2 and "unexpected argument 'fast'" in stray.stderr


def test_the_launch_exports_cuda_device_max_connections_1(inputs, tmp_path):
    """megatron's TP/SP communication overlap relies on it: the dry run shows it, and torchrun
    gets it, also when the environment had another value."""
    dry = run_script("run_wan22_a14b.sh", {**inputs, "GPUS_PER_NODE": "8", "CUDA_DEVICE_MAX_CONNECTIONS": "8"})
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[lines.index("export CUDA_DEVICE_MAX_CONNECTIONS=1") + 1].startswith("# launch command")
    assert "CUDA_DEVICE_MAX_CONNECTIONS=8 replaced by 1" in dry.stderr
    # A real launch, with a python that answers for torchrun by printing what it was given.
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\nif [ "$2" = torch.distributed.run ]; then\n'
        f'  echo "torchrun sees CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS"; exit 0\nfi\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    python.chmod(0o755)
    for given in ({}, {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}):
        env = {**inputs, "GPUS_PER_NODE": "8", "DRY_RUN": "0", "PYTHON": str(python), **given}
        launched = run_script("run_wan22_a14b.sh", env)
        assert launched.returncode == 0, launched.stderr
        assert launched.stdout.splitlines()[-1] == "torchrun sees CUDA_DEVICE_MAX_CONNECTIONS=1"


def test_help_describes_the_variables():
    result = run_script("run_qwen_image.sh", {}, "--help")
    assert result.returncode == 0
    assert "QWEN_WEIGHTS=" in result.stdout and "SLURM" in result.stdout
