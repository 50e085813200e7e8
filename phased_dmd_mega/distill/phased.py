"""One Phased DMD iteration: fake-score updates, then one generator update (two time scales).

The same code runs the paper's baselines: one-phase N-step DMD with SGTS (a layout with one
phase) and naive N-step DMD (``method="dmd_naive"``: gradient through every step).

An iteration can stop between its sub-updates (after any fake update, before the generator
update) and continue later, in another process, from where it stopped: every random draw is
keyed by (seed, iteration, phase, sub-update), and the generators do not change before the
generator update, so the continued iteration is the uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from phased_dmd_mega import flow, parallel
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.config import PhasesConfig
from phased_dmd_mega.distill.loss_shard import LossShard
from phased_dmd_mega.distill.objectives import fake_score_loss, generator_dmd_loss, renoise
from phased_dmd_mega.distill.optim import RoleOptimizer, all_ranks_agree
from phased_dmd_mega.distill.roles import Experts, GuidedTeacher
from phased_dmd_mega.distill.rollout import Anchor, rollout_to_phase_end
from phased_dmd_mega.schedule import PhaseLayout, renoise_range_kwargs, sample_renoise_t, sgts_exit_step


@dataclass
class Batch:
    condition: Condition
    negative: Condition
    latent_shape: tuple  # of the generated latents [B, C, F, H, W]

    def rows(self, rows: slice) -> "Batch":
        """The samples ``rows`` of the batch (one micro-batch)."""
        index = torch.arange(self.latent_shape[0])[rows]
        return Batch(
            self.condition.select(index.to(self.condition.context.device)),
            self.negative.select(index.to(self.negative.context.device)),
            (len(index), *self.latent_shape[1:]),
        )


@dataclass
class StoppedIteration:
    """An iteration stopped between sub-updates: its first ``fake_updates_done`` fake updates
    ran (1 to all of them; the generator update did not), logging ``logs`` in ``seconds``.
    ``PhasedDMD.iteration(..., resume=it)`` runs the rest."""

    fake_updates_done: int
    logs: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class PhasedDMD:
    """Holds the roles of every phase and runs iterations of one phase at a time."""

    def __init__(
        self,
        layout: PhaseLayout,
        teacher: GuidedTeacher,
        generators: List[RoleOptimizer],
        fakes: List[RoleOptimizer],
        phases: PhasesConfig,
        *,
        seed: int = 0,
        micro_batch_size: Optional[int] = None,
        device: torch.device = torch.device("cpu"),
    ):
        """``phases``: the run's method, step rule, loss form and re-noising options.
        ``micro_batch_size``: each update runs its batch in micro-batches of this many samples
        (None: the whole batch at once); same random draws and, with the Euler rule, exactly the
        same update, while the activations kept for backward are a micro-batch's."""
        if len(generators) != layout.num_phases or len(fakes) != layout.num_phases:
            raise ValueError(f"{layout.num_phases} phases need as many generators and fakes")
        self.layout, self.teacher, self.generators, self.fakes = layout, teacher, generators, fakes
        self.phases, self.seed, self.micro_batch_size, self.device = phases, seed, micro_batch_size, device
        self._data_parallel_rank = parallel.data_parallel_rank()

    def _generator_fns(self) -> List[Experts]:
        return [role.model for role in self.generators]

    def _random(self, iteration: int, phase: int, purpose: int) -> torch.Generator:
        # The ranks that hold one sample (tensor- and sequence-parallel) draw the same numbers
        # without communicating; data-parallel ranks draw their own noise and re-noise times.
        # Integers hash the same in every process (unlike strings).
        key = (self.seed, iteration, phase, purpose, self._data_parallel_rank)
        return torch.Generator(device="cpu").manual_seed(hash(key) % 2**63)

    def _exit_step(self, phase: int, iteration: int, purpose: int) -> Optional[int]:
        if self.phases.method == "dmd_naive":
            return None
        steps = len(self.layout.steps_of_phase(phase))
        return sgts_exit_step(steps, self.seed + purpose, iteration, phase)

    def _loss_shard(self, batch: Batch) -> LossShard:
        """This rank's tokens of each sample in the losses (all roles share one token split)."""
        return LossShard.for_model(self.teacher.experts.high, batch.latent_shape, batch.condition.given_frames)

    def _noise(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return flow.host_to_device(torch.randn(batch.latent_shape, generator=generator), self.device)

    def _anchor(self, phase: int, batch: Batch, iteration: int, purpose: int, with_grad: bool) -> Anchor:
        gen = self._random(iteration, phase, purpose)
        return rollout_to_phase_end(
            self._generator_fns(),
            self.layout,
            phase,
            self._noise(batch, gen),
            batch.condition,
            self._exit_step(phase, iteration, purpose),
            self.phases.step_rule,
            with_grad,
            gen,
        )

    def _renoise_draws(self, like: torch.Tensor, phase: int, iteration: int, purpose: int):
        """The re-noising times and noise of a whole batch shaped like ``like``."""
        gen = self._random(iteration, phase, purpose + 1000)
        options = renoise_range_kwargs(self.phases)
        t = sample_renoise_t(
            self.layout,
            phase,
            like.shape[0],
            gen,
            **options,
            renoise_shift=self.phases.renoise_shift,
            device=self.device,
        )
        return t, flow.seeded_normal(like, gen)

    def _renoised(self, anchor: Anchor, phase: int, iteration: int, purpose: int):
        t, eps = self._renoise_draws(anchor.x_s, phase, iteration, purpose)
        return renoise(anchor.x_s, anchor.s, t, eps=eps)

    def _micro_batches(self, batch: Batch) -> List[slice]:
        size = batch.latent_shape[0]
        step = self.micro_batch_size or size
        if size % step:
            raise ValueError(f"micro_batch_size {step} does not divide the batch of {size} samples")
        return [slice(start, start + step) for start in range(0, size, step)]

    def _fake_anchors(self, phase: int, batch: Batch, iteration: int, first: int = 0) -> List[Tuple[int, Anchor]]:
        """(index, anchor) of the iteration's fake updates ``first``, ``first + 1``, ... (purposes
        ``1 + index``), in that order.

        The generators do not change between these updates, so with ``batch_fake_rollouts`` the
        rollouts that share an SGTS exit step run as one batch: the same noise per update, hence
        the same anchors (with the Euler rule; the stochastic rule draws its step noise once
        for the group). Fewer, larger DiT calls; the rollout activations grow with the group.
        A group runs whole as long as one of its updates is still to do, so that an iteration
        continued from ``first`` gets the anchors of the uninterrupted one, bit for bit.
        """
        purposes = [1 + index for index in range(self.phases.fake_updates_per_generator_update)]
        if not self.phases.batch_fake_rollouts:
            return [
                (purpose - 1, self._anchor(phase, batch, iteration, purpose, with_grad=False))
                for purpose in purposes[first:]
            ]
        groups: Dict[Optional[int], List[int]] = {}
        for purpose in purposes:
            groups.setdefault(self._exit_step(phase, iteration, purpose), []).append(purpose)
        anchors: Dict[int, Anchor] = {}
        for exit_step, members in groups.items():
            if members[-1] <= first:  # every update of the group is done
                continue
            gens = [self._random(iteration, phase, purpose) for purpose in members]
            noise = torch.cat([self._noise(batch, gen) for gen in gens])
            rows = torch.arange(batch.condition.batch, device=noise.device).repeat(len(members))
            grouped = rollout_to_phase_end(
                self._generator_fns(),
                self.layout,
                phase,
                noise,
                batch.condition.select(rows),
                exit_step,
                self.phases.step_rule,
                False,
                gens[0],
            )
            for purpose, x_s, x_exit, flow_exit in zip(
                members, *(t.chunk(len(members)) for t in (grouped.x_s, grouped.x_exit, grouped.flow_exit))
            ):
                anchors[purpose] = Anchor(x_s, grouped.s, x_exit, grouped.t_exit, flow_exit)
        return [(purpose - 1, anchors[purpose]) for purpose in purposes[first:]]

    def fake_update(self, phase: int, batch: Batch, iteration: int, index: int, anchor: Anchor) -> Dict[str, float]:
        """Fake update ``index`` of the iteration, on its anchor from :meth:`_fake_anchors`."""
        noised = self._renoised(anchor, phase, iteration, 1 + index)
        role = self.fakes[phase]

        def micro_loss(rows: slice):
            micro = batch.rows(rows)
            loss, whole = fake_score_loss(
                role.model,
                anchor.x_s[rows],
                anchor.s,
                noised.rows(rows),
                micro.condition,
                self.phases.weight_clamp,
                self._loss_shard(micro),
            )
            return loss, [loss], {"fake_loss": whole}

        logs, norm = self._accumulate(role, batch, micro_loss)
        return {**logs, "fake_grad_norm": norm}

    def generator_update(self, phase: int, batch: Batch, iteration: int) -> Dict[str, float]:
        gen = self._random(iteration, phase, 0)
        noise = self._noise(batch, gen)
        exit_step = self._exit_step(phase, iteration, 0)
        t, eps = self._renoise_draws(noise, phase, iteration, 0)

        def micro_loss(rows: slice):
            micro = batch.rows(rows)
            anchor = rollout_to_phase_end(
                self._generator_fns(),
                self.layout,
                phase,
                noise[rows],
                micro.condition,
                exit_step,
                self.phases.step_rule,
                True,
                gen,
            )
            out = generator_dmd_loss(
                anchor,
                renoise(anchor.x_s, anchor.s, t[rows], eps=eps[rows]),
                self.teacher,
                self.fakes[phase].model,
                micro.condition,
                micro.negative,
                self.phases.dmd_form,
                self.phases.norm_min,
                self._loss_shard(micro),
            )
            # The guard inside dmd_loss zeroes NaN directions; a teacher or fake model gone
            # non-finite shows in the estimate gap and must skip the update, not step on zeros.
            watched = [out["loss"], out["real_fake_gap"]]
            return out["loss"], watched, {"dmd_loss": out["loss"], "real_fake_gap": out["real_fake_gap"]}

        logs, norm = self._accumulate(self.generators[phase], batch, micro_loss)
        return {**logs, "generator_grad_norm": norm}

    def _accumulate(self, role: RoleOptimizer, batch: Batch, micro_loss):
        """Backward over the micro-batches (each loss scaled by its share of the batch), then
        one step; logged values are batch means. Anything watched non-finite on any rank skips
        the whole update on every rank (no step at all, NaN gradient norm reported)."""
        slices = self._micro_batches(batch)
        totals: Dict[str, torch.Tensor] = {}
        for rows in slices:
            loss, watched, logged = micro_loss(rows)
            finite = torch.stack([torch.isfinite(v).all() for v in watched]).all()
            if not all_ranks_agree(bool(finite)):  # one host read per micro-batch
                role.zero_grad()
                return {key: float("nan") for key in logged}, float("nan")
            (loss / len(slices)).backward()
            for key, value in logged.items():
                totals[key] = totals.get(key, 0.0) + value.detach() / len(slices)
        norm = role.step()
        return dict(zip(totals, torch.stack(list(totals.values())).tolist())), norm  # one read for the logs

    def iteration(
        self,
        phase: int,
        batch: Batch,
        iteration: int,
        stop: Optional[Callable[[], bool]] = None,
        resume: Optional[StoppedIteration] = None,
    ) -> Union[Dict[str, float], StoppedIteration]:
        """The fake updates, then the generator update; returns the logs.

        ``stop`` is asked after each fake update (so also before the generator update); it must
        give the same answer on every rank (e.g. ``all_ranks_agree``). When it says so, the
        iteration ends there and returns a ``StoppedIteration``; ``resume`` with it (and the same
        phase, batch and iteration, in this process or in one restored from a checkpoint saved
        then) runs the rest, and returns the logs of the uninterrupted iteration.
        """
        start = time.perf_counter()
        done = resume.fake_updates_done if resume is not None else 0
        logs: Dict[str, float] = dict(resume.logs) if resume is not None else {}
        earlier = resume.seconds if resume is not None else 0.0
        for index, anchor in self._fake_anchors(phase, batch, iteration, first=done):
            logs.update(self.fake_update(phase, batch, iteration, index, anchor))
            if stop is not None and stop():
                return StoppedIteration(index + 1, logs, earlier + time.perf_counter() - start)
        logs.update(self.generator_update(phase, batch, iteration))
        logs["step_seconds"] = earlier + time.perf_counter() - start
        return logs


@torch.no_grad()
def sample(
    generators: List[Experts],
    layout: PhaseLayout,
    noise: torch.Tensor,
    condition: Condition,
    step_rule: str = "euler",
    noise_generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Few-step sampling: every step uses the generator of its phase (a mixture of experts over
    noise levels, at no extra inference cost)."""
    last = layout.num_phases - 1
    return rollout_to_phase_end(
        generators, layout, last, noise, condition, len(layout.steps_of_phase(last)), step_rule, False, noise_generator
    ).x_s
