"""Step tables, phase layouts, re-noising time sampling, expert routing and the SGTS choice."""

import dataclasses
from fractions import Fraction

import pytest
import torch

from phased_dmd_mega.config import PhasesConfig
from phased_dmd_mega.schedule import (
    PhaseLayout,
    expert_for_t,
    renoise_range,
    renoise_range_kwargs,
    sample_renoise_t,
    sgts_exit_step,
    shift,
    step_table,
    unshift,
)

# Wan2.2 A14B-like table: shift 7 puts t_2 exactly on the T2V expert boundary 0.875.
WAN22_TIMES = [1.0, 0.9545, 0.875, 0.70, 0.0]
WAN22_BOUNDARY = 0.875


# ----------------------------------------------------------------------------- tables and shift


@pytest.mark.parametrize(
    "S, expected",
    [
        (5, [1, Fraction(15, 16), Fraction(5, 6), Fraction(5, 8), 0]),  # Wan
        (3, [1, Fraction(9, 10), Fraction(3, 4), Fraction(1, 2), 0]),  # Qwen-Image
        (7, WAN22_TIMES),
    ],
)
def test_step_table_matches_published_values(S, expected):
    times = step_table(4, S)
    assert len(times) == 5
    assert times[0] == 1.0 and times[-1] == 0.0
    assert times == pytest.approx([float(x) for x in expected], abs=1e-4)


def test_step_table_with_shift_one_is_uniform():
    assert step_table(5, 1.0) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])


def test_shift_matches_exact_fractions():
    # shift(u) = S u / (1 + (S-1) u), evaluated exactly for a few rational points.
    for S in (Fraction(3), Fraction(5), Fraction(1, 2)):
        for u in (Fraction(1, 4), Fraction(1, 2), Fraction(3, 4)):
            exact = S * u / (1 + (S - 1) * u)
            assert shift(float(u), float(S)) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("S", [0.5, 1.0, 3.0, 5.0, 7.0])
def test_shift_unshift_round_trip_on_floats_and_tensors(S):
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    t = shift(u, S)
    assert isinstance(t, torch.Tensor)
    torch.testing.assert_close(unshift(t, S), u, rtol=0, atol=1e-12)
    torch.testing.assert_close(shift(unshift(u, S), S), u, rtol=0, atol=1e-12)
    assert bool((t[1:] >= t[:-1]).all()), "shift must be increasing"
    assert unshift(shift(0.3, S), S) == pytest.approx(0.3, abs=1e-12)
    assert isinstance(shift(0.3, S), float)


def test_shift_rejects_non_positive_shift():
    with pytest.raises(ValueError, match="shift"):
        shift(0.5, 0.0)


# ----------------------------------------------------------------------------- layouts


def test_layout_four_steps_two_phases():
    layout = PhaseLayout.build(4, num_phases=2, shift=5.0)
    assert layout.num_phases == 2
    assert layout.steps_per_phase == (2, 2)
    assert layout.phase_of_step == (0, 0, 1, 1)
    assert list(layout.steps_of_phase(0)) == [0, 1]
    assert list(layout.steps_of_phase(1)) == [2, 3]
    # Spec: s_1 = t_2, s_2 = 0.
    assert layout.boundaries == (1.0, layout.times[2], 0.0)
    assert layout.phase_start(0) == 1.0 and layout.phase_end(0) == pytest.approx(0.8333, abs=1e-4)
    assert layout.phase_start(1) == layout.phase_end(0) and layout.phase_end(1) == 0.0


def test_layout_one_phase_per_step():
    layout = PhaseLayout.build(4, num_phases=4, shift=3.0)
    assert layout.steps_per_phase == (1, 1, 1, 1)
    assert layout.phase_of_step == (0, 1, 2, 3)
    assert layout.boundaries == layout.times
    assert [list(layout.steps_of_phase(k)) for k in range(4)] == [[0], [1], [2], [3]]


def test_layout_single_phase():
    layout = PhaseLayout.build(4, num_phases=1)
    assert layout.steps_per_phase == (4,)
    assert layout.phase_of_step == (0, 0, 0, 0)
    assert layout.boundaries == (1.0, 0.0)
    assert list(layout.steps_of_phase(0)) == [0, 1, 2, 3]


def test_layout_explicit_uneven_split():
    layout = PhaseLayout.build(4, steps_per_phase=[1, 3], shift=3.0)
    assert layout.steps_per_phase == (1, 3)
    assert layout.phase_of_step == (0, 1, 1, 1)
    assert layout.boundaries == pytest.approx((1.0, 0.9, 0.0))
    assert list(layout.steps_of_phase(1)) == [1, 2, 3]


def test_layout_from_config_and_is_hashable():
    cfg = PhasesConfig(num_steps=4, num_phases=2, steps_per_phase=[1, 3], shift=3.0)
    layout = PhaseLayout.from_config(cfg)
    assert layout == PhaseLayout.build(4, steps_per_phase=[1, 3], shift=3.0)
    hash(layout)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.num_steps = 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_steps=4, num_phases=3), "num_phases 3 does not divide num_steps 4"),
        (dict(num_steps=4, steps_per_phase=[1, 2]), r"sums to 3, but num_steps is 4"),
        (dict(num_steps=4, steps_per_phase=[0, 4]), "positive integers"),
        (dict(num_steps=4, num_phases=3, steps_per_phase=[1, 3]), "2 entries, but num_phases is 3"),
        (dict(num_steps=0, num_phases=1), "num_steps"),
        (dict(num_steps=4, num_phases=0), "num_phases"),
        (dict(num_steps=4), "num_phases or steps_per_phase"),
    ],
)
def test_layout_rejects_invalid_splits(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PhaseLayout.build(**kwargs)


def test_layout_rejects_unknown_phase():
    layout = PhaseLayout.build(4, num_phases=2)
    with pytest.raises(ValueError, match="0..1"):
        layout.phase_end(2)


# ----------------------------------------------------------------------------- re-noising times


def _draw(layout, phase, n=20000, seed=0, **options):
    generator = torch.Generator().manual_seed(seed)
    return sample_renoise_t(layout, phase, n, generator, dtype=torch.float64, **options)


@pytest.mark.parametrize("interval", ["reverse_nested", "disjoint"])
@pytest.mark.parametrize("steps, phases, S", [(4, 2, 5.0), (4, 4, 3.0), ([1, 3], None, 5.0)])
def test_renoise_t_stays_in_its_interval_and_reaches_both_ends(interval, steps, phases, S):
    if isinstance(steps, list):
        layout = PhaseLayout.build(sum(steps), steps_per_phase=steps, shift=S)
    else:
        layout = PhaseLayout.build(steps, num_phases=phases, shift=S)
    for k in range(layout.num_phases):
        s = layout.phase_end(k)
        upper = 1.0 if interval == "reverse_nested" else layout.phase_start(k)
        t = _draw(layout, k, interval=interval)
        assert t.shape == (20000,) and t.dtype == torch.float64
        assert bool((t > s).all()) and bool((t <= upper).all())
        width = upper - s
        assert float(t.min()) < s + 0.01 * width, "lower end not approached"
        assert float(t.max()) > upper - 0.01 * width, "upper end not approached"


def test_renoise_t_is_uniform_in_unshifted_time():
    layout = PhaseLayout.build(4, num_phases=2, shift=5.0)
    u = unshift(_draw(layout, 1, n=40000), 5.0)  # phase 1 (0-based) ends at 0: u ~ U(0, 1)
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(u.var()) == pytest.approx(1 / 12, abs=0.005)


@pytest.mark.parametrize("renoise_shift", [1.0, 2.0])
def test_renoise_shift_replaces_the_schedule_shift(renoise_shift):
    layout = PhaseLayout.build(4, num_phases=2, shift=5.0)
    u = unshift(_draw(layout, 1, n=40000, renoise_shift=renoise_shift), renoise_shift)
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(u.var()) == pytest.approx(1 / 12, abs=0.005)
    s = layout.phase_end(0)  # phase 0: the range (s, 1] is kept, only the density changes
    t = _draw(layout, 0, renoise_shift=renoise_shift)
    assert bool((t > s).all()) and bool((t <= 1.0).all())
    u = unshift(t, renoise_shift)
    u_lo = unshift(s, renoise_shift)
    assert float(u.mean()) == pytest.approx((u_lo + 1) / 2, abs=0.01)
    with pytest.raises(ValueError, match="shift must be > 0"):
        _draw(layout, 0, renoise_shift=0.0)


def test_renoise_t_respects_t_min_t_max_and_margin():
    layout = PhaseLayout.build(4, num_phases=4, shift=3.0)  # boundaries 1, .9, .75, .5, 0
    for k in range(4):
        t = _draw(layout, k, t_min=0.02, t_max=0.98, margin=0.02)
        s = layout.phase_end(k)
        lo = max(s + 0.02, 0.02)
        assert bool((t >= lo).all()) and bool((t <= 0.98).all())
        assert float(t.min()) < lo + 0.005 and float(t.max()) > 0.98 - 0.005
    assert renoise_range(layout, 3, t_min=0.02, t_max=0.98) == (0.02, 0.98)


def test_renoise_t_empty_range_raises_with_numbers():
    layout = PhaseLayout.build(4, num_phases=4, shift=3.0)
    with pytest.raises(ValueError, match=r"phase 0 \(s = 0.9\) has an empty re-noising range"):
        renoise_range(layout, 0, t_max=0.9, margin=0.0)
    with pytest.raises(ValueError, match="interval"):
        renoise_range(layout, 0, interval="nested")


def test_renoise_t_float32_never_equals_s():
    # The subinterval target divides by sigma_{t|s}; rounding to float32 must not produce t == s.
    layout = PhaseLayout.build(4, num_phases=2, shift=7.0)
    generator = torch.Generator().manual_seed(1)
    t = sample_renoise_t(layout, 0, 50000, generator)
    assert t.dtype == torch.float32
    assert bool((t > torch.tensor(layout.phase_end(0), dtype=torch.float32)).all())


def test_wan22_expert_boundary_clamps_high_noise_phase():
    layout = PhaseLayout.build(4, num_phases=2, shift=7.0)
    assert layout.times == pytest.approx(WAN22_TIMES, abs=1e-4)
    assert layout.phase_end(0) == WAN22_BOUNDARY  # phase 1 of the spec ends on the boundary
    assert layout.phase_is_high_noise(0, WAN22_BOUNDARY)
    assert not layout.phase_is_high_noise(1, WAN22_BOUNDARY)
    t_high = _draw(layout, 0, expert_boundary=WAN22_BOUNDARY)
    assert bool((t_high >= 0.875).all()) and bool((t_high <= 1.0).all())
    assert bool(expert_for_t(t_high, WAN22_BOUNDARY).all())
    # The low-noise phase is not clamped: its reverse nested interval spans both experts.
    t_low = _draw(layout, 1, expert_boundary=WAN22_BOUNDARY)
    assert float(t_low.min()) < 0.01 and float(t_low.max()) > 0.99


def test_expert_boundary_clamp_tightens_a_phase_ending_above_the_boundary_only_when_looser():
    layout = PhaseLayout.build(4, num_phases=4, shift=7.0)  # phase 0 ends at 0.9545 > 0.875
    assert renoise_range(layout, 0, expert_boundary=0.875) == pytest.approx((0.9545, 1.0), abs=1e-4)
    # I2V boundary 0.9 with shift 7 / 2 phases: phase 0 ends at 0.875 < 0.9, but both its steps
    # (1, 0.9545) are high-noise steps: its re-noise times stay with the high-noise expert.
    layout2 = PhaseLayout.build(4, num_phases=2, shift=7.0)
    assert renoise_range(layout2, 0, expert_boundary=0.9) == (0.9, 1.0)


def test_a_phase_is_high_noise_when_every_step_of_it_is():
    # The published Wan2.2 A14B setting: shift 5, 4 steps in 2 phases, boundary 0.875.
    layout = PhaseLayout.build(4, num_phases=2, shift=5.0)
    assert layout.times[:3] == pytest.approx([1.0, 0.9375, 0.8333], abs=1e-4)
    assert layout.phase_is_high_noise(0, 0.875) and not layout.phase_is_high_noise(1, 0.875)
    assert renoise_range(layout, 0, expert_boundary=0.875) == (0.875, 1.0)
    assert not layout.phase_is_high_noise(0, 0.95)  # its second step (0.9375) is a low-noise one


def test_renoise_range_kwargs_follow_config_names():
    cfg = PhasesConfig(
        renoise_interval="disjoint", t_min=0.02, t_max=0.98, margin=0.01, expert_boundary=0.875, renoise_shift=2.0
    )
    kwargs = renoise_range_kwargs(cfg)
    assert kwargs == dict(interval="disjoint", t_min=0.02, t_max=0.98, margin=0.01, expert_boundary=0.875)
    layout = PhaseLayout.from_config(PhasesConfig(shift=7.0))
    t = sample_renoise_t(layout, 0, 8, torch.Generator().manual_seed(0), **kwargs, renoise_shift=cfg.renoise_shift)
    assert t.shape == (8,)
    assert renoise_range(layout, 0, **kwargs) == pytest.approx((0.885, 0.98))  # s + margin


def test_renoise_t_is_reproducible_from_the_generator():
    layout = PhaseLayout.build(4, num_phases=2)
    a = _draw(layout, 0, n=16, seed=3)
    b = _draw(layout, 0, n=16, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- expert routing


def test_expert_for_t_routes_at_the_boundary():
    assert expert_for_t(0.875, 0.875) == "high"
    assert expert_for_t(0.95, 0.875) == "high"
    assert expert_for_t(0.8749, 0.875) == "low"
    mask = expert_for_t(torch.tensor([1.0, 0.9, 0.875, 0.874, 0.0]), 0.875)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [True, True, True, False, False]


# ----------------------------------------------------------------------------- SGTS


def test_sgts_exit_step_is_deterministic_and_covers_all_steps():
    for m in (1, 2, 3, 4):
        picks = [sgts_exit_step(m, seed=0, iteration=i, phase=0) for i in range(400)]
        assert picks == [sgts_exit_step(m, 0, i, 0) for i in range(400)]
        assert set(picks) == set(range(1, m + 1))
        # Roughly uniform: each value gets at least half its expected share.
        assert min(picks.count(j) for j in range(1, m + 1)) > 400 / m / 2


def test_sgts_exit_step_depends_on_seed_and_phase():
    base = [sgts_exit_step(4, 0, i, 0) for i in range(64)]
    assert base != [sgts_exit_step(4, 1, i, 0) for i in range(64)]
    assert base != [sgts_exit_step(4, 0, i, 1) for i in range(64)]
    with pytest.raises(ValueError):
        sgts_exit_step(0, 0, 0, 0)


def _sgts_choices_on_rank(num_iterations: int):
    import torch.distributed as dist

    from phased_dmd_mega import parallel

    parallel.initialize()
    try:
        # Each rank draws other random numbers in between: the choice must not depend on them.
        torch.rand(dist.get_rank() + 1)
        picks = [sgts_exit_step(2, seed=7, iteration=i, phase=i % 2) for i in range(num_iterations)]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, picks)
        return {"rank": dist.get_rank(), "picks": picks, "all_equal": all(g == picks for g in gathered)}
    finally:
        parallel.destroy()


@pytest.mark.slow
def test_sgts_exit_step_is_identical_across_ranks():
    from phased_dmd_mega.testing import run_distributed

    results = run_distributed(_sgts_choices_on_rank, 2, 50)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["all_equal"] for r in results)
    assert results[0]["picks"] == results[1]["picks"] == [sgts_exit_step(2, 7, i, i % 2) for i in range(50)]
