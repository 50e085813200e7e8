"""The README's main job end to end, shortened: two gloo processes at TP=2 through teacher
pretraining, both distillations and the evaluation. Quality is measured by `make demo`
(BENCHMARKS.md); this checks that every stage runs and reports."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT

ROOT = REPO_ROOT
METHODS = ("teacher_40_steps", "teacher_4_steps", "phased_dmd", "dmd_sgts")


def run_demo(out: Path, script: str = "examples/tiny_demo.py", *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / script),
        "--config",
        str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"),
        "--teacher-steps",
        "20",
        "--iterations",
        "2",
        "--eval-per-class",
        "8",
        *extra,
        f"run.output_dir={out}",
        "phases.fake_updates_per_generator_update=1",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_tiny_demo_runs_every_stage_and_reuses_its_teacher(tmp_path):
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for method in METHODS:
        assert set(summary[method]) >= {"distance_to_data", "mode_coverage", "seconds", "diversity"}
        assert summary[method]["diversity"] > 0
        assert math.isfinite(summary[method]["distance_to_data"]) and 0 <= summary[method]["mode_coverage"] <= 1
    # True data samples (the reference row) sit at the data noise: the RMS of N(0, 0.05^2) over 256 values.
    assert summary["data_samples"]["distance_to_data"] == pytest.approx(0.05, abs=0.003)
    assert summary["settings"]["tensor_parallel"] == 2
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert "teacher pretraining (20 flow-matching steps)" in first.stderr  # not the shipped teacher's settings
    assert "raw," in first.stdout and "above the data floor" in first.stdout and "acceptance" not in first.stdout
    against = summary["phased_dmd"]["against_teacher_4_steps"]
    d, d4, floor = (summary[k]["distance_to_data"] for k in ("phased_dmd", "teacher_4_steps", "data_samples"))
    assert against == pytest.approx({"raw": d / d4, "above_floor": (d - floor) / (d4 - floor)})
    # A quiet console: megatron's advice for TE, Apex and CUDA streams means nothing on a CPU run.
    assert "Warning" not in first.stderr, [line for line in first.stderr.splitlines() if "Warning" in line]
    second = run_demo(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "teacher: reusing" in second.stderr

    # The regression ceiling (bench/demo_regression_oracle.py) finds the same teacher and scores
    # with the same evaluation noise: its own Euler loop gives the demo's 4-step teacher figure.
    oracle = run_demo(tmp_path, "bench/demo_regression_oracle.py", "--pairs", "96", "--updates", "3", "--batch", "8")
    assert oracle.returncode == 0, oracle.stderr[-3000:]
    assert "teacher: reusing" in oracle.stderr
    ceiling = json.loads((tmp_path / "regression_oracle.json").read_text())
    assert ceiling["teacher_4_steps"]["distance_to_data"] == pytest.approx(
        summary["teacher_4_steps"]["distance_to_data"], rel=1e-5
    )
    assert ceiling["settings"]["phase_times"] == pytest.approx([0.8333333, 0.625, 0.0])
    assert math.isfinite(ceiling["regressed_two_steps"]["distance_to_data"])
    assert ceiling["regressed_two_steps"]["training_pair_rms"] > 0


def test_oracle_fine_grid_is_the_samplers_spacing():
    sys.path.insert(0, str(ROOT / "bench"))
    from demo_regression_oracle import fine_times

    from phased_dmd_mega.schedule import step_table

    assert fine_times(1.0, 0.0, 4, 5.0) == pytest.approx(list(step_table(4, 5.0)), abs=1e-12)
    stretch = fine_times(1.0, 0.8333333333333334, 30, 5.0)
    assert stretch[0] == pytest.approx(1.0, abs=1e-12) and stretch[-1] == pytest.approx(0.8333333333333334, abs=1e-12)
    assert all(a > b for a, b in zip(stretch, stretch[1:]))


def test_the_shipped_teacher_is_the_default_demos_and_fits_its_model():
    """`make demo` finds its teacher in examples/demo_teacher/ (no pretraining): the files are
    named by the default settings, and hold the demo model's tensors (TP 2 shards)."""
    sys.path.insert(0, str(ROOT / "examples"))
    import tiny_demo
    from safetensors import safe_open

    from phased_dmd_mega import parallel
    from phased_dmd_mega.config import load_config
    from phased_dmd_mega.models import ModelParallelOptions

    args = tiny_demo.demo_parser("demo").parse_args([])
    cfg = load_config(ROOT / args.config, [])
    settings = tiny_demo.teacher_settings(args, cfg, cfg.parallel.tensor_parallel)
    parallel.initialize(seed=0)
    try:
        whole = tiny_demo.build_model(ModelParallelOptions(attention_backend="sdpa"), **tiny_demo.model_size_of(args))
        shapes = {name: tuple(t.shape) for name, t in tiny_demo.teacher_tensors(whole).items()}
    finally:
        parallel.destroy()
    for rank in range(cfg.parallel.tensor_parallel):
        path = tiny_demo.teacher_file(tiny_demo.SHIPPED_TEACHERS, settings, rank)
        assert path.is_file(), f"{path} missing: run `make demo-teacher`"
        with safe_open(str(path), "pt") as shard:
            assert set(shard.keys()) == set(shapes)
            for name in shard.keys():
                got, full = shard.get_slice(name).get_shape(), shapes[name]
                halves = [tuple(n // 2 if i == d else n for i, n in enumerate(full)) for d in range(len(full))]
                assert tuple(got) in [full, *halves], name
