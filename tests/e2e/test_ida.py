"""Implicit distribution alignment (optimizer.ida_decay): after each applied generator update
the phase's fake expert moves to decay * fake + (1 - decay) * generator, checked in float64
against the trainer's own roles, for full copies, LoRA adapters, a two-expert fake, the
distributed optimizer's fp32 main copy, and through a resume."""

import json

import pytest
import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.config import load_config
from phased_dmd_mega.data import LatentGeometry, SyntheticPrompts
from phased_dmd_mega.distill.alignment import paired_fake_expert, pull_fake_toward_generator
from phased_dmd_mega.distill.build import build_teacher
from phased_dmd_mega.distill.optim import MAIN_PARAM
from phased_dmd_mega.distill.trainer import Trainer

from helpers.tiny_runs import save_a14b_teacher, write_config


def trainer_for(cfg):
    return Trainer(cfg, build_teacher(cfg), SyntheticPrompts(4, 16, 32), LatentGeometry())


def float64_state(module):
    return {name: p.detach().double().clone() for name, p in module.named_parameters()}


def moved_generator(trainer, phase):
    """The generator's trainable parameters moved off the fake's (they start equal)."""
    gen = torch.Generator().manual_seed(phase)
    with torch.no_grad():
        for param in trainer.generators[phase].model.high.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen).to(param.dtype))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_the_pull_is_the_float64_lerp_of_every_trained_parameter(tmp_path, lora_rank):
    cfg = load_config(write_config(tmp_path), [f"model.lora.rank={lora_rank}", "optimizer.distributed=false"])
    parallel.initialize(seed=0)
    try:
        trainer = trainer_for(cfg)
        moved_generator(trainer, 0)
        fake, generator = trainer.fakes[0].model.high, trainer.generators[0].model.high
        before, target = float64_state(fake), float64_state(generator)
        pull_fake_toward_generator(trainer.fakes[0], trainer.generators[0].model, trainer.layout, 0, 0.9)
        after = float64_state(fake)
    finally:
        parallel.destroy()
    trained = [n for n, p in generator.named_parameters() if p.requires_grad]
    assert trained == list(after)  # every parameter of the role: a full copy's, or its adapters
    assert all(("lora_" in name) == (lora_rank > 0) for name in trained)
    for name in trained:
        torch.testing.assert_close(after[name], 0.9 * before[name] + 0.1 * target[name], rtol=0, atol=1e-6)
    assert any(not torch.equal(after[n], before[n]) for n in trained)


def test_a_two_expert_fake_pulls_only_the_expert_its_generator_started_from(tmp_path):
    root = save_a14b_teacher(tmp_path / "a14b", boundary_ratio=0.875)
    overrides = [f"model.teacher_path={root}", "model.preset=null", "optimizer.distributed=false"]
    cfg = load_config(write_config(tmp_path), overrides)
    parallel.initialize(seed=0)
    seen = []
    try:
        trainer = trainer_for(cfg)
        for phase in range(trainer.layout.num_phases):
            fake = trainer.fakes[phase].model
            if fake.low is None:
                continue
            name, expert = paired_fake_expert(fake, trainer.layout, phase)
            other = fake.low if name == "high" else fake.high
            moved_generator(trainer, phase)
            pulled_before, other_before = float64_state(expert), float64_state(other)
            target = float64_state(trainer.generators[phase].model.high)
            pull_fake_toward_generator(
                trainer.fakes[phase], trainer.generators[phase].model, trainer.layout, phase, 0.5
            )
            pulled_after, other_after = float64_state(expert), float64_state(other)
            high_noise = trainer.layout.phase_is_high_noise(phase, fake.boundary)
            seen.append((name, high_noise))
            assert all(torch.equal(other_after[n], other_before[n]) for n in other_before)
            for n in target:
                want = 0.5 * pulled_before[n] + 0.5 * target[n]
                torch.testing.assert_close(pulled_after[n], want, rtol=0, atol=1e-6)
    finally:
        parallel.destroy()
    # The low-noise phase's generator started from the low-noise expert, the high-noise one's from
    # the high-noise expert.
    assert ("low", False) in seen and all(name == ("high" if high else "low") for name, high in seen)


def test_with_bf16_weights_the_distributed_optimizers_fp32_main_copy_is_pulled_too(tmp_path):
    cfg = load_config(write_config(tmp_path), ["model.dtype=bfloat16"])
    parallel.initialize(seed=0)
    try:
        trainer = trainer_for(cfg)
        moved_generator(trainer, 0)
        role, generator = trainer.fakes[0], trainer.generators[0].model.high
        mains = {n: s.states[MAIN_PARAM].double().clone() for n, s in role.owned_slices().items()}
        targets = {f"high.{n}": p.detach().double().reshape(-1) for n, p in generator.named_parameters()}
        pull_fake_toward_generator(role, trainer.generators[0].model, trainer.layout, 0, 0.75)
        slices = role.owned_slices()
    finally:
        parallel.destroy()
    assert mains
    for name, owned in slices.items():
        want = 0.75 * mains[name] + 0.25 * targets[name][owned.start : owned.stop]
        torch.testing.assert_close(owned.states[MAIN_PARAM].double(), want, rtol=0, atol=1e-6)


def losses(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_ida_pulls_after_each_generator_update_and_resumes_exactly(tmp_path):
    """One iteration with IDA leaves fake = lerp(fake, generator) of the run without it (the
    fake updates come first, the pull after the generator's); a resumed run repeats the losses."""

    def one_iteration(decay):
        extra = [] if decay is None else [f"optimizer.ida_decay={decay}"]
        cfg = load_config(write_config(tmp_path, name=f"one{decay}"), ["phases.iterations_per_phase=1", *extra])
        parallel.initialize(seed=cfg.run.seed)
        try:
            trainer = trainer_for(cfg)
            trainer.phased.iteration(trainer.schedule[0], trainer.batch(0)[0], 0)
            logs = {"generator_grad_norm": 1.0}
            trainer._follow_generator(trainer.schedule[0], logs)
            return float64_state(trainer.fakes[0].model.high), float64_state(trainer.generators[0].model.high)
        finally:
            parallel.destroy()

    (fake, gen), (pulled, gen_ida) = one_iteration(None), one_iteration(0.5)
    for name in gen:
        torch.testing.assert_close(gen_ida[name], gen[name], rtol=0, atol=0)
        torch.testing.assert_close(pulled[name], 0.5 * fake[name] + 0.5 * gen[name], rtol=0, atol=1e-6)

    from phased_dmd_mega.distill import trainer as trainer_module

    ida = ["optimizer.ida_decay=0.9"]
    assert trainer_module.train(load_config(write_config(tmp_path, name="whole"), ida)) == 0
    interrupted = load_config(write_config(tmp_path, name="interrupted"), ida)
    calls = []
    agree = trainer_module.Trainer._stop_everywhere

    def stop_once(self):  # a SIGTERM at the 7th check: inside an iteration, after a fake update
        calls.append(1)
        return True if len(calls) == 7 else agree(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "_stop_everywhere", stop_once)
        assert trainer_module.train(interrupted) == 0
    assert len(losses(tmp_path / "interrupted")) < 6
    assert trainer_module.train(interrupted) == 0  # resumes from the checkpoint it left
    keys = ("dmd_loss", "fake_loss", "generator_grad_norm")
    expected = [[r[k] for k in keys] for r in losses(tmp_path / "whole")]
    assert len(expected) == 6
    assert [[r[k] for k in keys] for r in losses(tmp_path / "interrupted")] == expected
