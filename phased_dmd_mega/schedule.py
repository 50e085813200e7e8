"""Few-step schedules, the phase layout and the time sampling of Phased DMD (arXiv 2510.27684): the
shifted few-step table, the phase boundaries ``s_k`` and the re-noise distribution ``T(t; s, 1)``.

Conventions
-----------
- Time runs from ``t = 1`` (pure noise) to ``t = 0`` (data); ``alpha_t = 1 - t``, ``sigma_t = t``.
- Steps are 0-based: step ``i`` (``0 <= i < N``) moves the sample from ``times[i]`` to
  ``times[i + 1]``; ``times`` is the table ``t_0 = 1 > t_1 > ... > t_N = 0``.
- Phases are **0-based in code**: phase ``k`` (``0 <= k < K``) is the paper's phase ``k + 1``.
  ``boundaries[k]`` is the paper's ``s_k``: phase ``k`` starts at ``boundaries[k]`` and ends at
  ``boundaries[k + 1]``, which is the time reached after its last step. ``boundaries[0] = 1``
  and ``boundaries[K] = 0``. The anchor of phase ``k`` lives at ``phase_end(k)``.

Everything here is pure python/torch and config-free; ``PhaseLayout.from_config`` and
``renoise_range_kwargs`` read the matching fields of ``config.PhasesConfig``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, TypeVar, Union

import torch

from phased_dmd_mega import flow

Time = TypeVar("Time", float, torch.Tensor)

RENOISE_INTERVALS = ("reverse_nested", "disjoint")
HIGH_NOISE = "high"
LOW_NOISE = "low"

# Comparisons of boundary times computed by different formulas (e.g. shift(0.5, 7) against a
# configured 0.875) must not flip on the last bit.
_TIME_TOLERANCE = 1e-6


# ----------------------------------------------------------------------------- shift


def shift(u: Time, S: float) -> Time:
    """Timestep shift ``S*u / (1 + (S-1)*u)``: maps [0, 1] onto itself, pushing times towards 1
    for ``S > 1``. Works on python floats and tensors alike."""
    _check_shift(S)
    return S * u / (1 + (S - 1) * u)


def unshift(t: Time, S: float) -> Time:
    """Inverse of :func:`shift`: ``u = t / (S - (S-1)*t)``."""
    _check_shift(S)
    return t / (S - (S - 1) * t)


def _check_shift(S: float) -> None:
    if not S > 0:
        raise ValueError(f"shift must be > 0, got {S}")


def step_table(num_steps: int, S: float) -> Tuple[float, ...]:
    """The ``N + 1`` times ``t_0 = 1 > ... > t_N = 0``: ``u = linspace(1, 0, N+1)``, shifted.

    Wan (S = 5, N = 4): 1, 0.9375, 0.8333, 0.625, 0. Qwen-Image (S = 3): 1, 0.9, 0.75, 0.5, 0.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    # u_i = (N - i) / N exactly, so the ends are exactly 1 and 0 whatever the shift.
    return tuple(float(shift((num_steps - i) / num_steps, S)) for i in range(num_steps + 1))


# ----------------------------------------------------------------------------- phase layout


@dataclass(frozen=True)
class PhaseLayout:
    """N sampling steps split into K consecutive phases (0-based, see the module docstring).

    Build it with :meth:`build` or :meth:`from_config`; the fields are derived and consistent.
    """

    num_steps: int
    steps_per_phase: Tuple[int, ...]
    shift: float
    times: Tuple[float, ...]  # N + 1 times, times[0] = 1, times[N] = 0
    boundaries: Tuple[float, ...]  # K + 1 times, boundaries[0] = 1, boundaries[K] = 0
    phase_of_step: Tuple[int, ...]  # N entries: the phase that owns step i

    @classmethod
    def build(
        cls,
        num_steps: int,
        num_phases: Optional[int] = None,
        steps_per_phase: Optional[Sequence[int]] = None,
        shift: float = 5.0,
    ) -> "PhaseLayout":
        """Split ``num_steps`` into phases: ``num_phases`` equal groups (it must divide
        ``num_steps``) or the explicit ``steps_per_phase`` (summing to ``num_steps``). Giving both
        is allowed when they agree (as ``PhasesConfig`` does)."""
        split = _resolve_split(num_steps, num_phases, steps_per_phase)
        times = step_table(num_steps, shift)
        owners = tuple(k for k, n in enumerate(split) for _ in range(n))
        ends = [sum(split[: k + 1]) for k in range(len(split))]  # step index after each phase
        boundaries = (times[0],) + tuple(times[e] for e in ends)
        return cls(
            num_steps=num_steps,
            steps_per_phase=split,
            shift=float(shift),
            times=times,
            boundaries=boundaries,
            phase_of_step=owners,
        )

    @classmethod
    def from_config(cls, phases_cfg: Any) -> "PhaseLayout":
        """From a ``config.PhasesConfig`` (num_steps, num_phases, steps_per_phase, shift)."""
        return cls.build(
            phases_cfg.num_steps,
            num_phases=phases_cfg.num_phases,
            steps_per_phase=phases_cfg.steps_per_phase,
            shift=phases_cfg.shift,
        )

    @property
    def num_phases(self) -> int:
        return len(self.steps_per_phase)

    def steps_of_phase(self, phase: int) -> range:
        """Global (0-based) indices of the steps that phase ``phase`` runs, in order."""
        self._check_phase(phase)
        first = sum(self.steps_per_phase[:phase])
        return range(first, first + self.steps_per_phase[phase])

    def phase_start(self, phase: int) -> float:
        """The time the phase starts from (the paper's ``s_{k-1}``; 1 for the first phase)."""
        self._check_phase(phase)
        return self.boundaries[phase]

    def phase_end(self, phase: int) -> float:
        """The time the phase ends at, where its anchor lives (the paper's ``s_k``; 0 for the last)."""
        self._check_phase(phase)
        return self.boundaries[phase + 1]

    def phase_is_high_noise(self, phase: int, expert_boundary: float) -> bool:
        """Whether the teacher's high-noise expert serves every step of the phase (each step's
        time >= b). Where the phase ends does not matter: with shift 5 the first of two phases
        ends at 0.833, below Wan2.2 A14B's 0.875, yet both its steps (t = 1, 0.9375) are
        high-noise steps, so its generator starts from the high-noise expert."""
        return all(self.times[i] >= expert_boundary - _TIME_TOLERANCE for i in self.steps_of_phase(phase))

    def _check_phase(self, phase: int) -> None:
        if not 0 <= phase < self.num_phases:
            raise ValueError(f"phase must be in 0..{self.num_phases - 1} (0-based), got {phase}")


def _resolve_split(
    num_steps: int, num_phases: Optional[int], steps_per_phase: Optional[Sequence[int]]
) -> Tuple[int, ...]:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if steps_per_phase is not None:
        split = tuple(int(n) for n in steps_per_phase)
        if not split or any(n < 1 for n in split):
            raise ValueError(f"steps_per_phase must be a non-empty list of positive integers, got {list(split)}")
        if sum(split) != num_steps:
            raise ValueError(f"steps_per_phase {list(split)} sums to {sum(split)}, but num_steps is {num_steps}")
        if num_phases is not None and num_phases != len(split):
            raise ValueError(f"steps_per_phase {list(split)} has {len(split)} entries, but num_phases is {num_phases}")
        return split
    if num_phases is None:
        raise ValueError("give num_phases or steps_per_phase")
    if not isinstance(num_phases, int) or isinstance(num_phases, bool) or num_phases < 1:
        raise ValueError(f"num_phases must be a positive integer, got {num_phases!r}")
    if num_steps % num_phases != 0:
        raise ValueError(
            f"num_phases {num_phases} does not divide num_steps {num_steps}; give steps_per_phase explicitly"
        )
    return (num_steps // num_phases,) * num_phases


# ----------------------------------------------------------------------------- re-noising times


def renoise_range(
    layout: PhaseLayout,
    phase: int,
    interval: str = "reverse_nested",
    t_min: float = 0.0,
    t_max: float = 1.0,
    margin: float = 0.0,
    expert_boundary: Optional[float] = None,
) -> Tuple[float, float]:
    """The range ``(lo, hi]`` the re-noising time of ``phase`` is drawn from.

    Start from ``(s, 1]`` (``reverse_nested``, the spec's default) or ``(s, s_prev]``
    (``disjoint``), with ``s = layout.phase_end(phase)``; then keep ``t >= s + margin``; for a
    high-noise phase of a two-expert model (``phase_is_high_noise``) keep ``t > b``; finally
    intersect with ``[t_min, t_max]``. Raises ValueError naming the numbers when nothing is left,
    so a trainer can check every phase before it starts.
    """
    if interval not in RENOISE_INTERVALS:
        raise ValueError(f"interval must be one of {RENOISE_INTERVALS}, got {interval!r}")
    s = layout.phase_end(phase)
    lo = s + margin
    hi = 1.0 if interval == "reverse_nested" else layout.phase_start(phase)
    if expert_boundary is not None and layout.phase_is_high_noise(phase, expert_boundary):
        # Wan2.2 A14B: the high-noise generator's fake/teacher inputs stay with the high expert.
        lo = max(lo, expert_boundary)
    lo, hi = max(lo, t_min), min(hi, t_max)
    if not lo < hi:
        raise ValueError(
            f"phase {phase} (s = {s:.6g}) has an empty re-noising range: lower bound {lo:.6g} "
            f"(s + margin {margin:g}, t_min {t_min:g}, expert boundary {expert_boundary}) is not below "
            f"upper bound {hi:.6g} ({interval}, t_max {t_max:g})"
        )
    return lo, hi


def sample_renoise_t(
    layout: PhaseLayout,
    phase: int,
    batch: int,
    generator: Optional[torch.Generator],
    interval: str = "reverse_nested",
    t_min: float = 0.0,
    t_max: float = 1.0,
    margin: float = 0.0,
    expert_boundary: Optional[float] = None,
    renoise_shift: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Draw ``batch`` re-noising times for ``phase``: u uniform in the unshifted image of
    :func:`renoise_range`, then shifted (the spec's ``T(t; s, 1)``). The shift is the sampling
    schedule's (``layout.shift``, the paper) unless ``renoise_shift`` gives another one: a
    smaller shift puts more re-noising times at low noise, where fine detail is matched.

    Returns a float tensor ``[batch]`` in ``(lo, hi]``: ``t = s`` is excluded because the
    subinterval target divides by ``sigma_{t|s}``, which vanishes there; ``t = 1`` is harmless
    and allowed.

    Draws and computes on ``generator``'s device (CPU generator -> CPU draw), then moves to
    ``device`` (``flow.host_to_device``).
    """
    lo, hi = renoise_range(layout, phase, interval, t_min, t_max, margin, expert_boundary)
    shift_s = layout.shift if renoise_shift is None else renoise_shift
    u_lo, u_hi = unshift(lo, shift_s), unshift(hi, shift_s)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    r = torch.rand(batch, generator=generator, dtype=torch.float64, device=gen_device)
    u = u_hi - (u_hi - u_lo) * r  # r in [0, 1) -> u in (u_lo, u_hi]
    t = shift(u, shift_s).to(dtype)
    # Rounding (float64 maths, then the cast) must not land on or outside the range.
    lo_t = torch.tensor(lo, dtype=dtype, device=t.device)
    hi_t = torch.tensor(hi, dtype=dtype, device=t.device)
    t = torch.minimum(torch.maximum(t, torch.nextafter(lo_t, hi_t)), hi_t)
    return t if device is None else flow.host_to_device(t, device)


def renoise_range_kwargs(phases_cfg: Any) -> Dict[str, Any]:
    """The :func:`renoise_range` options held by a ``config.PhasesConfig``."""
    return dict(
        interval=phases_cfg.renoise_interval,
        t_min=phases_cfg.t_min,
        t_max=phases_cfg.t_max,
        margin=phases_cfg.margin,
        expert_boundary=phases_cfg.expert_boundary,
    )


# ----------------------------------------------------------------------------- expert routing


def expert_for_t(t: Union[float, torch.Tensor], boundary: float) -> Union[str, torch.Tensor]:
    """Which teacher (and fake) expert of a two-expert model handles time ``t``.

    ``t >= boundary`` goes to the high-noise expert. For a python float the answer is
    ``"high"`` or ``"low"``; for a tensor it is a bool tensor of the same shape, True where the
    high-noise expert is used (so a batch can be split with it).
    """
    if isinstance(t, torch.Tensor):
        return t >= boundary
    return HIGH_NOISE if t >= boundary else LOW_NOISE


# ----------------------------------------------------------------------------- SGTS


def sgts_exit_step(num_steps_in_phase: int, seed: int, iteration: int, phase: int) -> int:
    """Stochastic gradient truncation: the step ``j`` in ``1..m`` of a phase with ``m`` steps
    whose prediction keeps its graph (the earlier ones run under no_grad).

    Uniform over ``1..m`` and a pure function of ``(seed, iteration, phase)``, so every rank
    picks the same ``j`` without communicating.
    """
    if num_steps_in_phase < 1:
        raise ValueError(f"num_steps_in_phase must be >= 1, got {num_steps_in_phase}")
    generator = torch.Generator(device="cpu").manual_seed(_mix_seed(seed, iteration, phase))
    return int(torch.randint(1, num_steps_in_phase + 1, (1,), generator=generator).item())


def _mix_seed(*values: int) -> int:
    # A stable hash (python's hash() is salted for str and wraps for large ints), so nearby
    # (seed, iteration, phase) triples give unrelated generator seeds.
    digest = hashlib.blake2b(":".join(str(int(v)) for v in values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
