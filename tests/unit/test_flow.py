"""Rectified-flow conversions against closed-form Gaussian posteriors (float64).

With data x0 ~ N(mu, v) every quantity is known exactly: the marginal flow
psi(x_t) = E[eps - x0 | x_t] and the posterior mean E[x_s | x_t]; the conversions must turn the
exact flow into the exact posterior means.
"""

import pytest
import torch

from phased_dmd_mega import flow

MU, VAR = 0.7, 0.3


def posterior_x0_mean(x_t, t):
    var_t = (1 - t) ** 2 * VAR + t**2
    return MU + (1 - t) * VAR / var_t * (x_t - (1 - t) * MU)


def exact_flow(x_t, t):
    x0 = posterior_x0_mean(x_t, t)
    eps = (x_t - (1 - t) * x0) / t
    return eps - x0


def posterior_xs_mean(x_t, s, t):
    """E[x_s | x_t] from x_s ~ N((1-s) mu, (1-s)^2 v + s^2), x_t = a x_s + sigma eps'."""
    mean_s, var_s = (1 - s) * MU, (1 - s) ** 2 * VAR + s**2
    a = (1 - t) / (1 - s)
    sigma_sq = t**2 - a**2 * s**2
    return mean_s + a * var_s / (a**2 * var_s + sigma_sq) * (x_t - a * mean_s)


X_T = torch.linspace(-3, 3, 13, dtype=torch.float64)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9375])
def test_x0_and_eps_from_the_exact_flow_are_the_posterior_means(t):
    psi = exact_flow(X_T, t)
    torch.testing.assert_close(flow.x0_from_flow(X_T, psi, t), posterior_x0_mean(X_T, t))
    x0 = posterior_x0_mean(X_T, t)
    torch.testing.assert_close(flow.eps_from_flow(X_T, psi, t), (X_T - (1 - t) * x0) / t)


@pytest.mark.parametrize("s, t", [(0.0, 0.6), (0.3, 0.6), (0.625, 0.9375), (0.8333, 0.99)])
def test_subinterval_tweedie_of_the_exact_flow_is_the_posterior_mean_of_x_s(s, t):
    psi = exact_flow(X_T, t)
    torch.testing.assert_close(flow.subinterval_tweedie(X_T, psi, s, t), posterior_xs_mean(X_T, s, t))


def test_score_matches_the_gaussian_marginal_score():
    t = 0.4
    var_t = (1 - t) ** 2 * VAR + t**2
    expected = -(X_T - (1 - t) * MU) / var_t
    torch.testing.assert_close(flow.score_from_flow(X_T, exact_flow(X_T, t), t), expected)


def test_per_sample_times_broadcast_over_each_sample():
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    v = torch.randn(3, 2, 4, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    out = flow.x0_from_flow(x, v, t)
    for b in range(3):
        torch.testing.assert_close(out[b], x[b] - t[b] * v[b])


def test_steps_land_on_the_next_level():
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    t, t_next = 0.9, 0.4
    x_t = (1 - t) * x0 + t * eps
    v = eps - x0  # the conditional flow: a straight line
    torch.testing.assert_close(flow.euler_step(x_t, v, t, t_next), (1 - t_next) * x0 + t_next * eps)
    fresh = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(flow.renoise_step(x_t, v, t, t_next, fresh), (1 - t_next) * x0 + t_next * fresh)


def test_seeded_normal_draws_on_the_generators_device_then_moves():
    from phased_dmd_mega.flow import seeded_normal

    like = torch.zeros(3, 4, dtype=torch.float64, device="meta")  # stands in for a GPU tensor
    drawn = seeded_normal(like, torch.Generator().manual_seed(7))
    assert drawn.device.type == "meta" and drawn.dtype == torch.float64
    cpu = seeded_normal(torch.zeros(3, 4, dtype=torch.float64), torch.Generator().manual_seed(7))
    assert torch.equal(cpu, torch.randn(3, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64))


# ----------------------------------------------------------------------------- keyed CPU draws on a device


def _keyed(seed=5):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_to_device_and_seeded_normal_give_exactly_the_generators_draw(dtype):
    reference = torch.randn(3, 4, 5, generator=_keyed(), dtype=dtype)
    assert torch.equal(flow.host_to_device(torch.randn(3, 4, 5, generator=_keyed(), dtype=dtype), "cpu"), reference)
    assert torch.equal(flow.seeded_normal(torch.zeros(3, 4, 5, dtype=dtype), _keyed()), reference)


def test_renoise_times_moved_to_a_device_are_the_drawn_ones():
    from phased_dmd_mega.schedule import PhaseLayout, sample_renoise_t

    layout = PhaseLayout.build(4, num_phases=2, shift=5.0)
    drawn = sample_renoise_t(layout, 1, 16, _keyed())
    assert torch.equal(sample_renoise_t(layout, 1, 16, _keyed(), device="cpu"), drawn)


@pytest.mark.gpu
def test_keyed_cpu_draws_reach_a_gpu_unchanged():
    from phased_dmd_mega.schedule import PhaseLayout, sample_renoise_t

    reference = torch.randn(2, 3, 4, generator=_keyed())
    moved = flow.host_to_device(torch.randn(2, 3, 4, generator=_keyed()), "cuda")
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), reference)
    assert torch.equal(flow.seeded_normal(torch.zeros(2, 3, 4, device="cuda"), _keyed()).cpu(), reference)
    layout = PhaseLayout.build(4, num_phases=2, shift=5.0)
    on_gpu = sample_renoise_t(layout, 0, 16, _keyed(), device="cuda")
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), sample_renoise_t(layout, 0, 16, _keyed()))
