"""examples/run_wan22_a14b.sh and run_qwen_image.sh in dry-run mode on CPU: the torchrun
command they would run (cluster layout from the variables or from SLURM's), the resolved
config and memory estimate they print, and the errors for missing paths and parallel sizes
that do not fit the GPUs. And a real launch on two nodes (two launchers on this machine, on
CPU over gloo) that trains a tiny teacher, and a second one that resumes its checkpoint."""

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO_ROOT
from helpers.tiny_runs import save_wan_teacher

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
    ours = ("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "GPUS_", "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_ELASTIC_")
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


def python_answering_for_torchrun(folder: Path, variable: str) -> Path:
    """A python for a real launch that answers for torchrun by printing the ``variable`` it sees."""
    python = folder / "python"
    python.write_text(
        f'#!/bin/sh\nif [ "$2" = torch.distributed.run ]; then\n'
        f'  echo "torchrun sees {variable}=${variable}"; exit 0\nfi\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    python.chmod(0o755)
    return python


def test_the_launch_gives_torchrun_a_shutdown_timeout_that_fits_a_save(inputs, tmp_path):
    """torchrun SIGKILLs its workers this many seconds after passing SIGTERM on (30 by default):
    the launch sets 300, or keeps the one it is given."""
    dry = run_script("run_wan22_a14b.sh", {**inputs, "GPUS_PER_NODE": "8"})
    assert dry.returncode == 0, dry.stderr
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300" in dry.stdout.splitlines()
    python = python_answering_for_torchrun(tmp_path, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    for given, seen in (({}, "300"), ({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "900"}, "900")):
        env = {**inputs, "GPUS_PER_NODE": "8", "DRY_RUN": "0", "PYTHON": str(python), **given}
        launched = run_script("run_wan22_a14b.sh", env)
        assert launched.returncode == 0, launched.stderr
        assert launched.stdout.splitlines()[-1] == f"torchrun sees TORCH_ELASTIC_SHUTDOWN_TIMEOUT={seen}"
    bad = run_script("run_wan22_a14b.sh", {**inputs, "GPUS_PER_NODE": "8", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "soon"})
    assert bad.returncode == 2
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a positive integer, got 'soon'" in bad.stderr


def test_the_launch_exports_cuda_device_max_connections_1(inputs, tmp_path):
    """megatron's TP/SP communication overlap relies on it: the dry run shows it, and torchrun
    gets it, also when the environment had another value."""
    dry = run_script("run_wan22_a14b.sh", {**inputs, "GPUS_PER_NODE": "8", "CUDA_DEVICE_MAX_CONNECTIONS": "8"})
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[lines.index("export CUDA_DEVICE_MAX_CONNECTIONS=1") + 1].startswith("# launch command")
    assert "CUDA_DEVICE_MAX_CONNECTIONS=8 replaced by 1" in dry.stderr
    python = python_answering_for_torchrun(tmp_path, "CUDA_DEVICE_MAX_CONNECTIONS")
    for given in ({}, {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}):
        env = {**inputs, "GPUS_PER_NODE": "8", "DRY_RUN": "0", "PYTHON": str(python), **given}
        launched = run_script("run_wan22_a14b.sh", env)
        assert launched.returncode == 0, launched.stderr
        assert launched.stdout.splitlines()[-1] == "torchrun sees CUDA_DEVICE_MAX_CONNECTIONS=1"


def test_help_describes_the_variables():
    result = run_script("run_qwen_image.sh", {}, "--help")
    assert result.returncode == 0
    assert "QWEN_WEIGHTS=" in result.stdout and "SLURM" in result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_nodes(env, *overrides):
    """The launcher on node ranks 0 and 1 at once (one process per node, on CPU); their outputs."""
    ours = ("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "GPUS_", "DRY_RUN")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    cluster = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "GPUS_PER_NODE": "1"}
    nodes = [
        subprocess.Popen(
            ["bash", str(ROOT / "examples" / "run_wan22_a14b.sh"), *overrides],
            env={**clean, "PYTHON": sys.executable, **env, **cluster, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-3000:]}"
    return outputs


def losses(run: Path):
    keep = ("iteration", "phase", "dmd_loss", "fake_loss", "real_fake_gap", "generator_grad_norm", "fake_grad_norm")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keep} for r in records]


@pytest.mark.slow
def test_a_two_node_launch_trains_and_a_second_one_resumes_its_checkpoint(tmp_path):
    """NNODES=2 with NODE_RANK 0 and 1 as two launchers on this machine (data parallel 2 across
    the nodes): the tiny CPU recipe on a tiny Wan teacher of its "tiny" preset for 4 iterations,
    checkpointing each; then a second two-node launch resumes from the checkpoint of iteration 1
    and trains iterations 2 and 3 to the first launch's losses."""
    tiny = {"attention_head_dim": 16, "ffn_dim": 128, "text_dim": 32, "freq_dim": 32}
    teacher = save_wan_teacher(tmp_path / "teacher", in_channels=16, out_channels=16, **tiny)
    from phased_dmd_mega.prompt_cache.writer import write_embeddings_cache

    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(tokens, 32, generator=gen) for tokens in (5, 7, 3, 6)]
    cache = write_embeddings_cache(tmp_path / "prompts", rows, torch.zeros(4, 32))
    env = {
        "CONFIG": str(ROOT / "examples/configs/tiny_cpu.yaml"),
        "WAN_WEIGHTS": str(teacher),
        "PROMPT_CACHE": str(cache),
    }
    overrides = [
        "parallel.tensor_parallel=1",
        "phases.iterations_per_phase=2",
        "phases.fake_updates_per_generator_update=2",
        "data.batch_size=2",
        "checkpoint.save_every=1",
        "checkpoint.keep_last=10",
    ]
    first, second = tmp_path / "first", tmp_path / "second"
    node0, _ = launch_two_nodes({**env, "OUTPUT": str(first)}, *overrides)
    assert "training phased_dmd: 2 phases, 4 iterations, 2 processes (TP 1, Ulysses 1, DP 2)" in node0
    saved = sorted(p.name for p in (first / "checkpoints").glob("iter_*"))
    assert saved == [f"iter_{i:07d}" for i in range(4)]
    resume = f"checkpoint.resume={first / 'checkpoints' / 'iter_0000001'}"
    node0, _ = launch_two_nodes({**env, "OUTPUT": str(second)}, *overrides, resume)
    assert "resumed from" in node0 and "(iteration 1)" in node0
    assert [r["iteration"] for r in losses(first)] == [0, 1, 2, 3]
    assert losses(second) == losses(first)[2:]
    assert (second / "checkpoints" / "iter_0000003").is_dir()
