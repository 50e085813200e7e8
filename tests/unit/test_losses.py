"""The public losses (phased_dmd_mega.losses) against float64 references written from the spec.

Every reference below is restated from the paper's Eq. 11-13 (arXiv 2510.27684; rectified flow, alpha_t = 1 - t,
sigma_t = t) in float64, independently of the code under test. Both backends are checked: the
plain torch path and the fused Triton path (Triton's interpreter on CPU; conftest sets
TRITON_INTERPRET=1 there).
"""

import math
import os

import pytest
import torch

from phased_dmd_mega import losses
from phased_dmd_mega.testing import run_distributed

BACKENDS = ("torch", "triton")
FP32_MAX = torch.finfo(torch.float32).max
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


# ----------------------------------------------------------------------------------------
# float64 references, straight from the spec
# ----------------------------------------------------------------------------------------


def ref_coefficients(s, t):
    """alpha_{t|s}, sigma_{t|s}^2, c_eps and alpha_s as float64 [B] tensors."""
    s, t = s.double(), t.double()
    alpha_s, alpha_t, sigma_s, sigma_t = 1 - s, 1 - t, s, t
    alpha_ts = alpha_t / alpha_s
    sigma_ts2 = sigma_t**2 - alpha_ts**2 * sigma_s**2
    c_eps = (alpha_s**2 * sigma_t + alpha_t * sigma_s**2) / (alpha_s**2 * torch.sqrt(sigma_ts2))
    return alpha_ts, sigma_ts2, c_eps, alpha_s


def per_sample(values, like):
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def ref_target(x_s, eps, s, t):
    _, _, c_eps, alpha_s = ref_coefficients(s, t)
    x_s, eps = x_s.double(), eps.double()
    return per_sample(c_eps, eps) * eps - x_s / per_sample(alpha_s, x_s)


def ref_flow_loss_and_grad(v, x_s, eps, s, t, weight_clamp=None):
    """Per-sample loss [B] and d(loss_b)/d v, both float64."""
    _, sigma_ts2, _, _ = ref_coefficients(s, t)
    if weight_clamp is None:
        w = torch.ones_like(sigma_ts2)
    else:
        w = torch.clamp(weight_clamp * sigma_ts2, max=1.0)
    diff = v.double() - ref_target(x_s, eps, s, t)
    n = diff[0].numel()
    loss = per_sample(w, diff) * diff**2
    return loss.reshape(len(diff), -1).mean(dim=1), 2 * per_sample(w, diff) * diff / n


def ref_dmd_loss_and_grad(student, fake, teacher, norm_min=1e-4):
    """DMD loss (scalar) and its gradient w.r.t. the student, float64."""
    student, fake, teacher = student.double(), fake.double(), teacher.double()
    b = len(student)
    norm = torch.clamp((student - teacher).abs().reshape(b, -1).mean(dim=1), min=norm_min)
    direction = (fake - teacher) / per_sample(norm, fake)
    direction = torch.nan_to_num(direction, nan=0.0, posinf=FP32_MAX, neginf=-FP32_MAX)
    return 0.5 * direction.pow(2).mean(), direction / direction.numel()


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def random_times(batch, generator):
    """Random 0 <= s < t <= 1, with t at least 0.02 above s."""
    s = torch.rand(batch, generator=generator, dtype=torch.float64) * 0.9
    t = s + 0.02 + torch.rand(batch, generator=generator, dtype=torch.float64) * (0.98 - s)
    return s.float(), t.float()


def randn(shape, generator, dtype=torch.float32):
    return torch.randn(shape, generator=generator).to(dtype)


def rel_error(actual, expected):
    """Largest absolute error relative to the largest reference magnitude."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def run_flow_loss(backend, v, x_s, eps, s, t, weight_clamp, grad_output):
    v = v.detach().clone().requires_grad_()
    with losses.use_backend(backend):
        loss = losses.subinterval_flow_loss(v, x_s, eps, s, t, weight_clamp=weight_clamp)
    (grad,) = torch.autograd.grad(loss, v, grad_output)
    return loss.detach(), grad


def run_dmd(backend, student, fake, teacher, grad_output=1.0, group=None):
    student = student.detach().clone().requires_grad_()
    with losses.use_backend(backend):
        loss = losses.dmd_loss(student, fake, teacher, group=group)
    (grad,) = torch.autograd.grad(loss, student, torch.tensor(grad_output, dtype=loss.dtype))
    return loss.detach(), grad


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ----------------------------------------------------------------------------------------
# subinterval noise and target
# ----------------------------------------------------------------------------------------


def test_noise_and_target_match_spec_formulas(gen):
    x_s, eps = randn((4, 3, 5), gen), randn((4, 3, 5), gen)
    s, t = random_times(4, gen)
    alpha_ts, sigma_ts2, _, _ = ref_coefficients(s, t)
    expected_noise = per_sample(alpha_ts, x_s) * x_s.double() + per_sample(sigma_ts2.sqrt(), eps) * eps.double()
    assert rel_error(losses.subinterval_noise(x_s, eps, s, t), expected_noise) < 1e-6
    assert rel_error(losses.subinterval_target(x_s, eps, s, t), ref_target(x_s, eps, s, t)) < 1e-6


def test_s_zero_is_ordinary_flow_matching(gen):
    x0, eps, v = (randn((3, 4, 6), gen) for _ in range(3))
    s = torch.zeros(3)
    t = torch.tensor([0.1, 0.5, 0.95])
    torch.testing.assert_close(losses.subinterval_target(x0, eps, s, t), eps - x0)
    torch.testing.assert_close(
        losses.subinterval_noise(x0, eps, s, t), per_sample(1 - t, x0) * x0 + per_sample(t, eps) * eps
    )
    for backend in BACKENDS:
        with losses.use_backend(backend):
            loss = losses.subinterval_flow_loss(v, x0, eps, s, t)
        torch.testing.assert_close(loss, (v - (eps - x0)).pow(2).mean(dim=(1, 2)))


def test_naive_target_differs_for_positive_s(gen):
    x_s, eps = randn((2, 16), gen), randn((2, 16), gen)
    s, t = torch.tensor([0.3, 0.6]), torch.tensor([0.5, 0.9])
    target = losses.subinterval_target(x_s, eps, s, t)
    assert (target - (eps - x_s)).abs().mean() > 0.1


def test_target_recovers_the_true_marginal_flow_of_gaussian_data():
    """The spec's exactness property: E[psi* | x_t] is the marginal flow of p(x_t).

    With x0 ~ N(m, var) (scalar), x_s from the forward process and x_t from the subinterval
    noise, the least-squares fit of psi* on [1, x_t] is the conditional mean (jointly Gaussian),
    which must equal the true flow u(x) = E[eps_t - x0 | x_t = x]. The naive target must not.
    """
    gen = torch.Generator().manual_seed(7)
    n, mean, var, s, t = 400_000, 0.7, 0.3, 0.4, 0.75
    x0 = mean + math.sqrt(var) * torch.randn(n, generator=gen, dtype=torch.float64)
    x_s = (1 - s) * x0 + s * torch.randn(n, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, generator=gen, dtype=torch.float64)
    x_t = losses.subinterval_noise(x_s, eps, s, t)
    design = torch.stack([torch.ones(n, dtype=torch.float64), x_t], dim=1)

    def fit(target):
        return torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)

    # x_t has the forward-process marginal at time t ...
    alpha_t, sigma_t = 1 - t, t
    var_t = alpha_t**2 * var + sigma_t**2
    assert abs(x_t.mean().item() - alpha_t * mean) < 0.01
    assert abs(x_t.var().item() - var_t) < 0.01
    # ... whose flow is affine: u(x) = slope * (x - alpha_t m) - m.
    slope = (sigma_t - alpha_t * var) / var_t
    true_flow = torch.tensor([-slope * alpha_t * mean - mean, slope], dtype=torch.float64)

    fitted = fit(losses.subinterval_target(x_s, eps, s, t))
    naive = fit(eps - x_s)
    assert (fitted - true_flow).abs().max() < 0.01, (fitted, true_flow)
    assert (naive - true_flow).abs().max() > 0.05, (naive, true_flow)


def test_times_may_be_python_floats(gen):
    x_s, eps = randn((3, 5), gen), randn((3, 5), gen)
    expected = losses.subinterval_target(x_s, eps, torch.full((3,), 0.2), torch.full((3,), 0.6))
    torch.testing.assert_close(losses.subinterval_target(x_s, eps, 0.2, 0.6), expected)
    for backend in BACKENDS:
        with losses.use_backend(backend):
            by_float = losses.subinterval_flow_loss(x_s, x_s, eps, 0.2, torch.tensor(0.6), 2.0)
            by_tensor = losses.subinterval_flow_loss(x_s, x_s, eps, torch.full((3,), 0.2), torch.full((3,), 0.6), 2.0)
        torch.testing.assert_close(by_float, by_tensor)
    with pytest.raises(ValueError):
        losses.subinterval_target(x_s, eps, torch.zeros(2), torch.ones(2))


# ----------------------------------------------------------------------------------------
# subinterval flow loss
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clamped", [False, True])
def test_flow_loss_matches_reference(gen, dtype, clamped):
    # 3 * 37 * 41 = 4551 elements per sample: more than one 4096-element block, odd tail.
    shape = (5, 3, 37, 41)
    v, x_s, eps = (randn(shape, gen, dtype) for _ in range(3))
    s, t = random_times(5, gen)
    _, sigma_ts2, _, _ = ref_coefficients(s, t)
    clamp = 1.0 / sigma_ts2.median().item() if clamped else None
    if clamped:  # the weight must be below 1 for some samples and exactly 1 for others
        weights = torch.clamp(clamp * sigma_ts2, max=1.0)
        assert (weights < 1).any() and (weights == 1).any()
    grad_output = torch.rand(5, generator=gen) + 0.5
    ref_loss, ref_grad = ref_flow_loss_and_grad(v, x_s, eps, s, t, clamp)
    ref_grad = ref_grad * per_sample(grad_output.double(), ref_grad)
    for backend in BACKENDS:
        loss, grad = run_flow_loss(backend, v, x_s, eps, s, t, clamp, grad_output)
        assert loss.dtype == torch.float32 and loss.shape == (5,)
        assert grad.dtype == dtype and grad.shape == shape
        assert rel_error(loss, ref_loss) < TOLERANCE[dtype], backend
        assert rel_error(grad, ref_grad) < TOLERANCE[dtype], backend


def test_flow_loss_strided_and_non_contiguous_inputs(gen):
    big = [randn((6, 7, 9), gen) for _ in range(3)]
    v, x_s = big[0][::2], big[1][1::2]  # batch-strided views
    eps = big[2][::2].transpose(1, 2)  # not contiguous within a sample
    v = v.transpose(1, 2)
    x_s = x_s.transpose(1, 2)
    s, t = random_times(3, gen)
    ref_loss, ref_grad = ref_flow_loss_and_grad(v, x_s, eps, s, t, 2.0)
    for backend in BACKENDS:
        loss, grad = run_flow_loss(backend, v, x_s, eps, s, t, 2.0, torch.ones(3))
        assert rel_error(loss, ref_loss) < 1e-5 and rel_error(grad, ref_grad) < 1e-5, backend
    v, x_s, eps = (b[::2] for b in big)  # batch stride only: no copy on the Triton path
    ref_loss, _ = ref_flow_loss_and_grad(v, x_s, eps, s, t)
    for backend in BACKENDS:
        loss, _ = run_flow_loss(backend, v, x_s, eps, s, t, None, torch.ones(3))
        assert rel_error(loss, ref_loss) < 1e-5, backend


def test_flow_loss_gradcheck_torch_path():
    gen = torch.Generator().manual_seed(3)
    x_s, eps = (torch.randn(3, 2, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.0, 0.3, 0.5], dtype=torch.float64)
    t = torch.tensor([0.4, 0.35, 0.99], dtype=torch.float64)
    with losses.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda v: losses.subinterval_flow_loss(v, x_s, eps, s, t, weight_clamp=3.0), (v,)
        )


def test_flow_loss_is_differentiable_in_v_pred_only(gen):
    v, x_s, eps = (randn((2, 8), gen).requires_grad_() for _ in range(3))
    s, t = random_times(2, gen)
    for backend in BACKENDS:
        with losses.use_backend(backend):
            loss = losses.subinterval_flow_loss(v, x_s, eps, s, t)
        grads = torch.autograd.grad(loss.sum(), (v, x_s, eps), allow_unused=True)
        assert grads[0] is not None and grads[1] is None and grads[2] is None, backend


def test_flow_loss_without_grad_needs_no_gradient_buffer(gen):
    v, x_s, eps = (randn((2, 3, 11), gen) for _ in range(3))
    s, t = random_times(2, gen)
    ref_loss, _ = ref_flow_loss_and_grad(v, x_s, eps, s, t)
    with losses.use_backend("triton"):
        loss = losses.subinterval_flow_loss(v, x_s, eps, s, t)
    assert loss.grad_fn is None
    assert rel_error(loss, ref_loss) < 1e-5


# ----------------------------------------------------------------------------------------
# DMD loss
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dmd_loss_matches_reference(gen, dtype):
    shape = (3, 2, 45, 51)  # 4590 elements per sample: two blocks, odd tail
    student, fake, teacher = (randn(shape, gen, dtype) for _ in range(3))
    ref_loss, ref_grad = ref_dmd_loss_and_grad(student, fake, teacher)
    for backend in BACKENDS:
        loss, grad = run_dmd(backend, student, fake, teacher, grad_output=2.5)
        assert loss.shape == () and loss.dtype == torch.float32
        assert grad.dtype == dtype and grad.shape == shape
        assert rel_error(loss, ref_loss) < TOLERANCE[dtype], backend
        assert rel_error(grad, 2.5 * ref_grad) < TOLERANCE[dtype], backend


def test_dmd_loss_strided_batch_and_odd_sizes(gen):
    big = [randn((7, 3, 13), gen), randn((7, 3, 13), gen), randn((7, 13, 3), gen)]
    student, fake, teacher = big[0][::3], big[1][1::2][:3], big[2][:3].transpose(1, 2)
    ref_loss, ref_grad = ref_dmd_loss_and_grad(student, fake, teacher)
    for backend in BACKENDS:
        loss, grad = run_dmd(backend, student, fake, teacher)
        assert rel_error(loss, ref_loss) < 1e-5 and rel_error(grad, ref_grad) < 1e-5, backend


def test_dmd_loss_value_and_gradient_identities(gen):
    """Value 0.5*mean(d**2) and gradient d/numel; the normaliser is per sample."""
    student, fake, teacher = (randn((2, 50), gen) for _ in range(3))
    student[1] = teacher[1] + 10 * (student[1] - teacher[1])  # a 10x larger second normaliser
    _, grad = run_dmd("torch", student, fake, teacher)
    norms = (student - teacher).abs().mean(dim=1, keepdim=True)
    direction = (fake - teacher) / norms
    torch.testing.assert_close(grad, direction / direction.numel())
    for backend in BACKENDS:
        loss, _ = run_dmd(backend, student, fake, teacher)
        torch.testing.assert_close(loss, 0.5 * direction.pow(2).mean())


@pytest.mark.filterwarnings("ignore:overflow encountered")  # direction**2 of fp32 max in the interpreter
def test_dmd_loss_normaliser_floor_and_non_finite_values(gen):
    teacher, fake = randn((2, 40), gen), randn((2, 40), gen)
    student = teacher.clone()  # mean |student - teacher| = 0 -> normaliser = norm_min
    fake[0, 3] = float("nan")
    fake[1, 5] = float("inf")
    fake[1, 6] = float("-inf")
    _, ref_grad = ref_dmd_loss_and_grad(student, fake, teacher)
    assert ref_grad[0, 3] == 0 and ref_grad[1, 5] > 0 and ref_grad[1, 6] < 0
    finite_fake = fake.clone()
    finite_fake[1, 5:7] = teacher[1, 5:7]
    ref_loss, _ = ref_dmd_loss_and_grad(student, finite_fake, teacher)
    for backend in BACKENDS:
        _, grad = run_dmd(backend, student, fake, teacher)
        assert torch.isfinite(grad).all(), backend
        assert rel_error(grad, ref_grad) < 1e-5, backend
        loss, _ = run_dmd(backend, student, finite_fake, teacher)  # NaN -> 0, floor 1e-4
        assert rel_error(loss, ref_loss) < 1e-5, backend
        assert loss > 1e6, backend


def test_dmd_gradient_reaches_the_student_only(gen):
    student, fake, teacher = (randn((2, 9), gen).requires_grad_() for _ in range(3))
    for backend in BACKENDS:
        with losses.use_backend(backend):
            loss = losses.dmd_loss(student, fake, teacher)
        grads = torch.autograd.grad(loss, (student, fake, teacher), allow_unused=True)
        assert grads[0] is not None and grads[1] is None and grads[2] is None, backend


# ----------------------------------------------------------------------------------------
# backend selection
# ----------------------------------------------------------------------------------------


def backward_name(loss):
    return type(loss.grad_fn).__name__


def test_backend_setting_env_and_context_manager(gen, monkeypatch):
    v, x_s, eps = randn((2, 4), gen).requires_grad_(), randn((2, 4), gen), randn((2, 4), gen)
    s, t = random_times(2, gen)
    monkeypatch.setattr(losses, "_backend", None)
    monkeypatch.setenv(losses.BACKEND_ENV, "torch")
    assert losses.get_backend() == "torch"
    assert "SubintervalFlowLoss" not in backward_name(losses.subinterval_flow_loss(v, x_s, eps, s, t))
    with losses.use_backend("triton"):
        assert "SubintervalFlowLoss" in backward_name(losses.subinterval_flow_loss(v, x_s, eps, s, t))
        assert "DMDLoss" in backward_name(losses.dmd_loss(v, x_s, eps))
    assert losses.get_backend() == "torch"
    losses.set_backend("triton")
    assert losses.resolve_backend(v) == "triton"
    losses.set_backend(None)
    monkeypatch.setenv(losses.BACKEND_ENV, "auto")
    # auto: the interpreter runs CPU tensors through Triton (conftest sets it); fp64 uses torch.
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert losses.resolve_backend(v) == "triton"
    assert losses.resolve_backend(v.double()) == "torch"
    monkeypatch.setenv(losses.BACKEND_ENV, "cuda-please")
    with pytest.raises(ValueError):
        losses.get_backend()
    with pytest.raises(ValueError):
        losses.set_backend("fast")


# ----------------------------------------------------------------------------------------
# sequence parallelism: dmd_loss over 2 gloo ranks
# ----------------------------------------------------------------------------------------

SPLIT = 5  # rank 0 holds positions [0, 5) of dim 2, rank 1 holds [5, 9): uneven shards


def _dmd_on_two_ranks(student, fake, teacher):
    from phased_dmd_mega import parallel

    lay = parallel.initialize(ulysses_parallel=2)
    try:
        shard = slice(0, SPLIT) if lay.ulysses_rank == 0 else slice(SPLIT, None)
        results = {}
        for backend in BACKENDS:
            results[backend] = run_dmd(
                backend,
                student[:, :, shard],
                fake[:, :, shard],
                teacher[:, :, shard],
                grad_output=1.5,
                group=parallel.ulysses_group(),
            )
        return lay.ulysses_rank, results
    finally:
        parallel.destroy()


@pytest.mark.slow
def test_dmd_loss_over_sequence_parallel_ranks_equals_unsplit():
    gen = torch.Generator().manual_seed(11)
    student, fake, teacher = (torch.randn(3, 4, 9, 5, generator=gen) for _ in range(3))
    student[2] = teacher[2] + 1e-7 * student[2]  # one sample hits the normaliser floor
    env = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    per_rank = run_distributed(_dmd_on_two_ranks, 2, student, fake, teacher, env=env)
    assert sorted(rank for rank, _ in per_rank) == [0, 1]
    per_rank = [results for _, results in sorted(per_rank, key=lambda item: item[0])]
    ref_loss, ref_grad = ref_dmd_loss_and_grad(student, fake, teacher)
    for backend in BACKENDS:
        whole_loss, whole_grad = run_dmd(backend, student, fake, teacher, grad_output=1.5)
        assert rel_error(whole_loss, ref_loss) < 1e-5
        for results in per_rank:
            torch.testing.assert_close(results[backend][0], whole_loss, rtol=1e-6, atol=0)
        split_grad = torch.cat([results[backend][1] for results in per_rank], dim=2)
        torch.testing.assert_close(split_grad, whole_grad, rtol=1e-6, atol=1e-12)
        assert rel_error(split_grad, 1.5 * ref_grad) < 1e-5
