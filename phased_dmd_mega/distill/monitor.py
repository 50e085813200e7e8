"""The collapse monitor (``logging.eval_every``): does the run keep the teacher's diversity and
motion, and are its samples still sane?

Every ``eval_every`` iterations the generators (their EMA copies when EMA is on) sample a fixed
set: ``eval_prompts`` prompts x ``eval_seeds`` seeds, the same noise every time. The model-free
statistics of ``evaluation.statistics`` are taken on those samples (on the latents; on decoded
frames too when ``logging.sample_vae`` names a VAE; the DINO cosine when ``logging.eval_dino``
names a model) and compared with the teacher's on the same prompts and seeds, measured once at
the start (``eval_teacher_steps`` guided Euler steps; kept in ``run.output_dir`` as
``monitor_teacher.json``, so that a resumed run compares with the same figures).

A figure *collapses* when it falls to less than ``collapse_fraction`` of the teacher's: the
latent and pixel spreads across seeds (diversity), the change from frame to frame (motion), and
one minus the DINO cosine (diversity: the cosine itself rises as the seeds' samples become
alike). Samples *saturate* when their latent RMS exceeds the teacher's by more than
1 / ``collapse_fraction``, or when more than ``saturation_limit`` of their decoded pixel values
are clipped (and more than the teacher's).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.checkpoint_folder import iteration_of, published
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.data import PromptSource
from phased_dmd_mega.distill.optim import all_ranks_agree
from phased_dmd_mega.errors import RunStopped
from phased_dmd_mega.evaluation import statistics
from phased_dmd_mega.files import write_json
from phased_dmd_mega.log import get_logger
from phased_dmd_mega.sample import decode, family_of, generate, load_vae, sample_noise
from phased_dmd_mega.schedule import PhaseLayout

log = get_logger(__name__)

TEACHER_FILE = "monitor_teacher.json"
SEED_OFFSET = 1_000_003  # the monitor's noise is its own, apart from the periodic samples' seeds
# Figures that fall as a run collapses, and the figure they are judged by (1 - cosine for DINO).
FALLING = ("latent_spread", "pixel_spread", "frame_change", "latent_frame_change")
DINO = "dino_cosine"
STRIP = 4  # frames per video in the TensorBoard grid


@dataclass
class Evaluation:
    """One evaluation: the mean over prompts of each figure, and the samples behind them."""

    figures: Dict[str, float]
    latents: torch.Tensor
    frames: Optional[torch.Tensor] = None


@dataclass
class Verdict:
    step: int
    figures: Dict[str, float]
    problems: List[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


def figures_of(latents: torch.Tensor, frames: Optional[torch.Tensor], prompt_index, dino=None) -> Dict[str, float]:
    """The mean over prompts of every model-free statistic the samples allow (and DINO's)."""
    per_prompt = statistics.model_free_statistics(latents, frames, prompt_index)
    if dino is not None and frames is not None:
        from phased_dmd_mega.evaluation.dino import dino_cosine

        per_prompt[DINO] = dino_cosine(dino, frames, prompt_index)
    means = {name: statistics.mean_over_prompts(values) for name, values in per_prompt.items()}
    return {name: value for name, value in means.items() if value is not None}


def problems_of(figures: Dict[str, float], teacher: Dict[str, float], logging) -> List[str]:
    """What is wrong with ``figures`` against the teacher's (empty: nothing), by the run's
    ``logging`` settings (``collapse_fraction``, ``saturation_limit``)."""
    fraction = logging.collapse_fraction
    found = [f"{name} is {value}" for name, value in sorted(figures.items()) if not math.isfinite(value)]
    for name in FALLING:
        if name in figures and teacher.get(name, 0) > 0 and figures[name] < fraction * teacher[name]:
            found.append(f"{name} {figures[name]:.4g} < {fraction:g} x the teacher's {teacher[name]:.4g}")
    if DINO in figures and DINO in teacher and 1 - figures[DINO] < fraction * (1 - teacher[DINO]):
        found.append(f"{DINO} {figures[DINO]:.4g}: 1 - it < {fraction:g} x the teacher's 1 - {teacher[DINO]:.4g}")
    if figures.get("latent_rms", 0) > teacher.get("latent_rms", math.inf) / fraction:
        found.append(
            f"latent_rms {figures['latent_rms']:.4g} > the teacher's {teacher['latent_rms']:.4g} / {fraction:g}"
        )
    clipped = figures.get("clipped_fraction")
    if clipped is not None and clipped > logging.saturation_limit and clipped > teacher.get("clipped_fraction", 0):
        found.append(f"clipped_fraction {clipped:.4g} > saturation_limit {logging.saturation_limit:g}")
    return found


class CollapseMonitor:
    """The fixed prompts and noise, the teacher's figures, and the verdict of each evaluation."""

    def __init__(self, cfg, prompts: PromptSource, geometry, dims, output: Path):
        self.logging = cfg.logging
        count = min(self.logging.eval_prompts, len(prompts))
        self.prompt_index = [p for p in range(count) for _ in range(self.logging.eval_seeds)]
        self.seeds = [cfg.run.seed + SEED_OFFSET + s for _ in range(count) for s in range(self.logging.eval_seeds)]
        resolution = cfg.data.resolutions[0].pixels
        self.condition, self.negative = prompts.conditions(self.prompt_index, resolution)
        self.noise = sample_noise(geometry.latent_shape(*resolution), self.seeds)
        self.step_rule, self.shift, self.dims, self.output = cfg.phases.step_rule, cfg.phases.shift, dims, output
        self.teacher: Optional[Dict[str, float]] = None
        self.last_healthy: Optional[int] = None  # the last iteration whose evaluation found nothing
        self._vae, self._dino = None, None

    # -------------------------------------------------------------- sampling

    def _sample(self, generators, layout: PhaseLayout, negative: Optional[Condition] = None) -> Evaluation:
        """Every model-parallel rank samples (they return the same latents); rank 0 decodes."""
        latents = generate(generators, layout, self.condition, self.noise, self.step_rule, None, self.seeds, negative)
        frames = None
        if parallel.layout().rank == 0:
            self._load_models()
            if self._vae is not None:
                frames = decode(self._vae, latents)
        return Evaluation(figures_of(latents, frames, self.prompt_index, self._dino), latents, frames)

    def _load_models(self) -> None:
        device = parallel.layout().device
        if self.logging.sample_vae is not None and self._vae is None:
            self._vae = load_vae(self.logging.sample_vae, family_of(self.dims), device=device)
        if self.logging.eval_dino is not None and self._dino is None:
            from phased_dmd_mega.evaluation.dino import DinoEmbedder

            self._dino = DinoEmbedder.load(self.logging.eval_dino, device)

    def measure_teacher(self, guided_teacher) -> Dict[str, float]:
        """The teacher's figures: read back from the run folder, or sampled now and stored."""
        path = self.output / TEACHER_FILE
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("settings") == self._identity():
                self.teacher = stored["figures"]
                return self.teacher
        layout = PhaseLayout.build(self.logging.eval_teacher_steps, num_phases=1, shift=self.shift)
        self.teacher = self._sample([guided_teacher], layout, self.negative).figures
        if parallel.layout().rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            write_json(path, {"settings": self._identity(), "figures": self.teacher})
        log.info("collapse monitor: the teacher's figures %s", _format(self.teacher))
        return self.teacher

    def _identity(self) -> Dict[str, Any]:
        """What the teacher's figures depend on (a change re-measures them)."""
        return {
            "prompt_index": self.prompt_index,
            "seeds": self.seeds,
            "teacher_steps": self.logging.eval_teacher_steps,
            "latent_shape": list(self.noise.shape[1:]),
            "vae": self.logging.sample_vae,
            "dino": self.logging.eval_dino,
        }

    # -------------------------------------------------------------- evaluating

    def evaluate(self, generators, layout: PhaseLayout, step: int) -> "tuple[Verdict, Evaluation]":
        """Sample with the generators and judge the figures against the teacher's. Every rank
        returns rank 0's verdict (decoded and DINO figures exist there only)."""
        evaluation = self._sample(generators, layout)
        problems = problems_of(evaluation.figures, self.teacher or {}, self.logging)
        healthy = all_ranks_agree(not problems or parallel.layout().rank != 0)
        if healthy:
            self.last_healthy = step
            problems = []
        elif not problems:
            problems = ["rank 0 found a collapse"]
        return Verdict(step, evaluation.figures, problems), evaluation

    def grid(self, evaluation: Evaluation, title: str):
        """The samples as a picture (prompts x seeds; a video as a strip of STRIP frames from
        its first to its last): uint8 [H, W, 3]."""
        from phased_dmd_mega.evaluation.grid import GridBlock, grid_image

        frames = evaluation.latents.shape[2] if evaluation.frames is None else evaluation.frames.shape[1]
        strip = STRIP if frames > 1 else 1
        block = GridBlock.of(title, self.prompt_index, self.seeds, evaluation.frames, evaluation.latents, strip)
        return grid_image([block], tile_height=64)

    def check(self, generators, layout: PhaseLayout, step: int, tensorboard=None) -> Verdict:
        """Evaluate, and record it: ``monitor.jsonl`` in the run folder, the log (a warning with
        the figures when something is wrong), TensorBoard (figures and the samples' grid)."""
        verdict, evaluation = self.evaluate(generators, layout, step)
        if parallel.layout().rank != 0:
            return verdict
        entry = {"iteration": step, "figures": verdict.figures, "teacher": self.teacher, "problems": verdict.problems}
        with open(self.output / "monitor.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if verdict.healthy:
            log.info("collapse monitor, iteration %d: %s", step, _format(verdict.figures))
        else:
            log.warning(
                "collapse monitor, iteration %d: %s (teacher: %s)",
                step,
                "; ".join(verdict.problems),
                _format(self.teacher or {}),
            )
        if tensorboard is not None:
            for name, value in verdict.figures.items():
                tensorboard.add_scalar(f"monitor/{name}", value, step)
                if self.teacher and name in self.teacher:
                    tensorboard.add_scalar(f"monitor/{name}_teacher", self.teacher[name], step)
            tensorboard.add_image(
                "monitor/samples", self.grid(evaluation, f"iteration {step}"), step, dataformats="HWC"
            )
            tensorboard.flush()
        return verdict


class CollapseError(RunStopped):
    """The monitor found a collapse and ``logging.stop_on_collapse`` stopped the run."""


def collapse_message(verdict: Verdict, checkpoint_dir, last_healthy: Optional[int]) -> str:
    """Why the run stopped, and the newest checkpoint before the decline (at or before the last
    evaluation that found nothing wrong)."""
    before = [p for p in published(checkpoint_dir) if last_healthy is not None and iteration_of(p) <= last_healthy]
    if before:
        where = f"the last checkpoint before the decline: {before[-1]}"
    elif last_healthy is None:
        where = "no evaluation before this one was healthy"
    else:
        where = f"no checkpoint at or before iteration {last_healthy} (the last healthy evaluation) remains"
    return (
        f"collapse at iteration {verdict.step}: {'; '.join(verdict.problems)}; stopped with a checkpoint in "
        f"{checkpoint_dir} (logging.stop_on_collapse); {where}"
    )


def _format(figures: Dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in sorted(figures.items()))
