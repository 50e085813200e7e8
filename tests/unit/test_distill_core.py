"""Roles, the phased rollout and the two objectives, on small stand-in velocity models.

For data that is a single point c, the exact flow is psi(x_t, t) = (x_t - c) / t and Euler
steps are exact: from noise z every step lands on (1 - t) c + t z. That pins down the rollout's
times; small learnable models pin down where gradients flow.
"""

import pytest
import torch
from torch import nn

from phased_dmd_mega import flow, losses
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.distill.objectives import fake_score_loss, generator_dmd_loss, renoise
from phased_dmd_mega.distill.roles import Experts, GuidedTeacher, call_dit
from phased_dmd_mega.distill.rollout import rollout_to_phase_end
from phased_dmd_mega.schedule import PhaseLayout

B = 3


def condition(batch=B, width=2):
    gen = torch.Generator().manual_seed(1)
    return Condition(context=torch.randn(batch, 4, width, generator=gen))


class PointMassFlow(nn.Module):
    """The exact flow toward the point c (a DiT stand-in: takes 1000 * t)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c
        self.calls = 0

    def forward(self, x, timestep, context, **kwargs):
        self.calls += 1
        t = (timestep / 1000).reshape(-1, *([1] * (x.dim() - 1)))
        return (x - self.c) / t


class Scaled(nn.Module):
    """A learnable flow: a * x + b (per model), to see where gradients go."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x, timestep, context, **kwargs):
        return self.a * x + self.b + 0 * timestep.reshape(-1, *([1] * (x.dim() - 1)))


def as_velocity(model):
    return Experts(model)


# ----------------------------------------------------------------------------- roles


def test_call_dit_passes_the_1000_scale_extra_channels_and_mask():
    seen = {}

    def model(latents, timestep, context, **kwargs):
        seen.update(latents=latents, timestep=timestep, kwargs=kwargs)
        return latents[:, :2]

    x = torch.randn(B, 2, 3)
    cond = Condition(torch.randn(B, 4, 2), context_mask=torch.ones(B, 4), concat_latents=torch.randn(B, 5, 3))
    out = call_dit(model, x, torch.tensor([0.5, 0.25, 1.0]), cond)
    assert seen["latents"].shape == (B, 7, 3) and torch.equal(out, x)
    assert torch.equal(seen["timestep"], torch.tensor([500.0, 250.0, 1000.0]))
    assert set(seen["kwargs"]) == {"context_mask"}


def test_experts_route_each_sample_by_its_time():
    experts = Experts(PointMassFlow(10.0), PointMassFlow(-10.0), boundary=0.875)
    x = torch.zeros(4, 2)
    t = torch.tensor([0.9, 0.5, 0.875, 0.1])
    out = experts(x, t, condition(4))
    expected_c = torch.tensor([10.0, -10.0, 10.0, -10.0])  # t >= boundary: high-noise expert
    torch.testing.assert_close(out, ((0 - expected_c) / t)[:, None].expand(4, 2))


def test_experts_need_a_boundary_with_two_models():
    with pytest.raises(ValueError, match="two experts need a boundary"):
        Experts(PointMassFlow(0.0), PointMassFlow(1.0))


def test_guided_teacher_uses_each_experts_scale():
    class ContextFlow(nn.Module):
        def forward(self, x, timestep, context, **kwargs):
            return x + context.mean(dim=(1, 2)).reshape(-1, 1)

    teacher = GuidedTeacher(
        Experts(ContextFlow(), ContextFlow(), boundary=0.5), guidance_scale=4.0, guidance_scale_low_noise=3.0
    )
    x, t = torch.zeros(2, 3), torch.tensor([0.9, 0.2])
    cond = Condition(torch.ones(2, 1, 1))
    negative = Condition(torch.zeros(2, 1, 1))
    # conditional = 1, unconditional = 0: guided = 0 + g * (1 - 0) = g
    torch.testing.assert_close(teacher(x, t, cond, negative), torch.tensor([[4.0] * 3, [3.0] * 3]))


@pytest.mark.parametrize("mode", ["none", "layer_norm", "scalar"])
def test_cfg_norm_rescales_the_guided_velocity_as_the_official_recipes_define_it(mode):
    class RandomFlow(nn.Module):  # conditional and unconditional velocities of different sizes
        def forward(self, x, timestep, context, **kwargs):
            gen = torch.Generator().manual_seed(int(context.sum().item() * 7) % 1000)
            return torch.randn(x.shape, generator=gen) * (1 + context.mean())

    teacher = GuidedTeacher(Experts(RandomFlow()), guidance_scale=4.0, cfg_norm=mode)
    x, t = torch.zeros(2, 3, 1, 2, 5), torch.tensor([0.9, 0.2])
    cond, negative = Condition(torch.ones(2, 1, 1)), Condition(torch.zeros(2, 1, 1))
    both = RandomFlow()(torch.cat([x, x]), None, torch.cat([cond.context, negative.context])).double()
    c, u = both.chunk(2)
    p = u + 4.0 * (c - u)
    if mode == "layer_norm":  # each row along the last axis (W) to the conditional's norm
        want = p * c.norm(dim=-1, keepdim=True) / p.norm(dim=-1, keepdim=True)
    elif mode == "scalar":  # the whole tensor, down only
        want = p * min(1.0, (c.norm() / p.norm()).item())
    else:
        want = p
    torch.testing.assert_close(teacher(x, t, cond, negative).double(), want, rtol=1e-5, atol=1e-6)


def test_cfg_norm_comes_from_the_run_config_and_bad_values_are_refused(tmp_path):
    from phased_dmd_mega.config import ConfigError, load_config

    assert load_config(None, ["phases.cfg_norm=layer_norm"]).phases.cfg_norm == "layer_norm"
    with pytest.raises(ConfigError, match="cfg_norm"):
        load_config(None, ["phases.cfg_norm=rms"])


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_a_shared_guidance_scale_is_applied_without_reading_the_times_back(monkeypatch, scale):
    """One scale for every sample (one expert, or experts with the same scale): whether to run
    the unconditional branch follows from the settings; no tensor value is read into Python (a
    host sync per teacher call on a GPU)."""

    class Calls(nn.Module):
        batches = []

        def forward(self, x, timestep, context, **kwargs):
            self.batches.append(x.shape[0])
            return x + context.mean(dim=(1, 2)).reshape(-1, 1)

    teacher = GuidedTeacher(Experts(Calls()), guidance_scale=scale)
    x, t = torch.zeros(2, 3), torch.tensor([0.9, 0.2])

    def no_reads(self):
        raise AssertionError("a tensor value was read")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_reads)
    out = teacher(x, t, Condition(torch.ones(2, 1, 1)), Condition(torch.zeros(2, 1, 1)))
    monkeypatch.undo()
    assert Calls.batches == ([2] if scale == 1.0 else [4])  # both CFG branches in one batch
    torch.testing.assert_close(out, torch.full((2, 3), scale))


# ----------------------------------------------------------------------------- rollout

LAYOUT = PhaseLayout.build(4, num_phases=2, shift=5.0)  # t = 1, .9375, .8333, .625, 0


@pytest.mark.parametrize("phase", [0, 1])
@pytest.mark.parametrize("exit_step", [1, 2, None])
def test_rollout_lands_on_the_phase_level(phase, exit_step):
    c = 2.0
    noise = torch.randn(B, 5, generator=torch.Generator().manual_seed(0))
    generators = [as_velocity(PointMassFlow(c)) for _ in range(2)]
    anchor = rollout_to_phase_end(generators, LAYOUT, phase, noise, condition(), exit_step)
    s = LAYOUT.phase_end(phase)
    assert anchor.s == s
    torch.testing.assert_close(anchor.x_s, (1 - s) * c + s * noise)
    torch.testing.assert_close(anchor.x0_student, torch.full_like(noise, c))


def test_stochastic_rule_keeps_the_sample_on_its_level():
    c = -1.0
    generators = [as_velocity(PointMassFlow(c)) for _ in range(2)]
    noise = torch.randn(B, 1000, generator=torch.Generator().manual_seed(0))
    anchor = rollout_to_phase_end(
        generators,
        LAYOUT,
        0,
        noise,
        condition(),
        2,
        step_rule="stochastic",
        noise_generator=torch.Generator().manual_seed(5),
    )
    s = LAYOUT.phase_end(0)
    fresh = (anchor.x_s - (1 - s) * c) / s  # the noise at level s: fresh, standard normal
    assert not torch.allclose(fresh, noise)
    assert abs(fresh.mean()) < 0.1 and abs(fresh.std() - 1) < 0.1


def test_sgts_gradient_reaches_only_the_exit_step_of_the_trained_phase():
    frozen, trained = Scaled(0.5, 0.1), Scaled(0.3, -0.2)
    generators = [as_velocity(frozen), as_velocity(trained)]
    noise = torch.randn(B, 4, generator=torch.Generator().manual_seed(0))
    anchor = rollout_to_phase_end(generators, LAYOUT, 1, noise, condition(), exit_step=2)
    anchor.x_s.sum().backward()
    assert frozen.a.grad is None and frozen.b.grad is None
    # Manual: phase 0 (steps 0,1) frozen, step 2 without grad, step 3 (the exit) jumps to s = 0.
    t = LAYOUT.times
    with torch.no_grad():
        x = noise
        for i, model in ((0, frozen), (1, frozen), (2, trained)):
            x = x + (t[i + 1] - t[i]) * (model.a * x + model.b)
    # x_s = x + (0 - t3) (a x + b): d/da = -t3 * sum(x), d/db = -t3 * numel
    torch.testing.assert_close(trained.a.grad, -t[3] * x.sum())
    torch.testing.assert_close(trained.b.grad, torch.tensor(-t[3] * x.numel()))


def test_naive_rollout_backpropagates_through_every_step_of_the_phase():
    trained = Scaled(0.3, -0.2)
    generators = [as_velocity(Scaled(0.5, 0.1)), as_velocity(trained)]
    noise = torch.randn(B, 4, generator=torch.Generator().manual_seed(0))
    anchor = rollout_to_phase_end(generators, LAYOUT, 1, noise, condition(), exit_step=None)
    anchor.x_s.sum().backward()
    grad_a = trained.a.grad.clone()
    # Same chain written out with autograd on a fresh copy.
    a, b = torch.tensor(0.3, requires_grad=True), torch.tensor(-0.2, requires_grad=True)
    t = LAYOUT.times
    with torch.no_grad():
        x = noise
        for i in (0, 1):
            x = x + (t[i + 1] - t[i]) * (0.5 * x + 0.1)
    for i in (2, 3):
        x = x + (t[i + 1] - t[i]) * (a * x + b)
    x.sum().backward()
    torch.testing.assert_close(grad_a, a.grad)


def test_exit_step_outside_the_phase_is_refused():
    generators = [as_velocity(PointMassFlow(0.0))] * 2
    with pytest.raises(ValueError, match="exit step 3 is outside 1..2 for phase 0"):
        rollout_to_phase_end(generators, LAYOUT, 0, torch.randn(B, 2), condition(), 3)


# ----------------------------------------------------------------------------- objectives


def test_fake_loss_is_the_subinterval_flow_loss_and_trains_only_the_fake():
    fake_model = Scaled(0.2, 0.0)
    x_s = torch.randn(B, 6, requires_grad=True)
    t = torch.tensor([0.9, 0.95, 0.99])
    noised = renoise(x_s, 0.625, t, torch.Generator().manual_seed(2))
    loss, logged = fake_score_loss(Experts(fake_model), x_s, 0.625, noised, condition())
    assert torch.equal(logged, loss.detach())  # one process: the partial is the whole value
    expected = losses.subinterval_flow_loss(
        0.2 * noised.x_t, x_s.detach(), noised.eps, torch.full((B,), 0.625), t
    ).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert fake_model.a.grad is not None and x_s.grad is None


def test_dmd_loss_vanishes_when_the_fake_equals_the_teacher():
    generator = Scaled(0.3, 0.1)
    anchor = rollout_to_phase_end([as_velocity(generator)] * 2, LAYOUT, 0, torch.randn(B, 4), condition(), 1)
    noised = renoise(anchor.x_s, anchor.s, torch.tensor([0.9, 0.95, 0.97]))
    same = PointMassFlow(1.0)
    out = generator_dmd_loss(anchor, noised, GuidedTeacher(Experts(same), 1.0), Experts(same), condition(), condition())
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and generator.a.grad.abs().item() == 0.0


@pytest.mark.parametrize("form", ["subinterval", "x0"])
def test_dmd_gradient_on_the_anchor_is_the_normalised_estimate_gap(form):
    generator = Scaled(0.3, 0.1)
    anchor = rollout_to_phase_end([as_velocity(generator)] * 2, LAYOUT, 0, torch.randn(B, 4), condition(), 2)
    anchor.x_s.retain_grad()
    student = anchor.x_s if form == "subinterval" else anchor.x0_student
    student.retain_grad()
    t = torch.tensor([0.9, 0.95, 0.97])
    noised = renoise(anchor.x_s, anchor.s, t, torch.Generator().manual_seed(3))
    teacher, fake = PointMassFlow(1.0), PointMassFlow(-0.5)
    out = generator_dmd_loss(
        anchor, noised, GuidedTeacher(Experts(teacher), 1.0), Experts(fake), condition(), condition(), dmd_form=form
    )
    out["loss"].backward()
    with torch.no_grad():
        v_real, v_fake = teacher(noised.x_t, 1000 * t, None), fake(noised.x_t, 1000 * t, None)
        if form == "subinterval":
            real = flow.subinterval_tweedie(noised.x_t, v_real, anchor.s, t)
            fake_est = flow.subinterval_tweedie(noised.x_t, v_fake, anchor.s, t)
        else:
            real, fake_est = flow.x0_from_flow(noised.x_t, v_real, t), flow.x0_from_flow(noised.x_t, v_fake, t)
        norm = (student - real).abs().mean(dim=1, keepdim=True).clamp(min=1e-4)
        expected = (fake_est - real) / norm / student.numel()
    torch.testing.assert_close(student.grad, expected)
