"""The two objectives of one Phased DMD phase (arXiv 2510.27684: the fake
model's subinterval score matching, Eq. 12-13, and the generator's DMD update, Eq. 11).

Fake model: score matching within the subinterval (s, t) from the generator's anchors x_s
(no x0 exists), ``losses.subinterval_flow_loss``. Generator: the DMD gradient at level s from
the teacher's and the fake model's in-subinterval Tweedie estimates of x_s, ``losses.dmd_loss``
(or the x0-space form of the official code, ``dmd_form="x0"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from phased_dmd_mega import flow, losses
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.distill.loss_shard import LossShard
from phased_dmd_mega.distill.roles import Experts, GuidedTeacher
from phased_dmd_mega.distill.rollout import Anchor

DMD_FORMS = ("subinterval", "x0")


@dataclass
class Renoised:
    """x_t drawn from the anchor: x_t = alpha_{t|s} x_s + sigma_{t|s} eps."""

    x_t: torch.Tensor
    t: torch.Tensor  # [B]
    eps: torch.Tensor

    def rows(self, rows: slice) -> "Renoised":
        return Renoised(self.x_t[rows], self.t[rows], self.eps[rows])


def renoise(
    x_s: torch.Tensor,
    s: float,
    t: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    eps: Optional[torch.Tensor] = None,
) -> Renoised:
    """Re-noise ``x_s`` to the times ``t``, with ``eps`` or fresh noise drawn from ``generator``."""
    if eps is None:
        eps = flow.seeded_normal(x_s, generator)
    s_batch = torch.full_like(t, s)
    return Renoised(losses.subinterval_noise(x_s.detach(), eps, s_batch, t), t, eps)


def fake_score_loss(
    fake: Experts,
    anchor_x_s: torch.Tensor,
    s: float,
    noised: Renoised,
    condition: Condition,
    weight_clamp: Optional[float] = None,
    shard: LossShard = LossShard(),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean over the batch of the subinterval flow-matching loss of the fake model, on this
    rank's shard: (the partial to back-propagate, the whole-sample value to log)."""
    x_s = anchor_x_s.detach()
    velocity = fake(noised.x_t, noised.t, condition)
    s_batch = torch.full_like(noised.t, s)
    if shard.fraction == 0.0:  # only padding here: nothing to add, but stay in the graph
        partial = velocity.sum() * 0.0
    else:
        per_sample = losses.subinterval_flow_loss(
            shard.take(velocity), shard.take(x_s), shard.take(noised.eps), s_batch, noised.t, weight_clamp
        )
        partial = per_sample.mean() * shard.fraction  # the shard's share of the whole-sample mean
    return partial, shard.sum(partial)


def generator_dmd_loss(
    anchor: Anchor,
    noised: Renoised,
    teacher: GuidedTeacher,
    fake: Experts,
    condition: Condition,
    negative: Condition,
    dmd_form: str = "subinterval",
    norm_min: float = 1e-4,
    shard: LossShard = LossShard(),
) -> Dict[str, torch.Tensor]:
    """The DMD loss of the generator at the anchor; also the quantities worth logging."""
    if dmd_form not in DMD_FORMS:
        raise ValueError(f"dmd_form {dmd_form!r} is not one of {', '.join(DMD_FORMS)}")
    with torch.no_grad():
        real_flow = teacher(noised.x_t, noised.t, condition, negative)
        fake_flow = fake(noised.x_t, noised.t, condition)
        if dmd_form == "subinterval":
            real = flow.subinterval_tweedie(noised.x_t, real_flow, anchor.s, noised.t)
            fake_estimate = flow.subinterval_tweedie(noised.x_t, fake_flow, anchor.s, noised.t)
        else:
            real = flow.x0_from_flow(noised.x_t, real_flow, noised.t)
            fake_estimate = flow.x0_from_flow(noised.x_t, fake_flow, noised.t)
    student = anchor.x_s if dmd_form == "subinterval" else anchor.x0_student
    student, fake_estimate, real = shard.take(student), shard.take(fake_estimate), shard.take(real)
    loss = losses.dmd_loss(student, fake_estimate, real, norm_min=norm_min, group=shard.group)
    return {"loss": loss, "real_fake_gap": shard.mean((real - fake_estimate).abs())}
