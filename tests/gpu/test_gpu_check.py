"""bench/gpu_check.py without a GPU: its refusal without CUDA, and the report logic run on real
subprocesses (small python -c stages that pass, fail or outlive their budget); make gpu-wheels."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from helpers import REPO_ROOT

ROOT = REPO_ROOT
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
from gpu_check import FAILED, NOT_RUN, PASSED  # noqa: E402

SCRIPT = ROOT / "bench" / "gpu_check.py"


def python_stage(name, code, budget_s=30, summarize=gpu_check.by_exit_status, prepare=None):
    return gpu_check.Stage(name, name, [sys.executable, "-c", code], budget_s, summarize, prepare)


def context(tmp_path, deadline_s=120):
    start = time.monotonic()
    return gpu_check.Context(tmp_path, dict(os.environ), tmp_path, start, start + deadline_s)


def process_gone(pid):
    """Exited (a zombie waiting for a reaper counts): nothing of it runs any more."""
    fields = gpu_check.proc_stat(pid)
    return fields is None or fields[0] == "Z"


def test_without_cuda_it_stops_at_once_with_one_line_and_no_traceback(tmp_path):
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "check")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert time.monotonic() - start < 30  # importing torch is most of it
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1 and "no CUDA device was found" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert not (tmp_path / "check").exists()


def test_stages_pass_fail_and_time_out_and_the_later_ones_still_run(tmp_path, capsys):
    pid_file = tmp_path / "grandchild.pid"
    # Like torchrun's workers: a child in a session of its own, outside the stage's process group.
    spawns_and_sleeps = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
        "start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('still going', flush=True)\n"
        "time.sleep(120)\n"
    )
    stages = [
        python_stage("first", "print('fine')"),
        python_stage("second", "import sys; print('boom'); sys.exit(3)"),
        python_stage("third", spawns_and_sleeps, budget_s=2),
        python_stage("fourth", "print('after the timeout')"),
    ]
    start = time.monotonic()
    records = gpu_check.run_stages(stages, context(tmp_path))
    assert time.monotonic() - start < 2 + gpu_check.KILL_GRACE_S + 15
    assert [r.status for r in records] == [PASSED, FAILED, FAILED, PASSED]
    assert records[1].error.splitlines() == ["exit status 3", "boom"]
    assert records[2].error.splitlines()[0] == "timed out after 2 s"
    assert "still going" in records[2].error  # the tail of its output
    assert process_gone(int(pid_file.read_text()))
    assert (tmp_path / "logs" / "fourth.log").read_text() == "after the timeout\n"
    progress = capsys.readouterr().err.splitlines()
    assert len(progress) == 8 and all(line.startswith("gpu_check.py [") and " s] " in line for line in progress)
    assert progress[4].endswith("third started (budget 2 s)") and "third failed in" in progress[5]
    assert gpu_check.exit_status(records) == 1


def test_a_stage_past_the_overall_deadline_is_not_started_and_fails(tmp_path):
    stages = [python_stage("slow", "import time; time.sleep(60)"), python_stage("late", "print('never')")]
    records = gpu_check.run_stages(stages, context(tmp_path, deadline_s=gpu_check.MIN_STAGE_S + 1))
    assert records[0].status == FAILED and records[0].error.startswith(f"timed out after {gpu_check.MIN_STAGE_S + 1} s")
    assert records[1].status == FAILED and records[1].error.startswith("not started: the overall deadline")
    assert not (tmp_path / "logs" / "late.log").exists()


def test_exit_status_is_zero_only_without_failed_stages():
    def record(status):
        return gpu_check.StageRecord("s", "s", status, 1.0, 10.0, "true", {}, None)

    assert gpu_check.exit_status([record(PASSED), record(NOT_RUN)]) == 0
    assert gpu_check.exit_status([record(PASSED), record(FAILED), record(NOT_RUN)]) == 1


BLOCK_ROWS = [
    {
        "backend": "sdpa",
        "layers": "local",
        "fp8": None,
        "status": "ok",
        "ms": 412.5,
        "tflops": 480.2,
        "fraction_of_matmul": 0.61,
        "error": None,
    },
    {
        "backend": "flash",
        "layers": "local",
        "fp8": None,
        "status": "not installed",
        "ms": None,
        "tflops": None,
        "fraction_of_matmul": None,
        "error": None,
    },
    {
        "backend": "te",
        "layers": "transformer_engine",
        "fp8": None,
        "status": "not installed",
        "ms": None,
        "tflops": None,
        "fraction_of_matmul": None,
        "error": None,
    },
    {
        "backend": "te",
        "layers": "transformer_engine",
        "fp8": "delayed",
        "status": "not installed",
        "ms": None,
        "tflops": None,
        "fraction_of_matmul": None,
        "error": None,
    },
]


def blocks_stage(tmp_path, rows, exit_code=0):
    """A stand-in for bench_blocks.py --json: a subprocess that writes the rows and exits."""
    path = tmp_path / "blocks.json"
    code = f"import json, sys; open({str(path)!r}, 'w').write({json.dumps(json.dumps(rows))}); sys.exit({exit_code})"
    return python_stage("bench_blocks_wan", code, summarize=lambda o: gpu_check.summarize_blocks(path, o))


def test_not_installed_block_rows_are_not_run_and_fail_nothing(tmp_path):
    (record,) = gpu_check.run_stages([blocks_stage(tmp_path, BLOCK_ROWS)], context(tmp_path))
    assert record.status == PASSED and record.error is None
    assert record.details["not_run"] == ["flash/local", "te/transformer_engine", "te/transformer_engine/fp8 delayed"]
    assert [r["status"] for r in record.details["rows"]] == ["ok", NOT_RUN, NOT_RUN, NOT_RUN]
    assert gpu_check.exit_status([record]) == 0


def test_a_failed_block_row_fails_the_stage_with_its_error(tmp_path):
    rows = [dict(BLOCK_ROWS[0]), dict(BLOCK_ROWS[3], status="failed", error="RuntimeError: no FP8 kernel")]
    (record,) = gpu_check.run_stages([blocks_stage(tmp_path, rows)], context(tmp_path))
    assert record.status == FAILED
    assert record.error == "te/transformer_engine/fp8 delayed: RuntimeError: no FP8 kernel"


def test_malformed_block_rows_fail_naming_the_file(tmp_path):
    (record,) = gpu_check.run_stages([blocks_stage(tmp_path, [{"backend": "sdpa"}])], context(tmp_path))
    assert record.status == FAILED and str(tmp_path / "blocks.json") in record.error


def test_pytest_counts_and_failing_names_come_from_the_junit_file(tmp_path):
    (tmp_path / "test_fake.py").write_text(
        "import pytest\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert False\n"
        "def test_skips(): pytest.skip('transformer_engine is not installed')\n"
    )
    junit = tmp_path / "junit.xml"
    stage = gpu_check.Stage(
        "pytest_gpu",
        "pytest -m gpu",
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "test_fake.py",
            f"--junitxml={junit}",
        ],
        60,
        lambda o: gpu_check.summarize_pytest(junit, o),
    )
    (record,) = gpu_check.run_stages([stage], context(tmp_path))
    assert record.status == FAILED
    assert {k: record.details[k] for k in ("tests", "passed", "failed", "skipped")} == {
        "tests": 3,
        "passed": 1,
        "failed": 1,
        "skipped": 1,
    }
    assert record.details["failing"] == ["test_fake::test_fails"]
    assert record.details["skipped_tests"][0]["reason"].endswith("transformer_engine is not installed")


def test_report_json_and_markdown(tmp_path):
    rows = json.dumps(json.dumps(BLOCK_ROWS))
    stages = [
        python_stage("environment", "print('probed')"),
        python_stage("pytest_gpu", "import sys; print('1 failed'); sys.exit(1)"),
        gpu_check.Stage(
            "bench_blocks_wan",
            "bench_blocks wan",
            [sys.executable, "-c", f"open('blocks.json', 'w').write({rows})"],
            30,
            lambda o: gpu_check.summarize_blocks(tmp_path / "blocks.json", o),
        ),
    ]
    records = gpu_check.run_stages(stages, context(tmp_path))
    report = gpu_check.write_report(tmp_path, records, "python bench/gpu_check.py --out x", 12.3, date="2026-12-01")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["status"] == FAILED and saved["command"] == "python bench/gpu_check.py --out x"
    assert list(saved["stages"]) == ["environment", "pytest_gpu", "bench_blocks_wan"]
    for name, status in zip(saved["stages"], [PASSED, FAILED, PASSED]):
        stage = saved["stages"][name]
        assert stage["status"] == status and stage["seconds"] > 0 and set(stage) >= {"details", "error", "command"}
    assert saved["stages"]["pytest_gpu"]["error"] == "exit status 1\n1 failed"
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# GPU check, 2026-12-01\n")
    assert "- Command: `python bench/gpu_check.py --out x`" in markdown
    assert "- Result: **failed** (pytest_gpu); 2 of 3 stages passed" in markdown
    assert "| pytest_gpu | failed |" in markdown and "| bench_blocks wan | passed |" in markdown
    assert "| flash | local | - | not run | - | - | - |" in markdown
    assert "| sdpa | local | - | ok | 412.5 | 480 | 61% |" in markdown
    assert "## Errors\n\n### pytest_gpu\n\n```\nexit status 1\n1 failed\n```" in markdown


def test_training_config_is_a_valid_run_of_the_real_architecture(tmp_path):
    from phased_dmd_mega.config import load_config

    (tmp_path / "training" / "old").mkdir(parents=True)  # an earlier check's run
    gpu_check.write_training_config(tmp_path / "training.yaml", tmp_path / "training")
    assert not (tmp_path / "training").exists()
    cfg = load_config(tmp_path / "training.yaml")
    assert (cfg.model.family, cfg.model.preset, cfg.model.teacher_path) == ("wan", "wan2.1-t2v-1.3b", None)
    assert (cfg.model.dtype, cfg.model.lora.rank, cfg.model.attention_backend) == ("bfloat16", 32, "auto")
    assert [r.pixels for r in cfg.data.resolutions] == [(81, 480, 832)] and cfg.data.batch_size == 1
    assert cfg.data.synthetic_prompts > 0 and cfg.checkpoint.resume == "none"
    assert (cfg.phases.num_phases, cfg.phases.iterations_per_phase, cfg.phases.fake_updates_per_generator_update) == (
        2,
        2,
        1,
    )
    assert Path(cfg.run.output_dir) == tmp_path / "training"


def test_training_metrics_give_each_iteration_and_its_memory(tmp_path):
    run_dir = tmp_path / "training"
    run_dir.mkdir()
    lines = [
        {
            "iteration": i,
            "phase": i // 2,
            "step_seconds": 10.0 + i,
            "peak_memory_gib": 40.0 + i,
            "tokens_per_second": 3000.0,
            "dmd_loss": 0.1,
            "fake_loss": 0.2,
        }
        for i in range(4)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summarize = lambda o: gpu_check.summarize_training(run_dir, o)  # noqa: E731
    (record,) = gpu_check.run_stages([python_stage("training", "pass", summarize=summarize)], context(tmp_path))
    assert record.status == PASSED
    assert [r["step_seconds"] for r in record.details["iterations"]] == [10.0, 11.0, 12.0, 13.0]
    assert record.details["peak_memory_gib"] == 43.0 and record.details["mean_step_seconds"] == 12.0
    (run_dir / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    (record,) = gpu_check.run_stages([python_stage("training", "pass", summarize=summarize)], context(tmp_path))
    assert record.status == FAILED and record.error == "1 iterations logged, 4 expected"


def test_bench_losses_json_rows_are_what_the_report_reads(tmp_path):
    import bench_losses

    row = bench_losses.Row(
        op="dmd",
        dtype="bf16",
        elements=100,
        fused_ms=1.0,
        eager_ms=3.0,
        fused_gbps=900.0,
        eager_gbps=300.0,
        copy_fraction=0.3,
        max_rel_diff=1e-6,
    )
    bench_losses.write_json([row], tmp_path / "losses.json")
    assert json.loads((tmp_path / "losses.json").read_text())[0]["eager_ms"] == 3.0
    summarize = lambda o: gpu_check.summarize_losses(tmp_path / "losses.json", o)  # noqa: E731
    (record,) = gpu_check.run_stages([python_stage("bench_losses", "pass", summarize=summarize)], context(tmp_path))
    assert record.status == PASSED and record.details["summary"].startswith("1 cases; fused up to 3.0x eager")
    assert "| dmd | bf16 | 100 | 1.000 | 3.000 | 3.00x | 900 | 30% | 1.0e-06 |" in "\n".join(
        gpu_check.losses_section(record.details)
    )


def test_wheels_install_into_a_site_dir_that_wins_over_the_checkout(tmp_path):
    """pip install --no-index --no-deps --target, of a small stand-in for the project's wheel."""
    wheel = tmp_path / "wheels" / "phased_dmd_mega-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("phased_dmd_mega/__init__.py", "INSTALLED = True\n")
        archive.writestr("phased_dmd_mega/kernels/__init__.py", "")
        archive.writestr(
            "phased_dmd_mega-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: phased-dmd-mega\nVersion: 0.1.0\n"
        )
        archive.writestr(
            "phased_dmd_mega-0.1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr("phased_dmd_mega-0.1.0.dist-info/RECORD", "")
    site = tmp_path / "site"
    ctx = context(tmp_path)
    (record,) = gpu_check.run_stages([gpu_check.wheels_stage(gpu_check.wheel_files(wheel.parent), site)], ctx)
    assert record.status == PASSED, record.error
    code = "import phased_dmd_mega as p, phased_dmd_mega.kernels; print(p.__file__, p.INSTALLED)"
    # From the checkout's root, as the stages run: its own phased_dmd_mega/ must not shadow the wheel's.
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=gpu_check.stage_env(site),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(site / "phased_dmd_mega" / "__init__.py"), "True"]
    gpu_check.unpack_wheels(tmp_path / "unpacked", [wheel])  # the fallback where pip is absent
    assert (tmp_path / "unpacked" / "phased_dmd_mega" / "kernels" / "__init__.py").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "hjson-3.1.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(gpu_check.UserError, match="no phased_dmd_mega-.*whl among the wheels"):
        gpu_check.wheel_files(tmp_path / "other")


def test_check_gpu_wheels_names_duplicates_strays_wrong_tags_and_size(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import check_gpu_wheels

    for name in (
        "deepspeed-0.19.8-py3-none-any.whl",
        "hjson-3.1.0-py3-none-any.whl",
        "hjson-3.0.0-py3-none-any.whl",
        "pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl",
        "six-1.0-py3-none-any.whl",
    ):
        (tmp_path / name).write_bytes(b"x" * 1000)
    (tmp_path / "megatron_core-0.16.1-cp312-cp312-linux_x86_64.whl").write_bytes(b"")
    found = check_gpu_wheels.problems(
        tmp_path,
        ["deepspeed", "hjson", "pydantic-core", "megatron-core", "diffusers"],
        pure=["deepspeed"],
        max_mib=0.004,
    )
    assert found == [
        "megatron_core-0.16.1-cp312-cp312-linux_x86_64.whl: not for CPython 3.12 on manylinux x86_64",
        "pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl: not for CPython 3.12 on manylinux x86_64",
        "diffusers: missing",
        "six: not expected (six-1.0-py3-none-any.whl)",
        "hjson: 2 wheels, one expected (hjson-3.0.0-py3-none-any.whl, hjson-3.1.0-py3-none-any.whl)",
        f"{tmp_path}: 0.00477 MiB, over the 0.004 MiB limit",
    ]


GPU_WHEELS = {
    "megatron-core",
    "deepspeed",
    "diffusers",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "hjson",
    "phased-dmd-mega",
}


@pytest.mark.slow
def test_make_gpu_wheels_fills_the_folder_once_per_package_under_60_mib(tmp_path):
    folder = tmp_path / "wheels"
    out = subprocess.run(
        ["make", "-s", "gpu-wheels", f"GPU_WHEELS={folder}", f"PY={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    wheels = sorted(folder.glob("*.whl"))
    names = [gpu_check_name(w) for w in wheels]
    assert sorted(names) == sorted(GPU_WHEELS)  # each once, nothing else
    assert sum(w.stat().st_size for w in folder.iterdir()) < 60 * 2**20
    assert "total, 10 files" in out.stdout
    (deepspeed,) = folder.glob("deepspeed-*.whl")
    assert deepspeed.name == "deepspeed-0.19.8-py3-none-any.whl"
    # The folder installs as gpu_check.py installs it, for the GPU machine's interpreter.
    target = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--target",
        str(tmp_path / "site"),
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--platform",
        "manylinux_2_28_x86_64",
        "--platform",
        "manylinux_2_17_x86_64",
        *map(str, wheels),
    ]
    install = subprocess.run(target, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    assert (tmp_path / "site" / "phased_dmd_mega" / "kernels" / "__init__.py").is_file()


def gpu_check_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()
