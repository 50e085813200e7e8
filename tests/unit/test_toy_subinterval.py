"""The 1-D experiment of the paper (Fig. 2), fast version: the subinterval target is right and the
naive one is not."""

import importlib.util
import sys

import pytest
import torch

from helpers import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "toy_subinterval.py"


@pytest.fixture(scope="module")
def toy():
    # examples/ is not a package: load the script as a module (registered, as dataclasses need).
    spec = importlib.util.spec_from_file_location("toy_subinterval", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(autouse=True)
def one_thread():
    # Small tensors: one thread is as fast, does not stall on a busy machine, and keeps the
    # results independent of the core count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_exact_field_transports_noise_to_the_marginal(toy):
    # The closed-form field must be right for the comparison to mean anything: integrating it
    # from N(0, 1) at t = 1 lands on p(x_s) (W1 at the level of the sampling noise of 4000 points).
    data = toy.GaussianMixture1D()
    x1 = torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ends = toy.integrate_rk4(data.velocity, x1, 50)[-1]
    fresh = data.sample_xt(toy.S, 4000, torch.Generator().manual_seed(1))
    assert toy.wasserstein1_to_marginal(ends, data, toy.S) < 0.05
    assert toy.wasserstein1_to_marginal(fresh, data, toy.S) < 0.05
    # At t = 1 the field is x - E[x0].
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    mean_x0 = sum(w * m for w, m in zip(data.weights, data.means))
    torch.testing.assert_close(data.velocity(x, torch.tensor(1.0, dtype=torch.float64)), x - mean_x0)


def test_subinterval_target_regresses_to_the_exact_field(toy):
    # E[v* | x_t] is the marginal velocity: average the target over many (x_s, eps) pairs that
    # land in a narrow bin of x_t and compare with the closed form there.
    data, g = toy.GaussianMixture1D(), torch.Generator().manual_seed(2)
    n, t_value = 400000, 0.8
    x_s = data.sample_xt(toy.S, n, g)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    s, t = torch.full((n,), toy.S, dtype=torch.float64), torch.full((n,), t_value, dtype=torch.float64)
    x_t = toy.subinterval_noise(x_s, eps, s, t)
    target = toy.subinterval_target(x_s, eps, s, t)
    for centre in (-1.0, 0.5, 2.0):
        in_bin = (x_t - centre).abs() < 0.05
        exact = data.velocity(torch.tensor([centre], dtype=torch.float64), torch.tensor(t_value, dtype=torch.float64))
        assert float(target[in_bin].mean()) == pytest.approx(float(exact), abs=0.05)


def test_correct_subinterval_target_follows_the_exact_trajectories(toy, tmp_path):
    png = tmp_path / "toy.png"
    results = toy.run_experiment(fast=True, seed=0, out_png=str(png))
    correct, naive, full = results["subinterval"], results["naive"], results["full"]
    assert naive["trajectory_mae"] >= 3 * correct["trajectory_mae"]
    assert naive["endpoint_mae"] >= 3 * correct["endpoint_mae"]
    # The correct subinterval model is about as good as the full-interval reference.
    assert correct["trajectory_mae"] < 3 * full["trajectory_mae"] + 0.01
    assert naive["w1_to_p_xs"] > 2 * correct["w1_to_p_xs"]
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_experiment_is_deterministic(toy):
    a = toy.run_experiment(fast=True, seed=3, out_png=None, train_iterations=50)
    b = toy.run_experiment(fast=True, seed=3, out_png=None, train_iterations=50)
    for name in ("full", "subinterval", "naive"):
        assert a[name] == b[name]
