"""`phased-dmd train` end to end on a tiny random teacher: metrics and checkpoints, automatic
resume after SIGKILL with the same losses as an uninterrupted run, SIGTERM checkpoints and
exits, non-finite steps are skipped and too many stop the run with a checkpoint."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.config import load_config
from phased_dmd_mega.data import LatentGeometry, SyntheticPrompts
from phased_dmd_mega.distill.build import build_teacher
from phased_dmd_mega.distill.trainer import (
    PARTIAL,
    NonFiniteLossError,
    Trainer,
    learning_rate_factor,
    step_schedule,
)
from phased_dmd_mega.parallel import state as parallel_state

from helpers import REPO_ROOT
from helpers.tiny_runs import TINY_RUN, write_config

# Metrics of time and memory, and of work: a resumed iteration repeats its rollouts.
UNREPEATABLE = ("step_seconds", "tokens_per_second", "peak_memory_gib", "tflops_per_second", "mfu")
UNREPEATABLE += ("model_flops", "hardware_flops")


def metrics(folder: Path):
    """The last record of each iteration (a killed run may have logged one it did not save)."""
    last = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        last[entry["iteration"]] = {k: v for k, v in entry.items() if k not in UNREPEATABLE}
    return [last[i] for i in sorted(last)]


def launch(config: Path, processes: int, *overrides, program=("-m", "phased_dmd_mega"), env=None) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        *program,
        "train",
        "--config",
        str(config),
        *overrides,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_schedules_and_learning_rate():
    cfg = load_config(None, ["phases.iterations_per_phase=2", "phases.num_phases=2"])
    assert step_schedule(cfg, 2) == [0, 0, 1, 1]
    cfg = load_config(None, ["phases.iterations_per_phase=2", "phases.phase_order=alternating"])
    assert step_schedule(cfg, 2) == [0, 1, 0, 1]
    cfg = load_config(None, ["phases.iterations_by_phase=[1, 3]"])
    assert step_schedule(cfg, 2) == [0, 1, 1, 1]
    assert step_schedule(cfg, 1) == [0, 0, 0, 0]  # the one-phase baseline: the same number of updates
    cfg = load_config(None, ["phases.iterations_by_phase=[1, 3]", "phases.phase_order=alternating"])
    assert step_schedule(cfg, 2) == [0, 1, 1, 1]
    cfg = load_config(None, ["phases.iterations_by_phase=[3, 2]", "phases.phase_order=alternating"])
    assert step_schedule(cfg, 2) == [0, 1, 0, 1, 0]
    assert [learning_rate_factor(s, 10, 2, "constant") for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert learning_rate_factor(2, 10, 2, "cosine") == 1.0 and learning_rate_factor(10, 10, 2, "linear") == 0.0


def test_a_tiny_run_logs_every_iteration_and_checkpoints(tmp_path):
    board = tmp_path / "tensorboard"
    cfg = load_config(write_config(tmp_path), ["checkpoint.save_every=4", f"logging.tensorboard_dir={board}"])
    parallel.initialize(seed=cfg.run.seed)
    try:
        teacher = build_teacher(cfg)
        trainer = Trainer(cfg, teacher, SyntheticPrompts(4, 16, 32), LatentGeometry())
        assert trainer.run() == 6
    finally:
        parallel.destroy()
    records = metrics(tmp_path / "run")
    assert [r["iteration"] for r in records] == list(range(6)) and [r["phase"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert all(r["dmd_loss"] > 0 and r["fake_loss"] > 0 for r in records)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("iter_*"))
    assert checkpoints == ["iter_0000003", "iter_0000005"]
    saved = load_config(tmp_path / "run" / "checkpoints" / "iter_0000005" / "config.yaml")
    assert saved == cfg  # every checkpoint describes the run that wrote it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(board))
    events.Reload()
    dmd = events.Scalars("train/dmd_loss")
    assert [e.step for e in dmd] == list(range(6))
    assert [e.value for e in dmd] == pytest.approx([r["dmd_loss"] for r in records], rel=1e-6)


def test_resuming_a_checkpoint_of_another_run_is_refused_with_the_keys_at_fault(tmp_path, capsys):
    config = write_config(tmp_path, phases={"iterations_per_phase": 1})
    from phased_dmd_mega import cli

    assert cli.main(["train", "--config", str(config)]) == 0  # 2 iterations, a checkpoint after each
    # What built the roles and the schedule may not change under a checkpoint:
    assert cli.main(["train", "--config", str(config), "phases.shift=3", "phases.num_phases=4"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "iter_0000001" in err
    assert "phases.num_phases (checkpoint 2, now 4)" in err and "phases.shift (checkpoint 5.0, now 3.0)" in err
    # Optimisation and data settings may: the finished run resumes at its end.
    assert cli.main(["train", "--config", str(config), "optimizer.generator.lr=5e-4", "data.micro_batch_size=1"]) == 0
    out = capsys.readouterr()
    assert "resumed from" in out.out + out.err


@pytest.mark.parametrize("tf32, precision", [(True, "tf32"), (False, "ieee")])
def test_train_sets_the_runs_float32_precision(tmp_path, float32_precision, tf32, precision):
    from phased_dmd_mega import cli

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    config = write_config(tmp_path, phases={"iterations_per_phase": 1})
    assert cli.main(["train", "--config", str(config), f"run.tf32={str(tf32).lower()}"]) == 0
    assert float32_precision() == (tf32, tf32, precision)


class NaNTeacher(torch.nn.Module):
    def forward(self, x, *args, **kwargs):
        return torch.full_like(x, float("nan"))


def _train_in_process(cfg, prepare=None) -> int:
    parallel.initialize(seed=cfg.run.seed)
    try:
        teacher = build_teacher(cfg)
        trainer = Trainer(cfg, teacher, SyntheticPrompts(4, 16, 32), LatentGeometry())
        if prepare is not None:
            prepare(trainer)
        return trainer.run()
    finally:
        parallel.destroy()


def _nan_teacher_until(trainer, iteration: int) -> None:
    """The teacher gives NaN velocities in the generator updates before ``iteration``."""
    experts, real = trainer.phased.teacher.experts, trainer.phased.teacher.experts.high
    generator_update = trainer.phased.generator_update

    def update(phase, batch, it):
        experts.high = NaNTeacher() if it < iteration else real
        return generator_update(phase, batch, it)

    trainer.phased.generator_update = update


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run_with_a_checkpoint(tmp_path, caplog):
    cfg = load_config(write_config(tmp_path), ["checkpoint.save_every=100"])
    parallel.initialize(seed=cfg.run.seed)
    try:
        teacher = build_teacher(cfg)
        trainer = Trainer(cfg, teacher, SyntheticPrompts(4, 16, 32), LatentGeometry())
        before = {n: p.detach().clone() for n, p in trainer.generators[0].model.named_parameters()}
        trainer.phased.teacher.experts.high = NaNTeacher()
        with pytest.raises(NonFiniteLossError, match="2 non-finite steps in a row"):
            trainer.run()
    finally:
        parallel.destroy()
    for name, param in trainer.generators[0].model.named_parameters():  # NaN updates were skipped
        assert torch.equal(param, before[name])
    assert (tmp_path / "run" / "checkpoints" / "iter_0000001").is_dir()
    # The cause gone (the real teacher), the run resumes at iteration 2, and trains as a run
    # whose teacher was NaN in iterations 0 and 1 only (one that does not stop there).
    with caplog.at_level("INFO", logger="phased_dmd_mega.distill.trainer"):
        assert _train_in_process(cfg) == 6
    assert "(iteration 1)" in caplog.text
    records = metrics(tmp_path / "run")
    assert [r["iteration"] for r in records] == list(range(6))
    assert all(math.isnan(records[i]["generator_grad_norm"]) for i in (0, 1))
    for record in records[2:]:
        assert all(math.isfinite(v) for v in record.values()), record
        assert record["dmd_loss"] > 0 and record["generator_grad_norm"] > 0
    unstopped = load_config(
        write_config(tmp_path, "unstopped"), ["checkpoint.save_every=100", "run.max_consecutive_nonfinite=3"]
    )
    assert _train_in_process(unstopped, lambda trainer: _nan_teacher_until(trainer, 2)) == 6
    assert records[2:] == metrics(tmp_path / "unstopped")[2:]


def _sigterm_after_fake_update(trainer, iteration: int, index: int) -> None:
    """SIGTERM to this process when fake update ``index`` of ``iteration`` has run."""
    fake_update = trainer.phased.fake_update

    def then_sigterm(phase, batch, it, at, anchor):
        logs = fake_update(phase, batch, it, at, anchor)
        if (it, at) == (iteration, index):
            signal.raise_signal(signal.SIGTERM)
        return logs

    trainer.phased.fake_update = then_sigterm


@pytest.mark.parametrize("batched, done", [(False, 1), (True, 2), (True, 3)])
def test_sigterm_inside_an_iteration_checkpoints_it_and_the_resume_finishes_it_exactly(tmp_path, batched, done):
    """Stopped after fake update ``done`` of 3 (3: just before the generator update), the run
    saves iteration 1 so far; the resumed run runs the rest of it and the later iterations with
    the losses and gradient norms of the uninterrupted run, to the last bit."""
    overrides = [
        "phases.iterations_per_phase=2",
        "phases.fake_updates_per_generator_update=3",
        f"phases.batch_fake_rollouts={str(batched).lower()}",
        "checkpoint.save_every=100",
    ]
    assert _train_in_process(load_config(write_config(tmp_path, "reference"), overrides)) == 4
    cfg = load_config(write_config(tmp_path, "interrupted"), overrides)
    assert _train_in_process(cfg, lambda trainer: _sigterm_after_fake_update(trainer, 1, done - 1)) == 1
    saved = sorted(p.name for p in (tmp_path / "interrupted" / "checkpoints").glob("iter_*"))
    assert saved == ["iter_0000001"]
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_common_state_dict(str(tmp_path / "interrupted" / "checkpoints" / saved[0]))
    assert metadata["metadata"]["iteration"] == 1
    assert metadata["metadata"][PARTIAL]["fake_updates_done"] == done
    assert [r["iteration"] for r in metrics(tmp_path / "interrupted")] == [0]
    assert _train_in_process(cfg) == 4
    assert metrics(tmp_path / "interrupted") == metrics(tmp_path / "reference")


def test_a_checkpoint_saved_inside_an_iteration_opens_as_the_generators_of_the_one_before(tmp_path):
    """Stopped inside iteration 1, before its generator update: export and sampling get the
    generators of iteration 0, and say so."""
    from phased_dmd_mega.distill.generators import open_generators

    cfg = load_config(write_config(tmp_path), ["phases.fake_updates_per_generator_update=2"])
    assert _train_in_process(cfg, lambda trainer: _sigterm_after_fake_update(trainer, 1, 0)) == 1
    folder = tmp_path / "run" / "checkpoints"
    parallel.initialize(seed=0)
    try:
        whole, partial = (open_generators(folder / name) for name in ("iter_0000000", "iter_0000001"))
    finally:
        parallel.destroy()
    assert (whole.iteration, partial.iteration) == (0, 0)
    for k in range(2):
        mine, theirs = (dict(g.generators[k].high.named_parameters()) for g in (whole, partial))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[name], theirs[name]) for name in mine)


def test_a_resumed_run_stops_on_non_finite_steps_where_the_uninterrupted_one_does(tmp_path):
    """Non-finite steps in a row are counted across a preemption: NaN in iterations 0 to 3 and a
    limit of 3 stop the uninterrupted run at iteration 2, and a run preempted inside iteration 2
    (after two non-finite iterations) stops there too once resumed."""
    overrides = ["phases.iterations_per_phase=3", "checkpoint.save_every=100", "run.max_consecutive_nonfinite=3"]
    stop = "3 non-finite steps in a row \\(up to iteration 2\\)"
    reference = load_config(write_config(tmp_path, "reference"), overrides)
    with pytest.raises(NonFiniteLossError, match=stop):
        _train_in_process(reference, lambda trainer: _nan_teacher_until(trainer, 4))
    cfg = load_config(write_config(tmp_path, "interrupted"), overrides)

    def nan_then_sigterm(trainer):
        _nan_teacher_until(trainer, 4)
        _sigterm_after_fake_update(trainer, 2, 0)

    assert _train_in_process(cfg, nan_then_sigterm) == 2
    with pytest.raises(NonFiniteLossError, match=stop):
        _train_in_process(cfg, lambda trainer: _nan_teacher_until(trainer, 4))
    same = json.dumps(metrics(tmp_path / "interrupted")) == json.dumps(metrics(tmp_path / "reference"))
    assert same  # NaN included


@pytest.mark.slow
def test_sigkill_then_automatic_resume_gives_the_uninterrupted_losses(tmp_path):
    reference = launch(write_config(tmp_path, "reference"), 2, "parallel.tensor_parallel=2")
    assert reference.wait(timeout=600) == 0, reference.stdout.read()[-3000:]
    interrupted_config = write_config(tmp_path, "interrupted")
    run = launch(interrupted_config, 2, "parallel.tensor_parallel=2")
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    deadline = time.monotonic() + 600
    while not (checkpoints / "iter_0000002").is_dir():
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    for child in _children(run.pid):
        os.kill(child, signal.SIGKILL)
    run.kill()
    run.wait(timeout=60)
    resumed = launch(interrupted_config, 2, "parallel.tensor_parallel=2")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resumed from" in output
    assert metrics(tmp_path / "interrupted") == metrics(tmp_path / "reference")


SLOW_SUB_UPDATES = REPO_ROOT / "tests" / "helpers" / "slow_sub_updates.py"


@pytest.mark.slow
def test_sigterm_to_torchrun_inside_a_long_iteration_checkpoints_and_the_resume_gives_the_same_losses(tmp_path):
    """Iteration 1 takes 40 s (4 sub-updates of 10 s: 3 fake updates and the generator update),
    more than the 30 s torchrun gives its workers between forwarding SIGTERM and SIGKILL. A
    SIGTERM to torchrun at the start of the iteration still gives a checkpoint (of the iteration
    after its first fake update), and the resumed run has the uninterrupted run's losses."""
    phases = {**TINY_RUN["phases"], "iterations_per_phase": 2, "fake_updates_per_generator_update": 3}
    sections = {"phases": phases, "checkpoint": {"save_every": 100, "keep_last": 10}}
    reference = launch(write_config(tmp_path, "reference", **sections), 2)  # meanwhile, at full speed
    config = write_config(tmp_path, "interrupted", **sections)
    markers = tmp_path / "markers"
    clean = {k: v for k, v in os.environ.items() if k not in ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "PET_SHUTDOWN_TIMEOUT")}
    slow = {
        "PHASED_DMD_TEST_SLOW_ITERATION": "1",
        "PHASED_DMD_TEST_SUB_UPDATE_SECONDS": "10",
        "PHASED_DMD_TEST_MARKERS": str(markers),
    }
    run = launch(config, 2, program=[str(SLOW_SUB_UPDATES)], env={**clean, **slow})
    deadline = time.monotonic() + 300
    while not (markers / "started_1_0").exists():
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before iteration 1"
        time.sleep(0.1)
    sent = time.monotonic()
    run.send_signal(signal.SIGTERM)  # to torchrun itself, which forwards it to the workers
    output = run.communicate(timeout=120)[0]
    took = time.monotonic() - sent
    # torchrun stops its workers, then ends with the SignalException it raised (exit status 1).
    assert run.returncode == 1, output[-3000:]
    saved = tmp_path / "interrupted" / "checkpoints" / "iter_0000001"
    assert saved.is_dir(), output[-3000:]
    assert "forcefully exiting" not in output and took < 30  # no SIGKILL: the workers saved and ended
    assert "SIGTERM: stopped in iteration 1 after 1 of its 3 fake updates, with a checkpoint" in output
    assert not (markers / "started_1_1").exists()
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_common_state_dict(str(saved))["metadata"]
    assert metadata["iteration"] == 1 and metadata[PARTIAL]["fake_updates_done"] == 1
    resumed = launch(config, 2)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "iteration 1 continues after its fake update 1" in output
    assert reference.wait(timeout=300) == 0, reference.stdout.read()[-3000:]
    assert [r["iteration"] for r in metrics(tmp_path / "reference")] == [0, 1, 2, 3]
    assert metrics(tmp_path / "interrupted") == metrics(tmp_path / "reference")


@pytest.mark.slow
def test_micro_batches_on_two_data_parallel_ranks_give_the_whole_batch_run(tmp_path):
    """Gradient accumulation through megatron's DistributedDataParallel buffers (data parallel
    2, distributed optimizer): micro-batches of one sample give the losses and gradient norms
    of the whole batch of two."""
    for name, data in (("whole", {"batch_size": 2}), ("micro", {"batch_size": 2, "micro_batch_size": 1})):
        run = launch(write_config(tmp_path, name, data=data, phases={"iterations_per_phase": 2}), 2)
        output = run.communicate(timeout=600)[0]
        assert run.returncode == 0, output[-3000:]
    whole, micro = metrics(tmp_path / "whole"), metrics(tmp_path / "micro")
    assert len(whole) == len(micro) == 4
    for ref, got in zip(whole, micro):
        assert set(ref) == set(got)
        for key in ("dmd_loss", "fake_loss", "real_fake_gap", "generator_grad_norm", "fake_grad_norm"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out] + [g for p in out for g in _children(int(p))]


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    config = write_config(tmp_path, "preempted", phases={**TINY_RUN["phases"], "iterations_per_phase": 50})
    run = launch(config, 1, "checkpoint.save_every=1000")
    records = tmp_path / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not records.exists() or len(records.read_text().splitlines()) < 2:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    for child in _children(run.pid):  # torchrun forwards SIGTERM too; the trainer gets it
        os.kill(child, signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    assert "SIGTERM: stopped" in output  # after an iteration, or inside one (after a fake update)
    saved = sorted((tmp_path / "preempted" / "checkpoints").glob("iter_*"))
    assert len(saved) == 1 and int(saved[0].name.split("_")[1]) < 99


@pytest.mark.parametrize("decay, follows", [(1e-9, "generator"), (1 - 1e-9, "teacher")])
def test_generator_ema_moves_from_the_teacher_toward_the_generator(tmp_path, decay, follows):
    cfg = load_config(write_config(tmp_path), [f"optimizer.ema_decay={decay}", "checkpoint.save_every=100"])
    parallel.initialize(seed=cfg.run.seed)
    try:
        teacher = build_teacher(cfg)
        trainer = Trainer(cfg, teacher, SyntheticPrompts(4, 16, 32), LatentGeometry())
        trainer.run()
        roles = trainer.roles()  # what a checkpoint holds: the EMA copies too
        assert "generator0_ema" in roles and "generator1_ema" in roles
    finally:
        parallel.destroy()
    target = trainer.generators[0].model if follows == "generator" else teacher
    moved = False
    for (name, ema), param in zip(trainer.ema[0].named_parameters(), target.parameters()):
        torch.testing.assert_close(ema, param.detach(), rtol=1e-6, atol=1e-7, msg=name)
    for ema, gen in zip(trainer.ema[0].parameters(), trainer.generators[0].model.parameters()):
        moved |= not torch.equal(ema, gen)
    assert moved is (follows == "teacher")
    assert trainer.sampling_generators() is trainer.ema


def test_lora_roles_train_adapters_on_the_shared_frozen_teacher(tmp_path):
    cfg = load_config(
        write_config(tmp_path), ["model.lora.rank=4", "optimizer.ema_decay=0.5", "checkpoint.save_every=100"]
    )
    parallel.initialize(seed=cfg.run.seed)
    try:
        teacher = build_teacher(cfg)
        base = [(p, p.detach().clone()) for p in teacher.high.parameters()]  # before any adapter exists
        trainer = Trainer(cfg, teacher, SyntheticPrompts(4, 16, 32), LatentGeometry())
        trainer.run()
        roles = trainer.roles()
    finally:
        parallel.destroy()
    # Every role is adapters only, all on the one teacher model, whose own weights never move.
    for name, role in roles.items():
        params = dict(role.model.named_parameters())
        assert params and all("adapters" in n for n in params), name
        assert role.model.high.shared is teacher.high
    assert all(torch.equal(param, before) for param, before in base)
    generator_b = [p for n, p in trainer.generators[1].model.named_parameters() if n.endswith("lora_B")]
    assert any(p.abs().sum() > 0 for p in generator_b)  # the generator's adapters learned
    assert (tmp_path / "run" / "checkpoints" / "iter_0000005").is_dir()


def test_warmup_and_decay_restart_with_each_phase_and_warmup_holds_back_the_generator_only(tmp_path):
    overrides = [
        "phases.iterations_per_phase=4",
        "optimizer.warmup_iterations=2",
        "optimizer.schedule=linear",
        "optimizer.generator.lr=1.0",
        "optimizer.fake.lr=2.0",
    ]
    cfg = load_config(write_config(tmp_path), overrides)
    parallel.initialize(seed=cfg.run.seed)
    try:
        trainer = Trainer(cfg, build_teacher(cfg), SyntheticPrompts(4, 16, 32), LatentGeometry())
        rates = []
        for step in range(8):
            trainer._set_learning_rates(step, 8)
            phase = trainer.schedule[step]
            rates.append(
                (
                    trainer.generators[phase].optimizer.param_groups[0]["lr"],
                    trainer.fakes[phase].optimizer.param_groups[0]["lr"],
                )
            )
    finally:
        parallel.destroy()
    decay = [1.0, 0.75, 0.5, 0.25]  # linear over the phase's 4 iterations
    warmup = [0.5, 1.0, 1.0, 1.0]
    expected = [(d * w, 2.0 * d) for d, w in zip(decay, warmup)]
    assert [r for pair in rates for r in pair] == pytest.approx([r for pair in expected + expected for r in pair])


def _tensors(module: torch.nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def _optimizer_states(role):
    """(name, tensor) of a role's optimizer states, without torch AdamW's step counters: 0-dim
    CPU tensors wherever the parameters are (capturable=False), by design."""
    role.ensure_state()
    for index, state in enumerate(role.optimizer.state.values()):
        for name, value in state.items():
            if torch.is_tensor(value) and not (name == "step" and value.dim() == 0 and value.device.type == "cpu"):
                yield f"state{index}.{name}", value


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_every_role_and_its_optimizer_state_live_on_the_training_device(tmp_path, monkeypatch, lora_rank):
    """The teacher is built on the CPU and the training device is another one ("meta" stands in
    for a GPU): teacher, generators, fakes and EMA copies, their buffers and optimizer states all
    end up on the training device, full copies and LoRA adapters alike."""
    cfg = load_config(
        write_config(tmp_path),
        [f"model.lora.rank={lora_rank}", "optimizer.ema_decay=0.9", "optimizer.distributed=false"],
    )
    training = torch.device("meta")
    parallel.initialize(seed=cfg.run.seed)
    try:
        teacher = build_teacher(cfg)
        assert {t.device.type for _, t in _tensors(teacher)} == {"cpu"}
        with monkeypatch.context() as patch:  # undone before parallel.destroy()
            patch.setattr(parallel_state, "_layout", dataclasses.replace(parallel.layout(), device=training))
            trainer = Trainer(cfg, teacher, SyntheticPrompts(4, 16, 32), LatentGeometry())
    finally:
        parallel.destroy()
    placed = {f"teacher.{name}": t.device for name, t in _tensors(teacher)}
    roles = trainer.roles()
    assert {"generator0", "generator1", "fake0", "fake1", "generator0_ema", "generator1_ema"} == set(roles)
    for role_name, role in roles.items():
        placed.update((f"{role_name}.{name}", t.device) for name, t in _tensors(role.model))
        if role.optimizer is not None:
            states = dict(_optimizer_states(role))
            assert states, role_name
            placed.update((f"{role_name}.optimizer.{name}", t.device) for name, t in states.items())
    misplaced = {key: device for key, device in placed.items() if device != training}
    assert not misplaced, misplaced


def test_the_runs_cfg_norm_reaches_the_guided_teacher(tmp_path):
    cfg = load_config(write_config(tmp_path), ["phases.cfg_norm=scalar"])
    parallel.initialize(seed=cfg.run.seed)
    try:
        trainer = Trainer(cfg, build_teacher(cfg), SyntheticPrompts(4, 16, 32), LatentGeometry())
        assert trainer.phased.teacher.cfg_norm == "scalar"
    finally:
        parallel.destroy()
