"""Reference samples from the teacher of a run: ``phased-dmd sample --checkpoint C --teacher``.

To judge a distillation, the teacher samples the prompts and seeds the generators sample
(``sample.sample_to_folder``: same noise for sample ``i``, same prompt rows, same folder), with
many steps and classifier-free guidance. The teacher is the one the checkpoint's run trained
against (its ``model.teacher_path``; a ``model.teacher_path=...`` override names another or a
moved one), built as the trainer builds it (``build_teacher``: one model, or Wan2.2-A14B's two
experts split at the run's boundary). Each of the ``steps`` Euler steps of the flow ODE runs on
the shifted table ``t_i = shift(1 - i/steps)`` (the run's ``phases.shift``), with the velocity
of ``GuidedTeacher``: ``uncond + g * (cond - uncond)`` from the expert that owns ``t_i``. The
negative prompt is the prompt source's, as in training.
"""

from __future__ import annotations

from typing import Optional, Sequence

from phased_dmd_mega.distill.build import build_teacher
from phased_dmd_mega.distill.generators import open_run_config
from phased_dmd_mega.distill.roles import GuidedTeacher
from phased_dmd_mega.errors import RequestError
from phased_dmd_mega.log import get_logger
from phased_dmd_mega.sample import Samplers, run_prompts
from phased_dmd_mega.schedule import PhaseLayout

log = get_logger(__name__)


def teacher_samplers(path, steps: int, guidance: Optional[float] = None, overrides: Sequence[str] = ()) -> Samplers:
    """The teacher of the checkpoint at ``path`` as a ``steps``-step guided Euler sampler.
    ``guidance``: one scale for every expert (None: the run's ``phases.guidance_scale`` and
    ``guidance_scale_low_noise``, the teacher the generators were distilled from)."""
    folder, cfg = open_run_config(path, overrides)
    if cfg.model.teacher_path is None:
        raise RequestError(
            f"{folder}'s run had no model.teacher_path (a randomly initialised teacher, not stored): "
            "name the teacher with the override model.teacher_path=PATH"
        )
    phases = cfg.phases
    high, low = (phases.guidance_scale, phases.guidance_scale_low_noise) if guidance is None else (guidance, None)
    teacher = build_teacher(cfg).eval()
    guided = GuidedTeacher(teacher, high, low, phases.cfg_norm)  # the guidance the run distilled
    # One phase of `steps` steps on the run's shifted table, walked by the few-step sampler.
    layout = PhaseLayout.build(steps, num_phases=1, shift=phases.shift)
    scales = (
        {guided.guidance_scale} if teacher.low is None else {guided.guidance_scale, guided.guidance_scale_low_noise}
    )
    unguided = scales == {1}
    source = {
        "checkpoint": str(folder),
        "teacher": True,
        "teacher_path": str(cfg.model.teacher_path),
        "steps": steps,
        "guidance": guided.guidance_scale,
        "experts": 1 if teacher.low is None else 2,
    }
    if teacher.low is not None:
        source.update(boundary=teacher.boundary, guidance_low_noise=guided.guidance_scale_low_noise)
    log.info(
        "sampling the teacher %s: %d steps, shift %g, guidance %s%s",
        cfg.model.teacher_path,
        steps,
        layout.shift,
        guided.guidance_scale,
        f" (two experts, boundary {teacher.boundary:g})" if teacher.low is not None else "",
    )
    return Samplers(
        # Unguided (every scale 1): the conditional teacher alone, so no negative prompt is needed.
        [teacher if unguided else guided],
        layout,
        "euler",
        run_prompts(cfg, teacher.high.dims),
        cfg.data.resolutions[0].pixels,
        source,
        teacher.high.dims,
        guided=not unguided,
    )
