"""TFLOP/s and MFU in every metrics line: the trainer's per-iteration FLOP count against torch's
FlopCounterMode over the same iterations (attention through SDPA's math kernel), for full
fine-tuning, LoRA, and activation recompute (model FLOPs without it, hardware FLOPs with it);
tokens counted after patching; MFU against logging.peak_tflops, none on CPU without it."""

import json

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from phased_dmd_mega import parallel
from phased_dmd_mega.config import load_config
from phased_dmd_mega.data import LatentGeometry, SyntheticPrompts
from phased_dmd_mega.distill.build import build_student, build_teacher
from phased_dmd_mega.distill.trainer import Trainer

from helpers.tiny_runs import save_wan_student, save_wan_teacher, write_config

BATCH, TOKENS = 2, 1 * 2 * 3  # 1x32x48 pixels -> 1x4x6 latents -> 1x2x3 tokens of 1x2x2


def _train_measuring(cfg, text_dim=32, channels=16):
    """The run's metrics, and FlopCounterMode's count of each of its iterations."""
    measured = []
    parallel.initialize(seed=cfg.run.seed)
    try:
        prompts, geometry = SyntheticPrompts(4, 16, text_dim), LatentGeometry(channels=channels)
        trainer = Trainer(cfg, build_teacher(cfg), prompts, geometry, build_student(cfg))
        iteration = trainer.phased.iteration

        def measuring(*args, **kwargs):
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as mode:
                logs = iteration(*args, **kwargs)
            measured.append(mode.get_total_flops())
            return logs

        trainer.phased.iteration = measuring
        trainer.run()
    finally:
        parallel.destroy()
    lines = (trainer.output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], measured


@pytest.mark.parametrize(
    "overrides, counted",
    [
        (["logging.peak_tflops=0.001"], "model_flops"),
        (["model.lora.rank=4"], "model_flops"),
        (["model.recompute=full"], "hardware_flops"),
    ],
    ids=["full", "lora", "recompute"],
)
def test_the_logged_flops_are_what_the_iterations_ran(tmp_path, caplog, overrides, counted):
    cfg = load_config(write_config(tmp_path), ["phases.iterations_per_phase=1", *overrides])
    with caplog.at_level("INFO", logger="phased_dmd_mega.distill.trainer"):
        records, measured = _train_measuring(cfg)
    assert len(records) == len(measured) == 2
    peak = cfg.logging.peak_tflops
    for record, flops in zip(records, measured):
        assert record[counted] == pytest.approx(flops, rel=0.02)
        assert record["tflops_per_second"] == pytest.approx(record["model_flops"] / record["step_seconds"] / 1e12)
        assert record["tokens_per_second"] == pytest.approx(BATCH * TOKENS / record["step_seconds"])
        if peak is None:  # CPU, no logging.peak_tflops: no MFU
            assert record["mfu"] is None
        else:
            assert record["mfu"] == pytest.approx(record["tflops_per_second"] / peak)
        if "model.recompute=full" in overrides:  # recompute is hardware work, not model work
            assert record["model_flops"] < record["hardware_flops"]
        else:
            assert record["model_flops"] == record["hardware_flops"]
    assert ("TFLOP/s  MFU " in caplog.text) == (peak is not None)  # the console shows it when there is one


def test_a_students_roles_are_counted_at_its_size(tmp_path):
    """A student of half the teacher's width (model.student_path): each DiT call counted at its
    own model's size, which FlopCounterMode measures directly."""
    teacher, student = save_wan_teacher(tmp_path / "teacher"), save_wan_student(tmp_path / "student")
    paths = [f"model.teacher_path={teacher}", f"model.student_path={student}", "model.preset=null"]
    cfg = load_config(write_config(tmp_path), ["phases.iterations_per_phase=1", *paths])
    records, measured = _train_measuring(cfg, text_dim=16, channels=4)
    assert len(records) == len(measured) == 2
    for record, flops in zip(records, measured):
        assert record["model_flops"] == pytest.approx(flops, rel=0.02)
