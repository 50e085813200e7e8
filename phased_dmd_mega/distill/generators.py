"""The distilled generators of a training checkpoint, opened for sampling and export.

Every checkpoint the trainer publishes (``iter_N/``; a checkpoint root names its newest in
``latest``) holds the resolved run configuration, ``config.yaml``, beside the sharded tensors.
From it the generator roles are rebuilt exactly as the trainer builds them (its phase layout and
``generator_for_phase``), then only their weights are read: ``generator{k}``, or the EMA copies
``generator{k}_ema``. Fake models and optimizer states stay on disk (megatron's
dist_checkpointing loads the keys asked for and ignores the others).

A full fine-tune needs no teacher weights (the generators' own replace them): the teacher is built
as a shell of the right shapes and never read. LoRA generators are adapters on the teacher's
frozen weights, which are loaded from ``model.teacher_path`` as in training. A run with a student
(``model.student_path``) rebuilds its generators at the student's size, from the student: a
shell for a full fine-tune, its weights for LoRA (the teacher is then a shell either way).

The models are built for the current parallel state (call ``parallel.initialize`` first):
checkpoints are stored by global layout, so a run trained at TP 8 opens at TP 1 for export, or at
any TP that divides the heads for sampling under torchrun.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from phased_dmd_mega import checkpoint, parallel
from phased_dmd_mega.config import Config, load_config
from phased_dmd_mega.distill.build import (
    WeightsOnly,
    build_student,
    build_teacher,
    generator_for_phase,
    phase_layout,
    role_bases,
    teacher_expert_for_phase,
)
from phased_dmd_mega.distill.roles import Experts
from phased_dmd_mega.errors import RequestError
from phased_dmd_mega.log import get_logger
from phased_dmd_mega.models.architectures import architecture_of
from phased_dmd_mega.models.checkpoints import SINGLE
from phased_dmd_mega.parallel.state import use_tf32
from phased_dmd_mega.schedule import PhaseLayout

log = get_logger(__name__)


@dataclass
class DistilledGenerators:
    """One generator per phase of a trained run, ready to sample with or export."""

    path: Path  # the iter_N folder read
    config: Config  # the run's configuration (with the overrides given when opening)
    layout: PhaseLayout
    generators: List[Experts]  # generators[k] serves the steps of phase k
    base_experts: List[str]  # per phase: the base expert its generator started from: "high", "low", or "model"
    teacher: Optional[Experts]  # LoRA: the frozen base the adapters sit on; None for a full fine-tune
    teacher_boundary: Optional[float]  # the LoRA base's expert boundary (a two-expert teacher), else None
    iteration: int  # the last iteration whose generator update the weights hold
    ema: bool

    @property
    def lora(self) -> bool:
        return self.config.model.lora.rank > 0

    @property
    def base_path(self) -> Optional[str]:
        """The folder the generators started from (and LoRA adapters sit on): the student's, or the teacher's."""
        model = self.config.model
        return model.student_path or model.teacher_path

    @property
    def dims(self):
        return self.generators[0].high.dims

    @property
    def architecture(self):
        return architecture_of(self.dims)


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder (``iter_N``), or the one a checkpoint root's ``latest`` names."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} {'is not a folder' if path.exists() else 'does not exist'}")
    if (path / checkpoint.LATEST).is_file():
        return checkpoint.latest_checkpoint(path)
    if not (path / checkpoint.CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a training checkpoint: it has neither {checkpoint.CONFIG_FILE} (an iter_N folder "
            f"written by `phased-dmd train`) nor a `{checkpoint.LATEST}` pointer (a checkpoint root)"
        )
    return path


def open_run_config(path, overrides: Sequence[str] = ()) -> Tuple[Path, Config]:
    """The checkpoint folder at ``path`` and its run configuration (with ``overrides``), for the
    current parallel state; the run's float32 precision is set (the caller set up the device
    before the run's config was known)."""
    folder = resolve_checkpoint(path)
    cfg = _for_this_layout(load_config(folder / checkpoint.CONFIG_FILE, overrides))
    use_tf32(cfg.run.tf32)
    return folder, cfg


def open_generators(path, *, ema: bool = False, overrides: Sequence[str] = ()) -> DistilledGenerators:
    """Rebuild and load the generators of the checkpoint at ``path`` (see the module docstring).
    ``overrides``: dotted ``key=value`` changes to the stored configuration (e.g.
    ``model.teacher_path=...`` when the teacher moved, ``model.attention_backend=sdpa``)."""
    device = parallel.layout("open_generators builds models for the parallel state").device
    folder, cfg = open_run_config(path, overrides)
    if ema and cfg.optimizer.ema_decay is None:
        raise RequestError(f"{folder} holds no generator EMA (the run had optimizer.ema_decay unset); drop --ema")
    lora = cfg.model.lora.rank > 0
    # A LoRA generator runs on its base's weights (the student's, or the teacher's); a full
    # fine-tune brings its own.
    student = build_student(cfg, weights=lora)
    teacher = build_teacher(cfg, weights=lora and student is None)
    base = role_bases(teacher, student)
    layout = phase_layout(cfg)
    bases = [teacher_expert_for_phase(base, layout, k) for k in range(layout.num_phases)]
    generators = [generator_for_phase(base, layout, k, cfg) for k in range(layout.num_phases)]
    suffix = "_ema" if ema else ""
    roles = {f"generator{k}{suffix}": WeightsOnly(generator) for k, generator in enumerate(generators)}
    metadata = checkpoint.load_checkpoint(folder, roles)
    generators = [generator.to(device).requires_grad_(False).eval() for generator in generators]
    iteration = checkpoint.generators_iteration(metadata)
    log.info(
        "opened %d %s generator%s (%s) of %s, as of iteration %d%s",
        len(generators),
        "LoRA" if lora else "full",
        "s" if len(generators) > 1 else "",
        ", ".join(roles),
        folder,
        iteration,
        f" (saved inside iteration {metadata['iteration']}, before its generator update)"
        if iteration != metadata["iteration"]
        else "",
    )
    return DistilledGenerators(
        path=folder,
        config=cfg,
        layout=layout,
        generators=generators,
        base_experts=[_expert_name(teacher if student is None else student, model) for model in bases],
        teacher=base if lora else None,
        teacher_boundary=teacher.boundary if student is None else None,
        iteration=iteration,
        ema=ema,
    )


def _expert_name(teacher: Experts, model) -> str:
    if teacher.low is None:
        return SINGLE
    return "high" if model is teacher.high else "low"


def _for_this_layout(cfg: Config) -> Config:
    """The stored configuration, with the parallel section of this process (the run's own may
    have been TP 8 with sequence parallelism; the models are built for the current state)."""
    layout = parallel.layout()
    return replace(
        cfg,
        parallel=replace(
            cfg.parallel,
            tensor_parallel=layout.tensor_parallel,
            ulysses_parallel=layout.ulysses_parallel,
            sequence_parallel=layout.sequence_parallel,
        ),
    )
