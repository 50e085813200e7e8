"""Accept one GPU machine (an H100 or H200) for the project's GPU paths: one command, under 8 minutes.

    python bench/gpu_check.py --out runs/gpu-check                         # the project installed here
    python bench/gpu_check.py --out runs/gpu-check --wheels .gpu-wheels    # a bare, air-gapped machine

Six stages, each a subprocess with its own time budget (killed when it runs past it and recorded
as failed), all under one overall deadline; a failed stage does not stop the ones after it:

  environment        GPU, driver, package versions; measured dense bf16 GEMM TFLOP/s and copy GB/s
  pytest_gpu         python -m pytest -m gpu tests/gpu/test_gpu.py (the tests that need CUDA; the
                     other test files may import what a bare machine lacks)
  bench_losses       bench/bench_losses.py: the fused Triton losses against eager torch
  bench_blocks_wan   bench/bench_blocks.py --model wan: one Wan-14B block per attention backend, FP8
  bench_blocks_qwen  the same for one Qwen-Image block
  training           4 iterations of the real Wan2.1-T2V-1.3B architecture (random teacher, LoRA
                     rank 32, bf16) at 81 x 480 x 832 frames under torchrun

Writes OUT/report.json (machine-readable), OUT/report.md (a summary and the stages' tables, for
BENCHMARKS.md) and each stage's whole output under OUT/logs/. The exit status is 0 only when
every stage passed; what needs an absent Transformer Engine or flash-attn is reported as not run
and fails nothing. Without a CUDA device it stops at once (exit status 2).

--wheels DIR (a folder that `make gpu-wheels` filled) first installs this project and the small
pure-Python packages a bare machine lacks (megatron-core, DeepSpeed, diffusers, pydantic, ...)
with `pip install --no-index --no-deps --target OUT/site` and puts OUT/site first on every
stage's PYTHONPATH; --no-deps leaves the machine's own torch and triton alone.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
PROG = "gpu_check.py"

PASSED, FAILED, NOT_RUN = "passed", "failed", "not run"

# Seconds per stage: together under the 8 minutes a person waits; the deadline bounds them all.
BUDGETS_S = {
    "wheels": 40,
    "environment": 40,
    "pytest_gpu": 180,
    "bench_losses": 50,
    "bench_blocks_wan": 60,
    "bench_blocks_qwen": 50,
    "training": 90,
}
OVERALL_DEADLINE_S = 470  # 8 minutes less the start-up and the report
MIN_STAGE_S = 5  # a stage with less time left than this is not started
KILL_GRACE_S = 5  # between SIGTERM and SIGKILL of a stage that ran past its budget
TAIL_LINES = 40  # of a failed stage's output, in the report

TRAINING_ITERATIONS = 4  # 2 phases x 2 iterations
TRAINING_RESOLUTION = {"frames": 81, "height": 480, "width": 832}

# Report name -> (what must import, the module whose __version__ it is, distributions to ask else).
PACKAGES = {
    "torch": ("torch", "torch", ["torch"]),
    "triton": ("triton", "triton", ["triton", "pytorch-triton"]),
    "transformer_engine": (
        "transformer_engine.pytorch",
        "transformer_engine",
        ["transformer_engine", "transformer-engine"],
    ),
    "flash_attn": ("flash_attn", "flash_attn", ["flash_attn", "flash-attn"]),
    "megatron-core": ("megatron.core", "megatron.core", ["megatron-core", "megatron_core"]),
    "deepspeed": ("deepspeed", "deepspeed", ["deepspeed"]),
    "diffusers": ("diffusers", "diffusers", ["diffusers"]),
    "transformers": ("transformers", "transformers", ["transformers"]),
    "pydantic": ("pydantic", "pydantic", ["pydantic"]),
    # The kernels: what a checkout without the installed wheel lacks (setup.py maps them in).
    "phased-dmd-mega": ("phased_dmd_mega.kernels", "phased_dmd_mega", ["phased-dmd-mega", "phased_dmd_mega"]),
}
ABSENT = "absent"
OPTIONAL_PACKAGES = {"transformer_engine", "flash_attn"}  # absent: their stages' rows are not run


class UserError(Exception):
    """A wrong option or missing input: one line on stderr, no traceback."""


class StageError(Exception):
    """A stage's results are missing or malformed; the message names the file."""


# ----------------------------------------------------------------------------- stages and records


@dataclass
class Outcome:
    """What a stage's subprocess did."""

    returncode: Optional[int]
    seconds: float
    log: Path
    timed_out: bool
    budget_s: float

    def tail(self, lines: int = TAIL_LINES) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as handle:
            handle.seek(max(0, self.log.stat().st_size - 200 * lines))
            text = handle.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Verdict:
    status: str
    details: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None


@dataclass
class Stage:
    name: str
    title: str
    command: List[str]
    budget_s: float
    summarize: Callable[[Outcome], Verdict]  # reads the outcome and the files the stage wrote
    prepare: Optional[Callable[[], None]] = None  # runs first, in this process (writes inputs)


@dataclass
class StageRecord:
    name: str
    title: str
    status: str
    seconds: float
    budget_s: float
    command: str
    details: Dict[str, Any]
    error: Optional[str]


@dataclass
class Context:
    out: Path
    env: Dict[str, str]
    cwd: Path
    start: float
    deadline: float

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def progress(context: Context, message: str) -> None:
    print(f"{PROG} [{context.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)


def failed_with_output(outcome: Outcome, what: str = "exit status") -> Verdict:
    return Verdict(FAILED, {}, f"{what} {outcome.returncode}\n{outcome.tail()}".rstrip())


def by_exit_status(outcome: Outcome) -> Verdict:
    """The default summary: the exit status alone."""
    if outcome.returncode == 0:
        return Verdict(PASSED, {"summary": "exit status 0"})
    return failed_with_output(outcome)


def run_stage(stage: Stage, context: Context) -> StageRecord:
    """Run one stage inside its budget and the overall deadline; never raises for the stage's failures."""
    left = context.deadline - time.monotonic()
    budget = min(stage.budget_s, left)
    command = shlex.join(stage.command)
    if left < MIN_STAGE_S:
        progress(context, f"{stage.name} not started: the overall deadline of {OVERALL_DEADLINE_S} s was reached")
        return StageRecord(
            stage.name,
            stage.title,
            FAILED,
            0.0,
            0.0,
            command,
            {},
            f"not started: the overall deadline of {OVERALL_DEADLINE_S} s was reached",
        )
    progress(context, f"{stage.name} started (budget {budget:.0f} s)")
    log = context.out / "logs" / f"{stage.name}.log"
    try:
        if stage.prepare is not None:
            stage.prepare()
        outcome = run_command(stage.command, budget, log, context.env, context.cwd)
    except Exception as err:  # its inputs cannot be written, or its command cannot start
        verdict, seconds = Verdict(FAILED, {}, f"could not start {command}: {type(err).__name__}: {err}"), 0.0
    else:
        verdict, seconds = summarize_safely(stage, outcome), outcome.seconds
    progress(context, f"{stage.name} {verdict.status} in {seconds:.1f} s")
    return StageRecord(
        stage.name,
        stage.title,
        verdict.status,
        round(seconds, 2),
        round(budget, 1),
        command,
        verdict.details,
        verdict.error,
    )


def summarize_safely(stage: Stage, outcome: Outcome) -> Verdict:
    """The stage's own summary; a timeout fails the stage whatever partial results it left."""
    try:
        verdict = stage.summarize(outcome)
    except StageError as err:
        verdict = Verdict(FAILED, {}, f"{err}\n{outcome.tail()}".rstrip())
    except Exception as err:  # a bug in a summary must not cost the other stages' report
        verdict = Verdict(FAILED, {}, f"could not read the stage's results ({type(err).__name__}: {err})")
    if outcome.timed_out:
        message = f"timed out after {outcome.budget_s:.0f} s"
        verdict = Verdict(FAILED, verdict.details, f"{message}\n{outcome.tail()}".rstrip())
    return verdict


def run_stages(stages: Sequence[Stage], context: Context) -> List[StageRecord]:
    return [run_stage(stage, context) for stage in stages]


def overall_status(records: Sequence[StageRecord]) -> str:
    """Passed when no stage failed (stages not run for an absent package fail nothing)."""
    return PASSED if all(r.status in (PASSED, NOT_RUN) for r in records) else FAILED


def exit_status(records: Sequence[StageRecord]) -> int:
    return 0 if overall_status(records) == PASSED else 1


# ----------------------------------------------------------------------------- subprocesses


def run_command(command: Sequence[str], budget_s: float, log_path: Path, env: Dict[str, str], cwd: Path) -> Outcome:
    """Run ``command`` with its output in ``log_path``; past ``budget_s`` it and its descendants are killed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "wb") as log:
        # A session of its own: the terminal's Ctrl-C reaches this script, which then stops the tree.
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        timed_out = False
        try:
            process.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_process_tree(process)
        except BaseException:  # KeyboardInterrupt: leave nothing running on the GPU
            stop_process_tree(process)
            raise
    return Outcome(process.returncode, time.monotonic() - start, log_path, timed_out, budget_s)


def stop_process_tree(process: subprocess.Popen) -> None:
    """SIGTERM the process and all its descendants (torchrun's workers among them), SIGKILL what is
    left after KILL_GRACE_S. The tree is listed first: orphans are re-parented and lost from view."""
    tree = [(process.pid, start_time(process.pid))] + [(pid, start_time(pid)) for pid in descendants(process.pid)]
    signal_tree(process, tree, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    try:
        process.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    while any(still_running(pid, started) for pid, started in tree[1:]) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_tree(process, tree, signal.SIGKILL)
    process.wait()


def signal_tree(process: subprocess.Popen, tree, signum: int) -> None:
    with_group = process.poll() is None
    for pid, started in tree:
        if still_running(pid, started):
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
    if with_group:  # what the listing missed but stayed in the session's process group
        try:
            os.killpg(process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def proc_stat(pid: int) -> Optional[List[str]]:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def start_time(pid: int) -> Optional[str]:
    fields = proc_stat(pid)
    return fields[19] if fields else None


def still_running(pid: int, started: Optional[str]) -> bool:
    """Alive, not a zombie, and still the process listed (not a reused pid)."""
    fields = proc_stat(pid)
    return bool(fields) and fields[0] != "Z" and fields[19] == started


def descendants(pid: int) -> List[int]:
    parents: Dict[int, List[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = proc_stat(int(entry.name))
        if fields:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found.extend(children)
        frontier.extend(children)
    return found


# ----------------------------------------------------------------------------- stage 0: wheels


def wheel_files(folder: Path) -> List[Path]:
    if not folder.is_dir():
        raise UserError(f"--wheels {folder}: no such folder (make gpu-wheels fills .gpu-wheels/)")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise UserError(f"--wheels {folder}: the folder holds no .whl files (make gpu-wheels fills it)")
    if not any(w.name.startswith("phased_dmd_mega-") for w in wheels):
        raise UserError(f"--wheels {folder}: no phased_dmd_mega-*.whl among the wheels (make gpu-wheels builds it)")
    return wheels


def wheels_stage(wheels: List[Path], site: Path) -> Stage:
    """pip install --no-index --no-deps --target SITE (or, where pip is absent, the wheels unpacked)."""
    if importlib.util.find_spec("pip") is not None:
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--disable-pip-version-check",
            "--target",
            str(site),
            *map(str, wheels),
        ]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--unpack-wheels", str(site), *map(str, wheels)]

    def prepare():
        shutil.rmtree(site, ignore_errors=True)  # only what this script installed there before

    def summarize(outcome: Outcome) -> Verdict:
        if outcome.returncode != 0:
            return failed_with_output(outcome)
        names = [w.name for w in wheels]
        return Verdict(PASSED, {"site": str(site), "wheels": names, "summary": f"{len(names)} wheels into {site}"})

    return Stage("wheels", "install --wheels", command, BUDGETS_S["wheels"], summarize, prepare)


def unpack_wheels(site: Path, wheels: Sequence[Path]) -> int:
    """What pip --target does for pure-Python wheels, for a machine without pip."""
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                parts = name.split("/")
                if name.endswith("/"):
                    continue
                if parts[0].endswith(".data"):  # purelib/platlib go to the top, scripts and data are skipped
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    parts = parts[2:]
                target = site.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    return 0


def stage_env(site: Optional[Path]) -> Dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        # Stages run from the checkout: without this, `python -m` would put its phased_dmd_mega/
        # (which lacks kernels/, mapped in only by setup.py) ahead of the installed wheel.
        env["PYTHONSAFEPATH"] = "1"
    return env


# ----------------------------------------------------------------------------- stage 1: environment


def package_versions() -> Dict[str, Dict[str, str]]:
    """Each package's version ("absent" when it does not import, with the reason apart)."""
    versions, errors = {}, {}
    for name, (module_name, version_module, distributions) in PACKAGES.items():
        try:
            importlib.import_module(module_name)
        except Exception as err:  # ImportError, or a broken build raising anything else
            versions[name], errors[name] = ABSENT, f"{type(err).__name__}: {err}"
            continue
        version = getattr(sys.modules[version_module], "__version__", None)
        versions[name] = str(version or distribution_version(distributions))
    return {"versions": versions, "import_errors": errors}


def distribution_version(names: Sequence[str]) -> str:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def cudnn_version(torch) -> str:
    raw = torch.backends.cudnn.version()
    if not raw:
        return ABSENT
    major, rest = (raw // 10000, raw % 10000) if raw >= 90000 else (raw // 1000, raw % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def driver_version() -> str:
    """The NVIDIA driver release: nvidia-smi, else the kernel module's own line."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        return next(word for word in line.split() if word[:1].isdigit() and "." in word)
    except (OSError, IndexError, StopIteration):
        return "unknown"


def gpu_facts(torch) -> Dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "gpu_count": torch.cuda.device_count(),
        "driver": driver_version(),
        "cuda": torch.version.cuda or ABSENT,
        "cudnn": cudnn_version(torch),
    }


def probe_environment(path: Path) -> int:
    """The environment stage's subprocess: facts into ``path`` (JSON), exit 1 if a measurement failed."""
    facts: Dict[str, Any] = {"python": platform.python_version(), "errors": {}}
    facts.update(package_versions())
    import torch

    def measured_rates():  # the project's own timing (phased_dmd_mega.benchmarking), as the benches use
        from phased_dmd_mega.benchmarking import copy_gbps, dense_matmul_tflops

        return {"bf16_gemm_tflops": round(dense_matmul_tflops(iters=50), 1), "copy_gbps": round(copy_gbps(), 1)}

    measurements = {"device": lambda: gpu_facts(torch), "rates": measured_rates}
    for key, measure in measurements.items():
        try:
            facts.update(measure())
        except Exception as err:  # recorded; the other measurements still run
            facts["errors"][key] = f"{type(err).__name__}: {err}"
    if "phased_dmd_mega" in sys.modules:  # which copy the stages use: the installed wheel or the checkout
        facts["project_location"] = str(Path(sys.modules["phased_dmd_mega"].__file__).parent)
    for name, version in facts["versions"].items():
        if version == ABSENT and name not in OPTIONAL_PACKAGES:
            hint = " (on a bare machine: --wheels DIR, from make gpu-wheels)"
            facts["errors"][name] = f"{PACKAGES[name][0]} does not import: {facts['import_errors'][name]}{hint}"
    path.write_text(json.dumps(facts, indent=2) + "\n")
    return 1 if facts["errors"] else 0


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise StageError(f"{path} was not written ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StageError(f"{path} is not valid JSON: {err}") from err


def summarize_environment(path: Path, outcome: Outcome) -> Verdict:
    facts = read_json(path, "the environment probe's facts")
    summary = (
        f"{facts.get('gpu', '?')}, {fmt(facts.get('bf16_gemm_tflops'), 0)} TFLOP/s bf16 GEMM, "
        f"{fmt(facts.get('copy_gbps'), 0)} GB/s copy"
    )
    details = dict(facts, summary=summary)
    if outcome.returncode != 0 or facts.get("errors"):
        errors = "; ".join(f"{k}: {v}" for k, v in facts.get("errors", {}).items())
        return Verdict(FAILED, details, errors or f"exit status {outcome.returncode}\n{outcome.tail()}")
    return Verdict(PASSED, details)


# ----------------------------------------------------------------------------- stage 2: pytest -m gpu


def summarize_pytest(junit: Path, outcome: Outcome) -> Verdict:
    if not junit.is_file():
        raise StageError(f"{junit} was not written (pytest's junit XML)")
    try:
        tree = ElementTree.parse(junit)
    except ElementTree.ParseError as err:
        raise StageError(f"{junit} is not valid XML: {err}") from err
    failing, skipped, total = [], [], 0
    for case in tree.iter("testcase"):
        total += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failing.append(name)
        elif (skip := case.find("skipped")) is not None:
            skipped.append({"test": name, "reason": skip.get("message", "")})
    counts = {
        "tests": total,
        "passed": total - len(failing) - len(skipped),
        "failed": len(failing),
        "skipped": len(skipped),
    }
    summary = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    details = {**counts, "failing": failing, "skipped_tests": skipped, "summary": summary}
    if outcome.returncode == 5 or total == 0:
        return Verdict(FAILED, details, "no test marked gpu was collected")
    if outcome.returncode != 0 or failing:
        return Verdict(
            FAILED,
            details,
            f"failing: {', '.join(failing) or 'none'} (exit status {outcome.returncode})\n{outcome.tail()}",
        )
    return Verdict(PASSED, details)


# ----------------------------------------------------------------------------- stage 3: bench_losses


def summarize_losses(path: Path, outcome: Outcome) -> Verdict:
    if outcome.returncode != 0:
        return failed_with_output(outcome)
    rows = read_json(path, "bench_losses.py --json")
    if not isinstance(rows, list) or not rows:
        raise StageError(f"{path}: expected a non-empty JSON list of rows")
    best = max(rows, key=lambda r: r["copy_fraction"])
    summary = (
        f"{len(rows)} cases; fused up to {best['eager_ms'] / best['fused_ms']:.1f}x eager, "
        f"{100 * best['copy_fraction']:.0f}% of copy bandwidth"
    )
    return Verdict(PASSED, {"rows": rows, "summary": summary})


# ----------------------------------------------------------------------------- stages 4, 5: bench_blocks

BLOCK_ROW_KEYS = {"backend", "layers", "fp8", "status", "ms", "tflops", "fraction_of_matmul", "error"}


def row_label(row: Dict[str, Any]) -> str:
    return f"{row['backend']}/{row['layers']}" + (f"/fp8 {row['fp8']}" if row.get("fp8") else "")


def summarize_blocks(path: Path, outcome: Outcome) -> Verdict:
    """Rows "not installed" are not run (an absent TE or flash-attn fails nothing); "failed" rows fail."""
    if not path.is_file() and outcome.returncode != 0:
        return failed_with_output(outcome)
    rows = read_json(path, "bench_blocks.py --json")
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, dict) and set(r) >= BLOCK_ROW_KEYS for r in rows)
    ):
        raise StageError(f"{path}: expected a non-empty JSON list of rows with keys {sorted(BLOCK_ROW_KEYS)}")
    rows = [dict(r, status=NOT_RUN if r["status"] == "not installed" else r["status"]) for r in rows]
    unknown = [row_label(r) for r in rows if r["status"] not in ("ok", "failed", NOT_RUN)]
    if unknown:
        raise StageError(f"{path}: rows with an unknown status: {', '.join(unknown)}")
    ran = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    not_run = [row_label(r) for r in rows if r["status"] == NOT_RUN]
    parts = [
        f"{row_label(r)} {fmt(r['tflops'], 0)} TFLOP/s"
        + (f" (MFU {100 * r['mfu']:.0f}%)" if isinstance(r.get("mfu"), (int, float)) else "")
        for r in ran
    ]
    summary = "; ".join(
        parts + [f"{row_label(r)} failed" for r in failed] + ([f"not run: {', '.join(not_run)}"] if not_run else [])
    )
    details = {"rows": rows, "not_run": not_run, "summary": summary}
    if failed:
        errors = "\n".join(f"{row_label(r)}: {r.get('error') or 'failed'}" for r in failed)
        return Verdict(FAILED, details, errors)
    if outcome.returncode != 0:
        return Verdict(FAILED, details, f"exit status {outcome.returncode}\n{outcome.tail()}")
    if not ran:
        return Verdict(NOT_RUN, details)
    return Verdict(PASSED, details)


# ----------------------------------------------------------------------------- stage 6: training


def training_config(run_dir: Path) -> Dict[str, Any]:
    """The real 1.3B architecture with a random teacher (no teacher_path): one process, one GPU."""
    return {
        "run": {"name": "gpu_check", "output_dir": str(run_dir), "seed": 0},
        "model": {
            "family": "wan",
            "preset": "wan2.1-t2v-1.3b",
            "teacher_path": None,
            "dtype": "bfloat16",
            "attention_backend": "auto",
            "lora": {"rank": 32},
            # Without recompute one 81x480x832 sample keeps about 140 GiB of activations (memory_estimate).
            "recompute": "full",
        },
        "phases": {
            "num_phases": 2,
            "iterations_per_phase": TRAINING_ITERATIONS // 2,
            "fake_updates_per_generator_update": 1,
        },
        "data": {"synthetic_prompts": 4, "batch_size": 1, "resolutions": [dict(TRAINING_RESOLUTION)]},
        # Only the run's final checkpoint; never resume from an earlier check's.
        "checkpoint": {"dir": str(run_dir / "checkpoints"), "save_every": 1_000_000, "resume": "none"},
        "logging": {"log_every": 1},
    }


def write_training_config(path: Path, run_dir: Path) -> None:
    import yaml

    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends; start from nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by bench/gpu_check.py: the training stage's run.\n"
        + yaml.safe_dump(training_config(run_dir), sort_keys=False)
    )


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """The last record of each iteration in metrics.jsonl (one JSON object per line)."""
    files = sorted(run_dir.rglob("metrics.jsonl"))
    if not files:
        raise StageError(f"no metrics.jsonl under {run_dir}")
    last: Dict[int, Dict[str, Any]] = {}
    for number, line in enumerate(files[0].read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise StageError(f"{files[0]} line {number} is not JSON: {err}") from err
        last[entry["iteration"]] = entry
    return [last[i] for i in sorted(last)]


METRIC_KEYS = (
    "iteration",
    "phase",
    "step_seconds",
    "peak_memory_gib",
    "tokens_per_second",
    "tflops_per_second",
    "mfu",
    "dmd_loss",
    "fake_loss",
)


def summarize_training(run_dir: Path, outcome: Outcome) -> Verdict:
    try:
        records = read_metrics(run_dir)
    except StageError:
        if outcome.returncode != 0 or outcome.timed_out:
            return failed_with_output(outcome)
        raise
    iterations = [{k: r.get(k) for k in METRIC_KEYS} for r in records]
    details: Dict[str, Any] = {"iterations": iterations}
    if iterations:
        details["peak_memory_gib"] = max(r["peak_memory_gib"] or 0.0 for r in iterations)
        steady = iterations[1:] or iterations  # the first iteration includes compiling and warm-up
        details["mean_step_seconds"] = sum(r["step_seconds"] or 0.0 for r in steady) / len(steady)
        details["summary"] = (
            f"{len(iterations)} iterations, {details['mean_step_seconds']:.1f} s per step "
            f"after the first, peak {details['peak_memory_gib']:.1f} GiB"
        )
        mfus = [r["mfu"] for r in steady if isinstance(r.get("mfu"), (int, float))]
        if mfus:  # model FLOPs over the GPU's dense peak (phased_dmd_mega/flops.py)
            details["mean_mfu"] = sum(mfus) / len(mfus)
            details["summary"] += f", MFU {100 * details['mean_mfu']:.1f}%"
    if outcome.returncode != 0:
        return Verdict(FAILED, details, f"exit status {outcome.returncode}\n{outcome.tail()}")
    if len(iterations) != TRAINING_ITERATIONS:
        return Verdict(FAILED, details, f"{len(iterations)} iterations logged, {TRAINING_ITERATIONS} expected")
    nonfinite = [
        r["iteration"]
        for r in iterations
        if not all(isinstance(r[k], (int, float)) and math.isfinite(r[k]) for k in ("dmd_loss", "fake_loss"))
    ]
    if nonfinite:
        return Verdict(FAILED, details, f"non-finite losses at iterations {nonfinite}")
    return Verdict(PASSED, details)


# ----------------------------------------------------------------------------- the six stages


STAGE_NAMES = ("environment", "pytest_gpu", "bench_losses", "bench_blocks_wan", "bench_blocks_qwen", "training")


def build_stages(out: Path, names: Sequence[str] = STAGE_NAMES) -> List[Stage]:
    python = sys.executable
    env_json, junit = out / "environment.json", out / "pytest-gpu.xml"
    losses_json = out / "bench_losses.json"
    run_dir, train_yaml = out / "training", out / "training.yaml"

    def blocks(model: str, name: str, title: str) -> Stage:
        path = out / f"{name}.json"
        command = [
            python,
            "bench/bench_blocks.py",
            "--model",
            model,
            "--backends",
            "sdpa",
            "flash",
            "te",
            "--fp8",
            "delayed",
            "--iters",
            "5",
            "--json",
            str(path),
        ]
        return Stage(
            name, title, command, BUDGETS_S[name], partial(summarize_blocks, path), prepare=partial(remove, path)
        )

    stages = {
        "environment": Stage(
            "environment",
            "environment",
            [python, str(Path(__file__).resolve()), "--probe-environment", str(env_json)],
            BUDGETS_S["environment"],
            partial(summarize_environment, env_json),
            prepare=partial(remove, env_json),
        ),
        "pytest_gpu": Stage(
            "pytest_gpu",
            "pytest -m gpu tests/gpu/test_gpu.py",
            [
                python,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "tests/gpu/test_gpu.py",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
            ],
            BUDGETS_S["pytest_gpu"],
            partial(summarize_pytest, junit),
            prepare=partial(remove, junit),
        ),
        "bench_losses": Stage(
            "bench_losses",
            "bench_losses",
            [python, "bench/bench_losses.py", "--json", str(losses_json)],
            BUDGETS_S["bench_losses"],
            partial(summarize_losses, losses_json),
            prepare=partial(remove, losses_json),
        ),
        "bench_blocks_wan": blocks("wan", "bench_blocks_wan", "bench_blocks wan"),
        "bench_blocks_qwen": blocks("qwen_image", "bench_blocks_qwen", "bench_blocks qwen_image"),
        "training": Stage(
            "training",
            "training iteration",
            [
                python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "1",
                "-m",
                "phased_dmd_mega",
                "train",
                "--config",
                str(train_yaml),
            ],
            BUDGETS_S["training"],
            partial(summarize_training, run_dir),
            prepare=partial(write_training_config, train_yaml, run_dir),
        ),
    }
    return [stages[name] for name in names]


def remove(path: Path) -> None:
    """A result file of an earlier check must not pass for this one's."""
    path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the report


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:,.{digits}f}"
    return "-" if value is None else str(value)


def device_line(records: Sequence[StageRecord]) -> str:
    env = next((r.details for r in records if r.name == "environment" and r.details.get("gpu")), None)
    if env is None:
        return nvidia_smi_device() or "unknown (the environment stage did not report it)"
    return (
        f"{env['gpu']}, compute capability {env.get('compute_capability')}, {fmt(env.get('memory_gib'))} GiB, "
        f"driver {env.get('driver')}, CUDA {env.get('cuda')}"
    )


def nvidia_smi_device() -> Optional[str]:
    """The first GPU as nvidia-smi names it (no CUDA context in this process)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return f"{lines[0].strip()} (nvidia-smi: name, memory, driver)" if out.returncode == 0 and lines else None


def report_dict(records: Sequence[StageRecord], command: str, date: str, seconds: float) -> Dict[str, Any]:
    return {
        "date": date,
        "command": command,
        "device": device_line(records),
        "status": overall_status(records),
        "seconds": round(seconds, 1),
        "stages": {r.name: asdict(r) for r in records},
    }


def markdown_report(report: Dict[str, Any]) -> str:
    records = [StageRecord(**r) for r in report["stages"].values()]
    lines = [
        f"# GPU check, {report['date']}",
        "",
        f"- Device: {report['device']}",
        f"- Command: `{report['command']}`",
        f"- Result: {result_line(records)}, in {report['seconds']:.0f} s",
        "",
        "| stage | status | seconds | result |",
        "|---|---|---:|---|",
    ]
    for r in records:
        result = first_line(r.error) if r.status == FAILED and r.error else r.details.get("summary", "")
        lines.append(f"| {r.title} | {r.status} | {r.seconds:.1f} | {cell(result)} |")
    for r in records:
        section = SECTIONS.get(r.name)
        if section is not None and r.details:
            lines += ["", f"## {r.title}", ""] + rendered(section, r.details)
    errors = [r for r in records if r.error]
    if errors:
        lines += ["", "## Errors"]
        for r in errors:
            lines += ["", f"### {r.title}", "", "```", r.error.replace("```", "'''"), "```"]
    return "\n".join(lines) + "\n"


def rendered(section: Callable[[Dict[str, Any]], List[str]], details: Dict[str, Any]) -> List[str]:
    """A section's lines; details it cannot read cost that section, not the report (report.json has them)."""
    try:
        return section(details)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        return [f"(not shown: {type(err).__name__}: {err}; report.json has the details)"]


def result_line(records: Sequence[StageRecord]) -> str:
    count = {status: sum(r.status == status for r in records) for status in (PASSED, FAILED, NOT_RUN)}
    text = f"{count[PASSED]} of {len(records)} stages passed" + (
        f", {count[NOT_RUN]} not run" if count[NOT_RUN] else ""
    )
    if count[FAILED]:
        return f"**failed** ({', '.join(r.title for r in records if r.status == FAILED)}); {text}"
    return f"**passed**; {text}"


def cell(text: Optional[str]) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def first_line(text: Optional[str]) -> str:
    return (text or "").splitlines()[0] if text else ""


def environment_section(d: Dict[str, Any]) -> List[str]:
    lines = ["| | |", "|---|---|"]
    for key, label in (
        ("gpu", "GPU"),
        ("compute_capability", "compute capability"),
        ("memory_gib", "memory (GiB)"),
        ("gpu_count", "GPUs visible"),
        ("driver", "driver"),
        ("cuda", "CUDA"),
        ("cudnn", "cuDNN"),
        ("python", "Python"),
        ("project_location", "phased_dmd_mega from"),
    ):
        lines.append(f"| {label} | {cell(fmt(d.get(key)))} |")
    for name, version in d.get("versions", {}).items():
        lines.append(f"| {name} | {cell(version)} |")
    lines.append(f"| dense bf16 GEMM 8192^3 (TFLOP/s) | {fmt(d.get('bf16_gemm_tflops'), 0)} |")
    lines.append(f"| device copy, read + write (GB/s) | {fmt(d.get('copy_gbps'), 0)} |")
    return lines


def pytest_section(d: Dict[str, Any]) -> List[str]:
    lines = [f"{d['passed']} passed, {d['failed']} failed, {d['skipped']} skipped of {d['tests']}."]
    if d.get("failing"):
        lines += ["", "Failing:"] + [f"- `{name}`" for name in d["failing"]]
    if d.get("skipped_tests"):
        lines += ["", "Skipped:"] + [f"- `{s['test']}`: {s['reason']}" for s in d["skipped_tests"]]
    return lines


def losses_section(d: Dict[str, Any]) -> List[str]:
    lines = [
        "| loss | dtype | elements | fused fwd+bwd (ms) | eager fwd+bwd (ms) | speedup | fused GB/s | "
        "% of copy BW | max rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['elements']:,} | {r['fused_ms']:.3f} | {r['eager_ms']:.3f} | "
            f"{r['eager_ms'] / r['fused_ms']:.2f}x | {r['fused_gbps']:.0f} | {100 * r['copy_fraction']:.0f}% | "
            f"{r['max_rel_diff']:.1e} |"
        )
    return lines


def blocks_section(d: Dict[str, Any]) -> List[str]:
    lines = [
        "| attention | layers | fp8 | status | ms / fwd+bwd | TFLOP/s | of matmul rate |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in d["rows"]:
        fraction = r.get("fraction_of_matmul")
        share = f"{100 * fraction:.0f}%" if isinstance(fraction, (int, float)) else "-"
        lines.append(
            f"| {r['backend']} | {r['layers']} | {r.get('fp8') or '-'} | {r['status']} | "
            f"{fmt(r.get('ms'))} | {fmt(r.get('tflops'), 0)} | {share} |"
        )
    return lines


def training_section(d: Dict[str, Any]) -> List[str]:
    lines = [
        f"Wan2.1-T2V-1.3B architecture, random teacher, LoRA rank 32, bf16, recompute full, batch 1 at "
        f"{TRAINING_RESOLUTION['frames']}x{TRAINING_RESOLUTION['height']}x{TRAINING_RESOLUTION['width']}, "
        "one GPU.",
        "",
        "| iteration | phase | step (s) | peak memory (GiB) | tokens/s | TFLOP/s | MFU | dmd loss | fake loss |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d.get("iterations", []):
        lines.append(
            f"| {r['iteration']} | {r['phase']} | {fmt(r['step_seconds'], 2)} | {fmt(r['peak_memory_gib'])} | "
            f"{fmt(r['tokens_per_second'], 0)} | {fmt(r.get('tflops_per_second'), 1)} | {fmt(r.get('mfu'), 3)} | "
            f"{fmt(r['dmd_loss'], 4)} | {fmt(r['fake_loss'], 4)} |"
        )
    return lines


SECTIONS: Dict[str, Callable[[Dict[str, Any]], List[str]]] = {
    "environment": environment_section,
    "pytest_gpu": pytest_section,
    "bench_losses": losses_section,
    "bench_blocks_wan": blocks_section,
    "bench_blocks_qwen": blocks_section,
    "training": training_section,
}


def write_report(
    out: Path, records: Sequence[StageRecord], command: str, seconds: float, date: Optional[str] = None
) -> Dict[str, Any]:
    date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = report_dict(records, command, date, seconds)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    return report


# ----------------------------------------------------------------------------- main


def cuda_missing() -> Optional[str]:
    """Why the check cannot run here, in one line; None when torch sees a CUDA device."""
    previous = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # asks NVML: quick, and no CUDA context here
    try:
        import torch
    except Exception as err:
        return f"PyTorch does not import here ({type(err).__name__}: {err})"
    try:
        if not torch.cuda.is_available():
            return "no CUDA device was found (torch.cuda.is_available() is False); run it on the GPU machine"
    finally:
        if previous is None:
            del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = previous
    return None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="folder for report.json, report.md, logs/ and the stages' files (created if missing)",
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        metavar="DIR",
        help="install this project and the packages the machine lacks from this folder of wheels "
        "(make gpu-wheels fills .gpu-wheels/) into OUT/site, first on every stage's PYTHONPATH",
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGE_NAMES,
        default=list(STAGE_NAMES),
        metavar="NAME",
        help="run only these stages, e.g. to repeat a failed one (default: all six)",
    )
    parser.add_argument("--probe-environment", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--unpack-wheels", type=Path, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.probe_environment is None and args.unpack_wheels is None and args.out is None:
        parser.error("--out DIR is required")
    return args


def check(args: argparse.Namespace) -> int:
    wheels = wheel_files(args.wheels) if args.wheels is not None else None
    reason = cuda_missing()
    if reason is not None:
        raise UserError(reason)
    out = args.out.resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {args.out}: cannot create the folder ({err.strerror})") from err
    site = out / "site" if wheels else None
    start = time.monotonic()
    context = Context(out, stage_env(site), ROOT, start, start + OVERALL_DEADLINE_S)
    stages = ([wheels_stage(wheels, site)] if wheels else []) + build_stages(
        out, [n for n in STAGE_NAMES if n in args.stages]
    )
    records = run_stages(stages, context)
    command = shlex.join(["python", "bench/gpu_check.py", *args.argv])
    report = write_report(out, records, command, context.elapsed())
    progress(context, f"{report['status']}: {out / 'report.md'}")
    return exit_status(records)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.probe_environment is not None:
        return probe_environment(args.probe_environment)
    if args.unpack_wheels is not None:
        site, *wheels = args.unpack_wheels
        return unpack_wheels(site, wheels)
    try:
        return check(args)
    except UserError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the running stage was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
