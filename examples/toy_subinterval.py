"""The paper's 1-D experiment (Fig. 2): flow matching within a subinterval needs the right target.

Data is a 1-D Gaussian mixture, so the marginal velocity field of rectified flow
``x_t = (1-t) x0 + t eps`` is known in closed form. Three small MLP velocity models are trained
and integrated from t = 1 down to s = 0.5, from the same starting noises, next to the exact ODE:

- ``full``: ordinary flow matching on [0, 1] with the target ``eps - x0`` (the reference);
- ``subinterval``: trained only on (s, 1] from samples ``x_s ~ p(x_s)``, with the subinterval
  target ``c_eps * eps - x_s / alpha_s`` (arXiv 2510.27684's Eq. 12, ``phased_dmd_mega.losses``);
- ``naive``: the same inputs ``x_t = alpha_{t|s} x_s + sigma_{t|s} eps``, but the target
  ``eps - x_s`` (x_s treated as clean data). Only the target differs from ``subinterval``.

The correct subinterval model follows the exact trajectories as well as the full model does; the
naive one drifts away, and its end points do not follow ``p(x_s)``.

    .venv/bin/python examples/toy_subinterval.py --fast --out runs/toy_subinterval.png
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from phased_dmd_mega.losses import subinterval_noise, subinterval_target
from phased_dmd_mega.schedule import PhaseLayout, sample_renoise_t

S = 0.5  # the subinterval's lower end (the anchor time)
VelocityField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B], t [B]) -> v [B]


# ----------------------------------------------------------------------------- exact data and field


@dataclass(frozen=True)
class GaussianMixture1D:
    """``p(x0) = sum_k w_k N(mu_k, std_k^2)``; everything below is closed form in float64."""

    # Well separated and with a non-zero mean, so that p(x_s) at s = 0.5 is still multimodal.
    weights: Sequence[float] = (0.25, 0.5, 0.25)
    means: Sequence[float] = (-3.0, 1.0, 4.0)
    stds: Sequence[float] = (0.4, 0.5, 0.4)

    def _params(self):
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return as_tensor(self.weights), as_tensor(self.means), as_tensor(self.stds)

    def sample_x0(self, n: int, generator: torch.Generator) -> torch.Tensor:
        w, mu, std = self._params()
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        return mu[k] + std[k] * torch.randn(n, generator=generator, dtype=torch.float64)

    def sample_xt(self, t: float, n: int, generator: torch.Generator) -> torch.Tensor:
        """Exact forward process: x_t = (1-t) x0 + t eps."""
        x0 = self.sample_x0(n, generator)
        return (1 - t) * x0 + t * torch.randn(n, generator=generator, dtype=torch.float64)

    def _components_at(self, t: torch.Tensor):
        # Given component k, x_t ~ N(a mu_k, a^2 std_k^2 + t^2) with a = 1 - t.
        w, mu, std = self._params()
        a = (1 - t).unsqueeze(-1)
        tt = t.unsqueeze(-1)
        return w, mu, std, a, tt, a * mu, a**2 * std**2 + tt**2

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The marginal field ``E[eps - x0 | x_t = x]``, vectorised over a batch [B].

        Per component, (x0, eps, x_t) are jointly Gaussian, so
        ``E[x0 | x, k] = mu_k + a std_k^2 / var_k * (x - a mu_k)`` and
        ``E[eps | x, k] = t / var_k * (x - a mu_k)``, i.e. the affine per-component flow
        ``v_k(x) = (t - a std_k^2) / var_k * (x - a mu_k) - mu_k``. The marginal field is their
        mixture weighted by the posterior ``p(k | x_t = x)``.
        """
        x, t = x.double(), t.double().expand_as(x)
        w, mu, std, a, tt, mean, var = self._components_at(t)
        xk = x.unsqueeze(-1)
        log_joint = torch.log(w) - 0.5 * torch.log(2 * math.pi * var) - 0.5 * (xk - mean) ** 2 / var
        posterior = torch.softmax(log_joint, dim=-1)
        per_component = (tt - a * std**2) / var * (xk - mean) - mu
        return (posterior * per_component).sum(-1)

    def cdf(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """CDF of the marginal p(x_t)."""
        w, mu, std, a, tt, mean, var = self._components_at(torch.tensor(t, dtype=torch.float64))
        z = (x.double().unsqueeze(-1) - mean) / var.sqrt()
        return (w * 0.5 * (1 + torch.erf(z / math.sqrt(2)))).sum(-1)

    def density(self, x: torch.Tensor, t: float) -> torch.Tensor:
        w, mu, std, a, tt, mean, var = self._components_at(torch.tensor(t, dtype=torch.float64))
        xk = x.double().unsqueeze(-1)
        return (w * torch.exp(-0.5 * (xk - mean) ** 2 / var) / torch.sqrt(2 * math.pi * var)).sum(-1)


# ----------------------------------------------------------------------------- subinterval maths
# x_t = alpha_{t|s} x_s + sigma_{t|s} eps and the target c_eps * eps - x_s / alpha_s come from the
# trainer's own losses module (subinterval_noise / subinterval_target), so this experiment checks
# the code that trains the fake models, not a copy of it.


def subinterval_weight(s: torch.Tensor, t: torch.Tensor, clamp: float) -> torch.Tensor:
    """``min(1, C sigma_{t|s}^2)`` (spec eq. 13): the target's noise grows like 1/sigma_{t|s}
    as t -> s; the weight keeps the regression's variance finite without moving its minimum
    (it depends on t only)."""
    sigma_ts_squared = t**2 - ((1 - t) / (1 - s)) ** 2 * s**2
    return (clamp * sigma_ts_squared).clamp(min=0.0, max=1.0)


# ----------------------------------------------------------------------------- models and training


class VelocityMLP(nn.Module):
    """v(x_t, t) for scalar x: a small SiLU MLP on the pair (x, t)."""

    def __init__(self, width: int = 64, depth: int = 3):
        super().__init__()
        layers, size = [], 2
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.SiLU()]
            size = width
        layers.append(nn.Linear(size, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inputs = torch.stack([x, t.expand_as(x)], dim=-1).float()
        return self.net(inputs).squeeze(-1).double()


@dataclass(frozen=True)
class TrainSettings:
    iterations: int
    batch: int = 512
    lr: float = 3e-3
    weight_clamp: float = 20.0


def full_interval_batch(data: GaussianMixture1D, batch: int, generator: torch.Generator):
    """Ordinary flow matching on [0, 1]: inputs (x_t, t), target eps - x0, unit weights."""
    x0 = data.sample_x0(batch, generator)
    eps = torch.randn(batch, generator=generator, dtype=torch.float64)
    t = torch.rand(batch, generator=generator, dtype=torch.float64)
    return (1 - t) * x0 + t * eps, t, eps - x0, torch.ones_like(t)


def subinterval_batch(data: GaussianMixture1D, batch: int, generator: torch.Generator, naive: bool, clamp: float):
    """Training pairs on (s, 1] from anchors x_s ~ p(x_s) only (no access to x0)."""
    x_s = data.sample_xt(S, batch, generator)
    # t uniform on (s, 1]: a 2-step 2-phase layout with no shift has phase 0 ending at s = 0.5.
    t = sample_renoise_t(_TOY_LAYOUT, 0, batch, generator, dtype=torch.float64)
    s = torch.full_like(t, S)
    eps = torch.randn(batch, generator=generator, dtype=torch.float64)
    x_t = subinterval_noise(x_s, eps, s, t)
    target = eps - x_s if naive else subinterval_target(x_s, eps, s, t)
    return x_t, t, target, subinterval_weight(s, t, clamp)


_TOY_LAYOUT = PhaseLayout.build(2, num_phases=2, shift=1.0)
assert _TOY_LAYOUT.phase_end(0) == S


def train_velocity_model(
    make_batch: Callable[[torch.Generator], tuple], settings: TrainSettings, seed: int
) -> VelocityMLP:
    """Adam with a cosine-decayed learning rate; the decay removes most of the SGD noise."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VelocityMLP()
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.iterations)
    for _ in range(settings.iterations):
        x_t, t, target, weight = make_batch(generator)
        loss = (weight * (model(x_t, t) - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


# ----------------------------------------------------------------------------- sampling and errors


@torch.no_grad()
def integrate_rk4(field: VelocityField, x1: torch.Tensor, num_steps: int, t_end: float = S) -> torch.Tensor:
    """Solve dx/dt = v(x, t) from t = 1 down to ``t_end``; returns [num_steps + 1, B]."""
    times = torch.linspace(1.0, t_end, num_steps + 1, dtype=torch.float64)
    x, path = x1.double(), [x1.double()]
    for t0, t1 in zip(times[:-1], times[1:]):
        h = t1 - t0
        k1 = field(x, t0)
        k2 = field(x + 0.5 * h * k1, t0 + 0.5 * h)
        k3 = field(x + 0.5 * h * k2, t0 + 0.5 * h)
        k4 = field(x + h * k3, t1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        path.append(x)
    return torch.stack(path)


def wasserstein1_to_marginal(samples: torch.Tensor, data: GaussianMixture1D, t: float) -> float:
    """W1 between the empirical law of ``samples`` and p(x_t): the integral of |F_emp - F|."""
    grid = torch.linspace(-6.0, 6.0, 6001, dtype=torch.float64)
    empirical = torch.searchsorted(samples.double().sort().values, grid, right=True) / samples.numel()
    gap = (empirical - data.cdf(grid, t)).abs()
    return float(torch.trapezoid(gap, grid))


def trajectory_errors(path: torch.Tensor, exact: torch.Tensor, data: GaussianMixture1D) -> Dict[str, float]:
    return {
        "endpoint_mae": float((path[-1] - exact[-1]).abs().mean()),
        "trajectory_mae": float((path - exact).abs().mean()),
        "w1_to_p_xs": wasserstein1_to_marginal(path[-1], data, S),
    }


# ----------------------------------------------------------------------------- experiment


MODEL_TITLES = {
    "full": "(a) full interval [0, 1], target eps - x0",
    "subinterval": "(b) subinterval (0.5, 1], correct target",
    "naive": "(c) subinterval (0.5, 1], naive target eps - x_s",
}


def run_experiment(
    fast: bool,
    seed: int,
    out_png: Optional[str],
    train_iterations: Optional[int] = None,
) -> Dict[str, object]:
    """Train the three models, integrate them and the exact field, return the errors.

    Returns ``{"full"|"subinterval"|"naive": {"endpoint_mae", "trajectory_mae", "w1_to_p_xs"},
    "exact": {"w1_to_p_xs"}, "seconds": float, "png": path or None}``; the errors compare each
    model's ODE solution with the exact one from the same noise on t in [0.5, 1].
    """
    started = time.perf_counter()
    data = GaussianMixture1D()
    settings = TrainSettings(iterations=train_iterations or (1500 if fast else 8000), batch=512 if fast else 1024)
    batches = {
        "full": lambda g: full_interval_batch(data, settings.batch, g),
        "subinterval": lambda g: subinterval_batch(data, settings.batch, g, naive=False, clamp=settings.weight_clamp),
        "naive": lambda g: subinterval_batch(data, settings.batch, g, naive=True, clamp=settings.weight_clamp),
    }
    models = {
        name: train_velocity_model(make, settings, seed + 10 * i) for i, (name, make) in enumerate(batches.items())
    }

    num_samples, ode_steps = (2000, 40) if fast else (10000, 100)
    x1 = torch.randn(num_samples, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    exact = integrate_rk4(data.velocity, x1, ode_steps)
    paths = {name: integrate_rk4(model, x1, ode_steps) for name, model in models.items()}

    results: Dict[str, object] = {name: trajectory_errors(path, exact, data) for name, path in paths.items()}
    results["exact"] = {"w1_to_p_xs": wasserstein1_to_marginal(exact[-1], data, S)}
    results["png"] = None
    if out_png:
        plot_trajectories(paths, exact, data, out_png)
        results["png"] = str(out_png)
    results["seconds"] = time.perf_counter() - started
    return results


def plot_trajectories(
    paths: Dict[str, torch.Tensor], exact: torch.Tensor, data: GaussianMixture1D, out_png: str, shown: int = 40
) -> None:
    """One panel per model (its trajectories over the exact ones) and the end-point histograms
    against the true density p(x_s)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 4.5))
    FigureCanvasAgg(fig)  # headless (Agg), without touching pyplot's global state
    axes = fig.subplots(1, 4, sharey=True)
    times = torch.linspace(1.0, S, exact.shape[0])
    pick = torch.linspace(0, exact.shape[1] - 1, shown).long()
    colors = {"full": "tab:blue", "subinterval": "tab:green", "naive": "tab:red"}
    for ax, (name, path) in zip(axes, paths.items()):
        ax.plot(times, exact[:, pick], color="black", lw=0.8, ls="--", alpha=0.7)
        ax.plot(times, path[:, pick], color=colors[name], lw=1.0, alpha=0.8)
        mae = float((path[-1] - exact[-1]).abs().mean())
        ax.set_title(f"{MODEL_TITLES[name]}\nend-point MAE {mae:.3f}", fontsize=9)
        ax.set_xlim(1.0, S)
        ax.set_xlabel("t")
    axes[0].set_ylabel("x_t  (dashed: exact ODE)")
    grid = torch.linspace(-4, 4, 400, dtype=torch.float64)
    hist_ax = axes[3]
    hist_ax.plot(data.density(grid, S), grid, color="black", lw=1.5, label="true p(x_s)")
    for name, path in paths.items():
        hist_ax.hist(
            path[-1].numpy(),
            bins=60,
            range=(-4, 4),
            density=True,
            orientation="horizontal",
            histtype="step",
            color=colors[name],
            label=name,
        )
    hist_ax.set_title("end points at t = s = 0.5", fontsize=9)
    hist_ax.set_xlabel("density")
    hist_ax.legend(fontsize=8)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def _print_results(results: Dict[str, object]) -> None:
    print(f"{'model':<12} {'end-point MAE':>14} {'trajectory MAE':>15} {'W1 to p(x_s)':>13}")
    for name in ("full", "subinterval", "naive"):
        r = results[name]
        print(f"{name:<12} {r['endpoint_mae']:>14.4f} {r['trajectory_mae']:>15.4f} {r['w1_to_p_xs']:>13.4f}")
    print(f"{'exact ODE':<12} {'':>14} {'':>15} {results['exact']['w1_to_p_xs']:>13.4f}")
    ratio = results["naive"]["trajectory_mae"] / results["subinterval"]["trajectory_mae"]
    print(f"naive / correct trajectory error: {ratio:.1f}x   ({results['seconds']:.1f} s)")
    if results["png"]:
        print(f"wrote {results['png']}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="training iterations per model (default 1500 fast, 8000 full)"
    )
    parser.add_argument("--out", default="runs/toy_subinterval.png", help="where to write the figure ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="the quick version the test runs")
    args = parser.parse_args(argv)
    _print_results(run_experiment(args.fast, args.seed, args.out or None, train_iterations=args.steps))


if __name__ == "__main__":
    main()
