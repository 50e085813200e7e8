"""bench/bench_iteration.py runs (tiny preset, CPU) and its time split accounts for the whole
iteration: the parts add up to the iteration's time, the FLOPs are the trainer's count."""

import importlib.util
import json

import pytest

from helpers import REPO_ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_iteration", REPO_ROOT / "bench" / "bench_iteration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["wan", "qwen_image"])
def test_the_parts_add_up_to_the_iteration(tmp_path, capsys, family):
    bench = load_bench()
    out = tmp_path / "figures.json"
    argv = ["--family", family, "--preset", "tiny", "--resolution", "1x64x64", "--iterations", "1", "--repeats", "1"]
    argv += ["--json", str(out)]
    assert bench.main(argv) == 0
    figures = json.loads(out.read_text())
    iteration = figures["iteration"]
    assert set(iteration["parts"]) == set(bench.PARTS)
    assert sum(iteration["parts"].values()) == pytest.approx(iteration["seconds_per_iteration"], rel=0.05)
    assert iteration["parts"]["rollouts"] > 0 and iteration["parts"]["backward"] > 0
    assert 0 < iteration["dit_share"] <= 1 and iteration["model_flops"] > 0
    assert figures["diffusers"]["ours_seconds"] > 0 and figures["diffusers"]["diffusers_seconds"] > 0
    assert "| **iteration** |" in capsys.readouterr().out


def test_the_bench_puts_back_what_it_instruments(tmp_path):
    import torch

    from phased_dmd_mega import losses
    from phased_dmd_mega.distill import phased, roles

    before = (torch.Tensor.backward, losses.dmd_loss, roles.call_dit, phased.rollout_to_phase_end)
    assert (
        load_bench().main(["--preset", "tiny", "--resolution", "1x64x64", "--iterations", "1", "--no-diffusers"]) == 0
    )
    assert (torch.Tensor.backward, losses.dmd_loss, roles.call_dit, phased.rollout_to_phase_end) == before


def test_the_optimizer_step_bench_times_every_optimizer_and_kernel(tmp_path, capsys):
    from dataclasses import replace

    from phased_dmd_mega import parallel
    from phased_dmd_mega.models import WAN_PRESETS, ModelParallelOptions, WanModel

    spec = importlib.util.spec_from_file_location("bench_opt", REPO_ROOT / "bench" / "bench_optimizer_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "figures.json"
    assert bench.main(["--preset", "tiny", "--num-layers", "1", "--repeats", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    parallel.initialize(seed=0)
    try:
        model = WanModel(replace(WAN_PRESETS["tiny"], num_layers=1), ModelParallelOptions(attention_backend="sdpa"))
    finally:
        parallel.destroy()
    assert figures["parameters"] == sum(p.numel() for p in model.parameters())
    assert sorted(figures["seconds"]) == sorted(bench.name(kind) for kind in bench.KINDS)
    assert all(s > 0 for s in [*figures["seconds"].values(), *figures["gradient_norm_seconds"].values()])
    assert "| per-rank / fused |" in capsys.readouterr().out
