"""The few-step generator rollout of one phase (the sampling
behind the paper's Eq. 11: frozen earlier phases, then this phase's generator).

Phase k's generator is fed by the frozen generators of phases 0..k-1 (no gradient through
them) and ends at the phase's level s = tau_k, where it is matched. Inside a phase of m steps,
stochastic gradient truncation (SGTS) picks an exit step j in 1..m: steps before j run without
gradient and step j jumps straight to s with gradient. The naive baseline instead keeps the
gradient through every step of the phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional, Sequence

import torch

from phased_dmd_mega import flow
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.schedule import PhaseLayout

STEP_RULES = ("euler", "stochastic")

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]


@dataclass
class Anchor:
    """The generator's sample at the phase's level ``s``, with what produced it."""

    x_s: torch.Tensor  # [B, ...]; carries the gradient of the exit step when asked for
    s: float
    x_exit: torch.Tensor  # input of the step that reached s (detached)
    t_exit: float  # its time
    flow_exit: torch.Tensor  # that step's flow prediction (with gradient when x_s has one)

    @cached_property
    def x0_student(self) -> torch.Tensor:
        """The student's own Euler-to-zero estimate from its exit step (the x0-form of DMD)."""
        return flow.x0_from_flow(self.x_exit, self.flow_exit, self.t_exit)


def step(
    x: torch.Tensor, velocity: torch.Tensor, t: float, t_next: float, rule: str, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """One sampling step from t to t_next: deterministic Euler, or x0 then fresh noise."""
    if rule == "euler" or t_next == 0.0:
        return flow.euler_step(x, velocity, t, t_next)
    if rule == "stochastic":
        noise = flow.seeded_normal(x, generator)
        return flow.renoise_step(x, velocity, t, t_next, noise)
    raise ValueError(f"step rule {rule!r} is not one of {', '.join(STEP_RULES)}")


def _timestep(t: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), t, dtype=torch.float32, device=like.device)


def rollout_to_phase_end(
    generators: Sequence[VelocityFn],
    layout: PhaseLayout,
    phase: int,
    noise: torch.Tensor,
    condition: Condition,
    exit_step: Optional[int],
    step_rule: str = "euler",
    with_grad: bool = True,
    noise_generator: Optional[torch.Generator] = None,
) -> Anchor:
    """Run the generators from pure noise (t = 1) to the end of ``phase``.

    ``generators[k]`` serves the steps of phase k. ``exit_step`` j (1-based, within ``phase``)
    is the SGTS exit: j - 1 steps without gradient, then one step to s with gradient (when
    ``with_grad``); None keeps the gradient through every step of ``phase`` (naive DMD).
    """
    steps = layout.steps_of_phase(phase)
    if exit_step is not None and not 1 <= exit_step <= len(steps):
        raise ValueError(f"exit step {exit_step} is outside 1..{len(steps)} for phase {phase}")
    times, s = layout.times, layout.phase_end(phase)
    x = condition.pin_first_frame(noise)  # TI2V: the given first frame stays the image's, at every step
    with torch.no_grad():
        for index in range(steps.start):  # earlier phases: frozen experts, no gradient
            velocity = generators[layout.phase_of_step[index]](x, _timestep(times[index], x), condition)
            x = condition.pin_first_frame(step(x, velocity, times[index], times[index + 1], step_rule, noise_generator))
    if exit_step is None:
        return _through_every_step(
            generators[phase], steps, times, x, condition, step_rule, with_grad, noise_generator, s
        )
    with torch.no_grad():
        for index in steps[: exit_step - 1]:
            velocity = generators[phase](x, _timestep(times[index], x), condition)
            x = condition.pin_first_frame(step(x, velocity, times[index], times[index + 1], step_rule, noise_generator))
    exit_index = steps[exit_step - 1]
    x_exit = x.detach()
    with torch.set_grad_enabled(with_grad):
        velocity = generators[phase](x_exit, _timestep(times[exit_index], x_exit), condition)
        x_s = condition.pin_first_frame(step(x_exit, velocity, times[exit_index], s, step_rule, noise_generator))
    return Anchor(x_s, s, x_exit, times[exit_index], velocity)


def _through_every_step(generator, steps, times, x, condition, step_rule, with_grad, noise_generator, s) -> Anchor:
    with torch.set_grad_enabled(with_grad):
        for index in steps:
            x_in = x
            velocity = generator(x_in, _timestep(times[index], x_in), condition)
            x = condition.pin_first_frame(
                step(x_in, velocity, times[index], times[index + 1], step_rule, noise_generator)
            )
    return Anchor(x, s, x_in.detach(), times[steps[-1]], velocity)
