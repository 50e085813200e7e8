"""The collapse monitor (logging.eval_every): the teacher's figures once, the generators' every N
iterations, a warning when they fall or blow up, and with logging.stop_on_collapse a stop with a
checkpoint and a message naming the last checkpoint before the decline."""

import json
import math

import pytest
import torch

from phased_dmd_mega import cli
from phased_dmd_mega.config import LoggingConfig
from phased_dmd_mega.distill import trainer as trainer_module
from phased_dmd_mega.distill.monitor import TEACHER_FILE, problems_of
from phased_dmd_mega.distill.optim import set_learning_rate

from helpers.evaluation_models import save_tiny_dino
from helpers.tiny_models import save_tiny_wan_vae
from helpers.tiny_runs import save_wan_teacher, write_config

MONITORED = ["logging.eval_every=2", "logging.eval_teacher_steps=8", "checkpoint.save_every=2"]


def settings(fraction=0.5, saturation=0.25):
    return LoggingConfig(collapse_fraction=fraction, saturation_limit=saturation)


def test_figures_are_judged_against_the_teachers():
    teacher = {"latent_spread": 1.0, "frame_change": 0.2, "latent_rms": 1.0, "dino_cosine": 0.6}
    assert problems_of(dict(teacher), teacher, settings()) == []
    assert problems_of({**teacher, "latent_spread": 0.51}, teacher, settings()) == []
    fallen = problems_of({**teacher, "latent_spread": 0.49, "frame_change": 0.05}, teacher, settings())
    assert [p.split()[0] for p in fallen] == ["latent_spread", "frame_change"]
    # DINO: the cosine rises as the seeds become alike; 1 - cosine is judged (0.4 for the teacher)
    assert problems_of({**teacher, "dino_cosine": 0.79}, teacher, settings()) == []
    assert problems_of({**teacher, "dino_cosine": 0.81}, teacher, settings())[0].startswith("dino_cosine")
    assert problems_of({**teacher, "latent_rms": 2.1}, teacher, settings())[0].startswith("latent_rms")
    clipped = {**teacher, "clipped_fraction": 0.3}
    assert problems_of(clipped, {**teacher, "clipped_fraction": 0.0}, settings())[0].startswith("clipped_fraction")
    assert problems_of(clipped, {**teacher, "clipped_fraction": 0.0}, settings(saturation=0.5)) == []
    assert problems_of({**teacher, "latent_spread": math.nan}, teacher, settings()) == ["latent_spread is nan"]


def absurd_generator_rate_from(step_from: int, monkeypatch):
    """From iteration ``step_from`` on, the generators' learning rate is 10 (a forced collapse)."""
    set_rates = trainer_module.Trainer._set_learning_rates

    def rates(self, step, total):
        set_rates(self, step, total)
        if step >= step_from:
            for role in self.generators:
                set_learning_rate(role, 10.0)

    monkeypatch.setattr(trainer_module.Trainer, "_set_learning_rates", rates)


def monitor_lines(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "monitor.jsonl").read_text().splitlines()]


def test_a_healthy_run_is_measured_against_the_teachers_figures_without_warnings(tmp_path, caplog):
    config = write_config(tmp_path)
    args = ["train", "--config", str(config), *MONITORED, "phases.iterations_per_phase=2"]
    with caplog.at_level("INFO"):
        assert cli.main(args) == 0
    lines = monitor_lines(tmp_path)
    assert [line["iteration"] for line in lines] == [1, 3]
    teacher = json.loads((tmp_path / "run" / TEACHER_FILE).read_text())["figures"]
    assert teacher["latent_spread"] > 0 and teacher["latent_rms"] > 0
    for line in lines:
        assert line["problems"] == [] and line["teacher"] == teacher
        assert line["figures"]["latent_spread"] > 0.5 * teacher["latent_spread"]
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "collapse monitor" in r.message]


def test_a_forced_collapse_warns_then_stops_naming_the_last_checkpoint_before_it(tmp_path, monkeypatch, capsys):
    absurd_generator_rate_from(4, monkeypatch)
    config = write_config(tmp_path)
    board = tmp_path / "board"
    overrides = [*MONITORED, "phases.iterations_per_phase=4", f"logging.tensorboard_dir={board}"]
    # Without stop_on_collapse: warned, and the run goes on to the end.
    assert cli.main(["train", "--config", str(config), *overrides]) == 0
    lines = monitor_lines(tmp_path)
    assert [bool(line["problems"]) for line in lines] == [False, False, True, True]
    assert "latent_rms" in lines[2]["problems"][0]
    assert "collapse monitor, iteration 5: latent_rms" in capsys.readouterr().err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(board)).Reload()
    assert "monitor/samples" in events.Tags()["images"]
    assert {"monitor/latent_spread", "monitor/latent_spread_teacher"} <= set(events.Tags()["scalars"])

    # With it: a checkpoint at the collapse, exit 1, the message names the last one before it.
    config = write_config(tmp_path, name="stopping")
    stop = ["logging.stop_on_collapse=true", *overrides]
    assert cli.main(["train", "--config", str(config), *stop]) == 1
    err = capsys.readouterr().err
    checkpoints = tmp_path / "stopping" / "checkpoints"
    assert "collapse at iteration 5: latent_rms" in err
    assert f"the last checkpoint before the decline: {checkpoints / 'iter_0000003'}" in err
    assert "Traceback" not in err
    assert (checkpoints / "iter_0000005").is_dir() and not (checkpoints / "iter_0000007").exists()


def test_a_resumed_run_keeps_the_teachers_figures_of_its_start(tmp_path, monkeypatch):
    config = write_config(tmp_path)
    args = ["train", "--config", str(config), *MONITORED, "phases.iterations_per_phase=2"]
    assert cli.main(args) == 0
    stored = json.loads((tmp_path / "run" / TEACHER_FILE).read_text())

    def no_teacher_sampling(*a, **k):
        raise AssertionError("the teacher was sampled again")

    monkeypatch.setattr(trainer_module.CollapseMonitor, "_sample", no_teacher_sampling, raising=True)
    monkeypatch.setattr(trainer_module.CollapseMonitor, "check", lambda *a, **k: pytest.fail("no evaluation left"))
    assert cli.main([*args[:-1], "phases.iterations_per_phase=2"]) == 0  # resumes at the end: nothing to run
    assert json.loads((tmp_path / "run" / TEACHER_FILE).read_text()) == stored


def test_with_a_vae_and_dino_the_decoded_figures_are_monitored_too(tmp_path):
    teacher, vae, dino = save_wan_teacher(tmp_path / "teacher"), tmp_path / "vae", tmp_path / "dino"
    save_tiny_wan_vae(vae), save_tiny_dino(dino)
    config = write_config(tmp_path)
    extra = [
        f"model.teacher_path={teacher}",
        "model.preset=null",
        f"logging.sample_vae={vae}",
        f"logging.eval_dino={dino}",
    ]
    args = ["train", "--config", str(config), *MONITORED, *extra, "phases.iterations_per_phase=1"]
    assert cli.main(args) == 0
    teacher_figures = json.loads((tmp_path / "run" / TEACHER_FILE).read_text())["figures"]
    decoded = {"pixel_spread", "clipped_fraction", "hsv_saturation", "dino_cosine"}
    assert decoded <= set(teacher_figures) and 0 < teacher_figures["dino_cosine"] <= 1
    (line,) = monitor_lines(tmp_path)
    assert decoded <= set(line["figures"]) and line["problems"] == []


def test_the_grid_shows_a_video_as_a_strip_of_frames(tmp_path):
    """TensorBoard's picture of video samples: STRIP frames side by side per sample."""
    from phased_dmd_mega.distill.monitor import STRIP, CollapseMonitor, Evaluation
    from phased_dmd_mega.evaluation.grid import GridBlock, grid_size

    monitor = CollapseMonitor.__new__(CollapseMonitor)
    monitor.prompt_index, monitor.seeds = [0, 0, 1, 1], [5, 6, 5, 6]
    video, image = torch.randn(4, 3, 5, 8, 8), torch.randn(4, 3, 1, 8, 8)
    for latents, strip in ((video, STRIP), (image, 1)):
        picture = monitor.grid(Evaluation({}, latents), "t")
        expected = grid_size([GridBlock.of("t", [0, 0, 1, 1], [5, 6, 5, 6], latents=latents, strip=strip)], 64)
        assert picture.shape[:2] == expected
    assert monitor.grid(Evaluation({}, video), "t").shape[1] > monitor.grid(Evaluation({}, image), "t").shape[1]
