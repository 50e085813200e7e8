"""What follows a generator after each of its updates: its EMA copy (``optimizer.ema_decay``),
and, with implicit distribution alignment (SenseFlow's IDA, ``optimizer.ida_decay``), after each
generator update of phase k, phase k's fake model is pulled toward that generator,

    theta_F <- decay * theta_F + (1 - decay) * theta_G,

parameter by parameter, for every parameter the generator trains (a full copy's weights, or a
LoRA role's A and B matrices, each on its own). The fake expert pulled is the one started from the
same base as the generator (a two-expert fake of a low-noise phase: its low-noise expert; the
high-noise one it also holds is left alone), so names and shapes match. The official Phased DMD
recipes use a decay of 0.97 (docs/official_recipes.md).

Nothing besides the fake's weights changes, so checkpoints need no extra state. Under
megatron's distributed optimizer with bf16/fp16 weights the fake's fp32 main copy (this rank's
slice of it) is pulled as well, so that the next AdamW step continues from the pulled weights.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from phased_dmd_mega.distill.optim import MAIN_PARAM, DistributedRoleOptimizer
from phased_dmd_mega.distill.roles import Experts
from phased_dmd_mega.schedule import PhaseLayout


def paired_fake_expert(fake: Experts, layout: PhaseLayout, phase: int) -> Tuple[str, nn.Module]:
    """(its name in the fake, the expert) that phase ``phase``'s generator is paired with."""
    if fake.low is None or layout.phase_is_high_noise(phase, fake.boundary):
        return "high", fake.high
    return "low", fake.low


def paired_parameters(fake_expert: nn.Module, generator: nn.Module) -> List[Tuple[str, nn.Parameter, nn.Parameter]]:
    """(name, the fake's parameter, the generator's) for every parameter the generator trains."""
    fake_params = dict(fake_expert.named_parameters())
    pairs = []
    for name, param in generator.named_parameters():
        if not param.requires_grad:
            continue
        other = fake_params.get(name)
        if other is None or other.shape != param.shape:
            found = None if other is None else tuple(other.shape)
            raise ValueError(f"IDA: the fake has no parameter {name} of shape {tuple(param.shape)} (found {found})")
        pairs.append((name, other, param))
    return pairs


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for shadow, param in zip(ema.parameters(), model.parameters()):
        shadow.lerp_(param.detach(), 1.0 - decay)


@torch.no_grad()
def pull_fake_toward_generator(fake_role, generator: Experts, layout: PhaseLayout, phase: int, decay: float) -> None:
    """One IDA update of phase ``phase``'s fake role (its optimizer wrapper) toward its generator."""
    expert_name, fake_expert = paired_fake_expert(fake_role.model, layout, phase)
    pairs = paired_parameters(fake_expert, generator.high)
    for _, fake_param, generator_param in pairs:
        fake_param.lerp_(generator_param.to(fake_param.dtype), 1.0 - decay)
    # fp32 weights are their own main copy (megatron's shards are views of them)
    if isinstance(fake_role, DistributedRoleOptimizer) and pairs and pairs[0][1].dtype != torch.float32:
        targets = {f"{expert_name}.{name}": generator_param for name, _, generator_param in pairs}
        _pull_main_shards(fake_role, targets, decay)


def _pull_main_shards(role: DistributedRoleOptimizer, targets: Dict[str, nn.Parameter], decay: float) -> None:
    """The fp32 main copies (where they are not the weights themselves): this rank's slice of
    each pulled toward the same slice of the generator's weights."""
    for name, owned in role.owned_slices().items():
        main = owned.states.get(MAIN_PARAM)
        if main is None or name not in targets:
            continue
        target = targets[name].detach().reshape(-1)[owned.start : owned.stop].to(main.dtype)
        main.lerp_(target, 1.0 - decay)
