"""The Triton kernels of phased_dmd_mega.kernels through their launch wrappers.

Small block sizes force several blocks per sample (and a ragged last block) on small tensors;
expected values are plain float64 torch expressions. On CPU these run in Triton's interpreter.
"""

import pytest
import torch

from phased_dmd_mega.kernels import dmd, scale_rows
from phased_dmd_mega.kernels import subinterval_loss as sub

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or sub.is_interpreted()),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(99)


def randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def test_sample_rows_keeps_batch_strided_views_and_copies_the_rest(gen):
    x = randn((6, 4, 5), gen)
    rows, stride, per_sample = sub.sample_rows(x[::2])
    assert rows.data_ptr() == x.data_ptr() and stride == 40 and per_sample == 20
    rows, stride, per_sample = sub.sample_rows(x[1::3])
    assert rows.data_ptr() == x[1].data_ptr() and stride == 60
    rows, stride, _ = sub.sample_rows(x.transpose(1, 2))
    assert rows.is_contiguous() and stride == 20
    torch.testing.assert_close(rows, x.transpose(1, 2))
    rows, stride, per_sample = sub.sample_rows(x[:, 0, 0])  # [B] data: one element per sample
    assert per_sample == 1 and stride == 20


def test_launch_config_shrinks_the_block_for_small_samples():
    assert sub.launch_config(100, 4096) == (128, 1, 1)
    assert sub.launch_config(5000, 1024) == (1024, 5, 2)
    assert sub.launch_config(1, None) == (16, 1, 1)
    assert sub.launch_config(10**7, None) == (4096, 2442, 8)


def subinterval_reference(v, x_s, eps, s, t, weight_clamp):
    """float64 ``(diff = v - psi*, w / N)`` per the spec: psi* = c_eps eps - x_s / alpha_s."""
    s, t = s.double(), t.double()
    alpha_s, alpha_t = 1 - s, 1 - t
    sigma_ts2 = t**2 - (alpha_t / alpha_s) ** 2 * s**2
    c_eps = (alpha_s**2 * t + alpha_t * s**2) / (alpha_s**2 * sigma_ts2.sqrt())
    shape = (-1,) + (1,) * (v.dim() - 1)
    target = c_eps.reshape(shape) * eps.double() - x_s.double() / alpha_s.reshape(shape)
    weight = torch.ones_like(s) if weight_clamp is None else (weight_clamp * sigma_ts2).clamp(max=1)
    return v.double() - target, (weight / v[0].numel()).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subinterval_partials_and_gradient_over_several_blocks(gen, dtype):
    shape = (3, 2500)  # three blocks of 1024, the last one ragged
    v, x_s, eps = (randn(shape, gen, dtype) for _ in range(3))
    s = torch.tensor([0.0, 0.6, 0.2], device=DEVICE)
    t = torch.tensor([0.3, 0.61, 0.99], device=DEVICE)
    partials, grad = sub.subinterval_loss_partials(v, x_s, eps, s, t, 4.0, block=1024)
    assert partials.shape == (3, 3) and partials.dtype == torch.float32
    diff, scale = subinterval_reference(v, x_s, eps, s, t, 4.0)
    assert scale[1].item() < 1 / 2500 and scale[2].item() == 1 / 2500  # the clamp acts on one
    expected_blocks = torch.stack(
        [(scale * diff[:, i : i + 1024].pow(2)).sum(dim=1) for i in range(0, 2500, 1024)], dim=1
    )
    torch.testing.assert_close(partials.double(), expected_blocks, rtol=1e-5, atol=0)
    assert grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    expected_grad = 2 * scale * diff
    assert ((grad.double() - expected_grad).abs().max() / expected_grad.abs().max()) < tol
    _, no_grad = sub.subinterval_loss_partials(v, x_s, eps, s, t, write_grad=False, block=1024)
    assert no_grad is None


def test_subinterval_function_backward_scales_each_sample(gen):
    v = randn((2, 3, 700), gen).requires_grad_()
    x_s, eps = randn((2, 3, 700), gen), randn((2, 3, 700), gen)
    s, t = torch.tensor([0.1, 0.5], device=DEVICE), torch.tensor([0.9, 0.7], device=DEVICE)
    loss = sub.subinterval_flow_loss_triton(v, x_s, eps, s, t, block=512)
    diff, scale = subinterval_reference(v.detach(), x_s, eps, s, t, None)
    torch.testing.assert_close(loss.double(), (scale * diff.pow(2)).sum(dim=(1, 2)), rtol=1e-5, atol=0)
    # loss.sum() hands backward an expanded (stride 0) grad_output
    (grad,) = torch.autograd.grad(loss.sum() * 3.0, v)
    torch.testing.assert_close(grad.double(), 3.0 * 2 * scale * diff, rtol=1e-5, atol=1e-9)


def test_scale_rows_per_sample_and_shared_scale(gen):
    x = randn((6, 3, 333), gen)[::2]
    per_sample = torch.tensor([2.0, -1.0, 0.5], device=DEVICE)
    torch.testing.assert_close(scale_rows(x, per_sample, block=256), x * per_sample[:, None, None])
    shared = torch.tensor([0.25], device=DEVICE)
    out = scale_rows(x, shared, out_dtype=torch.bfloat16, block=256)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (x * 0.25).bfloat16())
    with pytest.raises(ValueError):
        scale_rows(x, torch.ones(2, device=DEVICE))


def test_bf16_outputs_round_to_nearest_even_like_torch(gen):
    x = torch.randn(2, 3000, generator=gen) * torch.logspace(-30, 30, 3000)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 - 2**-9, 3.0e38])  # ties, near-max
    x[1, : len(ties)] = ties
    x = x.to(DEVICE)
    out = scale_rows(x, torch.ones(2, device=DEVICE), out_dtype=torch.bfloat16, block=1024)
    assert torch.equal(out, x.bfloat16())


def stats_for(norms, per_sample):
    """Pass-1 statistics whose mean |.| per sample is ``norms``."""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    return torch.cat([norms * per_sample, torch.tensor([float(per_sample)])]).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dmd_passes_over_several_blocks(gen, dtype):
    shape = (2, 5, 499)  # 2495 elements per sample
    student, fake, teacher = (randn(shape, gen, dtype) for _ in range(3))
    abs_partials = dmd.abs_diff_partials(student, teacher, block=1024)
    assert abs_partials.shape == (2, 3)
    flat = (student.double() - teacher.double()).abs().reshape(2, -1)
    torch.testing.assert_close(abs_partials.sum(dim=1).double(), flat.sum(dim=1), rtol=1e-5, atol=0)
    stats = dmd.abs_diff_stats(student, teacher, block=1024)
    assert stats.dtype == torch.float64 and stats[2] == 2495
    torch.testing.assert_close(stats[:2], flat.sum(dim=1), rtol=1e-5, atol=0)

    # The second sample's mean |.| (1e-6) is below norm_min (1e-4): the floor applies.
    partials, grad = dmd.dmd_direction_partials(fake, teacher, stats_for([0.7, 1e-6], 2495), 1e-4, dtype, block=1024)
    direction = (fake.double() - teacher.double()) / torch.tensor([0.7, 1e-4]).double().reshape(2, 1, 1)
    numel = direction.numel()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert grad.dtype == dtype and grad.shape == shape
    expected_grad = direction / numel
    assert ((grad.double() - expected_grad).abs().max() / expected_grad.abs().max()) < tol
    torch.testing.assert_close(
        partials.sum(dim=1).double(),
        0.5 * direction.pow(2).reshape(2, -1).sum(dim=1) / numel,
        rtol=1e-5,
        atol=0,
    )
    _, none = dmd.dmd_direction_partials(fake, teacher, stats_for([0.7, 1.0], 2495), 1e-4, None)
    assert none is None


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_dmd_direction_follows_nan_to_num(gen):
    fake = randn((1, 8), gen)
    teacher = torch.zeros_like(fake)
    fake[0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    # numel 8 and normaliser 1: grad = direction / 8
    _, grad = dmd.dmd_direction_partials(fake, teacher, stats_for([1.0], 8), 1e-4, torch.float32)
    fmax = torch.finfo(torch.float32).max
    assert grad[0, 0] == 0 and grad[0, 1] == fmax / 8 and grad[0, 2] == -fmax / 8
    torch.testing.assert_close(grad[0, 3:], fake[0, 3:] / 8)
    _, grad = dmd.dmd_direction_partials(fake, teacher, stats_for([float("nan")], 8), 1e-4, torch.float32)
    assert (grad == 0).all()  # a NaN normaliser (torch.clamp keeps NaN) zeroes the whole sample


def test_dmd_function_gradient_is_direction_over_numel(gen):
    student = randn((3, 1000), gen).requires_grad_()
    fake, teacher = randn((3, 1000), gen), randn((3, 1000), gen)
    loss = dmd.dmd_loss_triton(student, fake, teacher, block=256)
    norms = (student.detach() - teacher).abs().mean(dim=1, keepdim=True)
    direction = (fake - teacher) / norms
    torch.testing.assert_close(loss, 0.5 * direction.pow(2).mean())
    (grad,) = torch.autograd.grad(loss * 4.0, student)
    torch.testing.assert_close(grad, 4.0 * direction / direction.numel())
    with torch.no_grad():  # no gradient wanted: the direction is not stored
        torch.testing.assert_close(dmd.dmd_loss_triton(student, fake, teacher), loss.detach())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal message")
def test_kernels_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(sub, "is_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        scale_rows(torch.ones(2, 3), torch.ones(2))
