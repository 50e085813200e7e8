"""A tiny two-phase Phased DMD set-up on a tiny Wan, the same at any parallel layout (CPU
initialisation): the roles, a batch, and iterations logged without their timings."""

from dataclasses import replace

import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.config import PhasesConfig
from phased_dmd_mega.distill.optim import RoleOptimizer, make_adamw
from phased_dmd_mega.distill.phased import Batch, PhasedDMD
from phased_dmd_mega.distill.roles import Experts, GuidedTeacher
from phased_dmd_mega.models import WAN_PRESETS, ModelParallelOptions, WanModel
from phased_dmd_mega.schedule import PhaseLayout

ARCH = replace(WAN_PRESETS["tiny"], in_channels=4, out_channels=4)
SHAPE = (2, 4, 1, 6, 8)  # 12 tokens: split evenly over 2 ranks
PADDED_SHAPE = (2, 4, 1, 6, 6)  # 9 tokens: the second of 2 ranks holds 4 real tokens and padding
TI2V_SHAPE = (2, 4, 3, 4, 2)  # 6 tokens, the first frame's 2 given (TI2V): rank 0 of 2 has 1 token in the losses


def _model(options, state=None):
    model = Experts(WanModel(ARCH, options))
    if state is not None:
        model.load_state_dict(state)
    return model


def _roles(teacher_state, options, count, lr, clip):
    roles = []
    for _ in range(count):
        model = _model(replace(options, initialize=False), teacher_state)
        roles.append(RoleOptimizer(model, make_adamw(model, lr, (0.0, 0.999), 1e-8, 0.01), clip))
    return roles


def build_trainer(
    tp, sequence_parallel=False, guidance=3.0, ulysses=1, shape=SHAPE, first_frame=False, **settings_overrides
):
    """A tiny two-phase Phased DMD set-up, the same at any TP size (CPU initialisation);
    ``first_frame``: conditioned on a given first latent frame (TI2V)."""
    parallel.initialize(tensor_parallel=tp, ulysses_parallel=ulysses, sequence_parallel=sequence_parallel, seed=3)
    options = ModelParallelOptions(attention_backend="sdpa", sequence_parallel=sequence_parallel)
    teacher = _model(options)
    teacher.requires_grad_(False)
    layout = PhaseLayout.build(4, num_phases=2, shift=5.0)
    generators = _roles(teacher.state_dict(), options, 2, 1e-3, 1.0)
    fakes = _roles(teacher.state_dict(), options, 2, 1e-3, None)
    options = {"fake_updates_per_generator_update": 2, "weight_clamp": 10.0, **settings_overrides}
    micro_batch_size = options.pop("micro_batch_size", None)
    phases = PhasesConfig(**options)
    trainer = PhasedDMD(
        layout, GuidedTeacher(teacher, guidance), generators, fakes, phases, seed=5, micro_batch_size=micro_batch_size
    )
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(shape[0], shape[1], 1, *shape[3:], generator=gen) if first_frame else None
    cond = Condition(torch.randn(shape[0], 4, ARCH.text_dim, generator=gen), first_frame=image)
    batch = Batch(cond, Condition(torch.zeros_like(cond.context), first_frame=image), shape)
    return trainer, batch


def run_iterations(trainer, batch, schedule):
    """Logs of the (phase, iteration) pairs in ``schedule``, timings left out."""
    logs = [trainer.iteration(phase, batch, it) for phase, it in schedule]
    return [{k: v for k, v in log.items() if k != "step_seconds"} for log in logs]
