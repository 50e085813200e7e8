"""The Phased DMD training loop behind ``phased-dmd train``.

Reads top to bottom: build the roles from the teacher (or the student), then for each step of
the schedule (phase by phase, or alternating) draw a batch, run one iteration (fake updates, then the
generator update), log, and checkpoint. A run resumes from ``checkpoint.dir/latest`` by itself;
non-finite steps are skipped and counted; SIGTERM (cluster preemption) checkpoints and exits.

Preemption. torchrun passes SIGTERM on to its workers and SIGKILLs those still running after
its shutdown timeout (torch 2.13: ``--shutdown-timeout`` or ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``,
30 s by default; see examples/launch_common.sh), and an iteration at 720p takes longer than
that. So the ranks agree whether to stop after every sub-update (each fake update, and the
generator update at the end of the iteration), one one-element all-reduce each: a stop inside
an iteration saves a checkpoint of the iteration so far (``PARTIAL`` in its metadata: the fake
updates done and their logs), which a resumed run continues from the next sub-update, with the
losses of the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import torch

from phased_dmd_mega import checkpoint, checkpoint_folder, parallel
from phased_dmd_mega.config import Config, ConfigError, dump_yaml, load_config
from phased_dmd_mega.data import LatentGeometry, PromptSource, pick_resolution, step_generator
from phased_dmd_mega.distill.alignment import pull_fake_toward_generator, update_ema
from phased_dmd_mega.distill.build import (
    WeightsOnly,
    build_student,
    build_teacher,
    ema_of,
    fake_for_phase,
    generator_for_phase,
    open_inputs,
    phase_layout,
    role_bases,
    role_optimizer,
)
from phased_dmd_mega.distill.monitor import CollapseError, CollapseMonitor, collapse_message
from phased_dmd_mega.distill.optim import RoleOptimizer, all_ranks_agree, set_learning_rate
from phased_dmd_mega.distill.phased import Batch, PhasedDMD, StoppedIteration
from phased_dmd_mega.distill.roles import Experts, GuidedTeacher
from phased_dmd_mega.errors import RunStopped
from phased_dmd_mega.files import sweep_debris
from phased_dmd_mega.flops import FlopCounter, Flops, matmul_precision, peak_tflops
from phased_dmd_mega.locks import FolderLock
from phased_dmd_mega.log import get_logger, process_memory_mib
from phased_dmd_mega.models.architectures import architecture_of
from phased_dmd_mega.progress import Progress
from phased_dmd_mega.sample import PeriodicSamples

log = get_logger(__name__)

PARTIAL = checkpoint.PARTIAL  # in a checkpoint saved inside an iteration: a StoppedIteration
# A checkpoint's metadata key for the non-finite steps in a row up to it: a resumed run stops
# where the uninterrupted one would have.
NONFINITE_STREAK = "nonfinite_streak"


# What a checkpoint's roles and schedule were built from: a resumed run must agree on these
# (learning rates, batch sizes, logging, data and checkpoint cadence may change).
RESUME_FIXED_KEYS = (
    "model.family",
    "model.preset",
    "model.lora.rank",
    "model.lora.alpha",
    "model.lora.target_modules",
    "model.teacher_path",  # a LoRA resumed onto another base model would be silently wrong
    "model.student_path",  # the roles' base, of its own size
    "model.student_preset",
    "optimizer.ida_decay",  # the fakes' weights were pulled with it
    "phases.method",
    "phases.num_steps",
    "phases.num_phases",
    "phases.steps_per_phase",
    "phases.shift",
    "phases.expert_boundary",
    "phases.phase_order",
    "phases.iterations_per_phase",
    "phases.iterations_by_phase",
    "optimizer.ema_decay",
)


MODEL_FOLDERS = ("model.teacher_path", "model.student_path")


def resume_conflicts(saved: Config, current: Config) -> List[str]:
    """``key (checkpoint X, now Y)`` for every RESUME_FIXED_KEYS entry on which they differ
    (the teacher's and the student's folders compared as resolved paths, and not at all when
    ``checkpoint.allow_teacher_path_change`` says they moved)."""

    def value(cfg, key):
        for part in key.split("."):
            cfg = getattr(cfg, part)
        return cfg

    def same(key):
        old, new = value(saved, key), value(current, key)
        if key in MODEL_FOLDERS:
            if current.checkpoint.allow_teacher_path_change:
                return True
            return (old and str(Path(old).resolve())) == (new and str(Path(new).resolve()))
        return old == new

    hint = dict.fromkeys(MODEL_FOLDERS, " [if the folder moved: checkpoint.allow_teacher_path_change=true]")
    conflicts = [
        f"{key} (checkpoint {value(saved, key)!r}, now {value(current, key)!r}){hint.get(key, '')}"
        for key in RESUME_FIXED_KEYS
        if not same(key)
    ]
    return conflicts


def check_resumable(path: Path, cfg: Config) -> None:
    """Refuse to resume from a checkpoint written by a run whose roles or schedule differ: the
    weights would load into the wrong roles, or training would silently continue another run."""
    saved_file = path / checkpoint.CONFIG_FILE
    if not saved_file.is_file():  # written by an older version, or by hand: nothing to compare
        log.warning(
            "%s has no %s: resuming without checking it against this run's config", path, checkpoint.CONFIG_FILE
        )
        return
    try:
        saved = load_config(saved_file)
    except ConfigError as err:  # e.g. a key an older version had: compare nothing rather than refuse
        log.warning("%s does not load as this version's config (%s): resuming without checking it", saved_file, err)
        return
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        raise ConfigError(
            f"cannot resume from {path}: this run differs from the one that wrote it in "
            + "; ".join(conflicts)
            + ". Use the checkpoint's settings, or start afresh in another checkpoint.dir (or with "
            "checkpoint.resume=none checkpoint.on_existing=move_aside)"
        )


def resume_point(cfg: Config) -> Optional[Path]:
    """The checkpoint a run continues from (None: it starts afresh), refused when damaged or
    written by a run whose roles or schedule differ."""
    if cfg.checkpoint.resume == "none":
        return None
    if cfg.checkpoint.resume == "auto":
        path = checkpoint.latest_checkpoint(cfg.checkpoint.dir)  # or the newest intact one
    else:
        path = Path(cfg.checkpoint.resume)
        problem = checkpoint_folder.damage(path)
        if problem is not None:
            raise checkpoint_folder.CheckpointFolderError(f"checkpoint.resume={path}: {problem}")
    if path is None:
        return None
    check_resumable(Path(path), cfg)
    return Path(path)


class NonFiniteLossError(RunStopped):
    """Too many non-finite steps in a row (the run stops with a checkpoint)."""


# ----------------------------------------------------------------------------- schedule


def step_schedule(cfg: Config, num_phases: int) -> List[int]:
    """The phase trained at each step: phase by phase (earlier experts frozen), or in turn (a
    phase whose iterations are used up drops out of the rotation). One-phase baselines (DMD with
    SGTS, naive DMD) get as many iterations as all phases of ``iterations_by_phase`` together."""
    counts = cfg.phases.iterations_by_phase or [cfg.phases.iterations_per_phase] * num_phases
    if num_phases == 1:
        counts = [sum(counts)]
    if cfg.phases.phase_order == "sequential":
        return [phase for phase in range(num_phases) for _ in range(counts[phase])]
    schedule, left = [], list(counts)
    while any(left):
        for phase in range(num_phases):
            if left[phase]:
                schedule.append(phase)
                left[phase] -= 1
    return schedule


def learning_rate_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    peak = process_memory_mib("VmHWM")
    return float("nan") if peak is None else peak / 1024


# ----------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(
        self,
        cfg: Config,
        teacher: Experts,
        prompts: PromptSource,
        geometry: LatentGeometry,
        student: Optional[Experts] = None,
    ):
        self.cfg, self.prompts, self.geometry = cfg, prompts, geometry
        self.dims = teacher.high.dims
        if prompts.image_conditions is not None:  # I2V: each resolution needs its first-frame latents
            prompts.image_conditions.check_resolutions(cfg.data.resolutions)
        self.layout = phase_layout(cfg)
        opt = cfg.optimizer
        # Every role lives on the training device, and is put there before its optimizer exists
        # (an optimizer holds its parameters, and creates its states beside them). The roles are
        # copies of (or LoRA adapters on) the teacher, or the student, made on its device.
        device = parallel.layout().device
        teacher.to(device)  # build_teacher put it there; a teacher built elsewhere moves now
        bases = role_bases(teacher, None if student is None else student.to(device))
        self.generators = [
            role_optimizer(generator_for_phase(bases, self.layout, k, cfg).to(device), opt.generator, opt)
            for k in range(self.layout.num_phases)
        ]
        self.fakes = [
            role_optimizer(fake_for_phase(bases, self.layout, k, cfg).to(device), opt.fake, opt)
            for k in range(self.layout.num_phases)
        ]
        phases = cfg.phases
        guided = GuidedTeacher(teacher, phases.guidance_scale, phases.guidance_scale_low_noise, phases.cfg_norm)
        self.phased = PhasedDMD(
            self.layout,
            guided,
            self.generators,
            self.fakes,
            phases,
            seed=cfg.run.seed,
            micro_batch_size=cfg.data.micro_batch_size,
            device=device,
        )
        self.schedule = step_schedule(cfg, self.layout.num_phases)
        # Generator EMA: a frozen copy per phase, moved toward the generator after each update.
        self.ema = (
            [ema_of(role.model, k, cfg).to(device) for k, role in enumerate(self.generators)]
            if opt.ema_decay is not None
            else None
        )
        self.output = Path(cfg.run.output_dir)
        self.samples = None
        if cfg.logging.sample_every:
            self.samples = PeriodicSamples.for_run(cfg, prompts, geometry, teacher.high.dims)
        self.monitor = (
            CollapseMonitor(cfg, prompts, geometry, self.dims, self.output) if cfg.logging.eval_every else None
        )
        self._stop_requested = False
        self._stopped_within: Optional[StoppedIteration] = None  # from a checkpoint saved mid-iteration
        self._nonfinite = 0  # non-finite steps in a row
        self._tensorboard = self._open_tensorboard()
        # Every DiT's matmuls and attention, counted per call (flops.py) for TFLOP/s and MFU.
        self.flops = FlopCounter().attach(teacher, *(role.model for role in self.generators + self.fakes))
        self.peak_tflops = cfg.logging.peak_tflops or peak_tflops(
            matmul_precision(cfg.model.dtype, cfg.run.tf32, cfg.model.fp8_recipe is not None)
        )

    def _open_tensorboard(self):
        folder = self.cfg.logging.tensorboard_dir
        if folder is None or parallel.layout().rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise RuntimeError(
                "logging.tensorboard_dir is set but the tensorboard package is missing: "
                "pip install 'phased-dmd-mega[tensorboard]'"
            ) from err
        return SummaryWriter(folder)

    def roles(self) -> Dict[str, RoleOptimizer]:
        roles = {f"generator{k}": role for k, role in enumerate(self.generators)}
        roles.update({f"fake{k}": role for k, role in enumerate(self.fakes)})
        for k, ema in enumerate(self.ema or []):
            roles[f"generator{k}_ema"] = WeightsOnly(ema)
        return roles

    def sampling_generators(self) -> List[Experts]:
        """The generators to sample with: their EMA copies when EMA is on."""
        return self.ema if self.ema is not None else [role.model for role in self.generators]

    def batch(self, step: int) -> Tuple[Batch, int]:
        """The step's prompts (with their image conditions for I2V) on this rank's device, and the
        shape of the latents to generate: only the noisy channels, which rollouts, re-noising and
        losses work on; the image condition is concatenated to them for each DiT call."""
        cfg, layout = self.cfg, parallel.layout()
        resolution = pick_resolution(cfg.data.resolutions, cfg.data.seed, step)
        shape = (cfg.data.batch_size, *self.geometry.latent_shape(*resolution.pixels))
        condition, negative = self.prompts.sample(
            cfg.data.batch_size, step_generator(cfg.data.seed, step, layout.data_parallel_rank), resolution.pixels
        )
        tokens = shape[0] * architecture_of(self.dims).dit_tokens(self.dims, shape[2:])  # after patching
        return Batch(condition.to(layout.device), negative.to(layout.device), shape), tokens

    # -------------------------------------------------------------- run

    def run(self, resume_from: Union[Path, None, Literal["find"]] = "find") -> int:
        """Train to the end of the schedule (or to SIGTERM); returns the next step to run.
        ``resume_from``: the checkpoint to continue (None: start afresh; "find": the one
        ``resume_point`` finds)."""
        start = self.resume(resume_point(self.cfg) if resume_from == "find" else resume_from)
        if self.monitor is not None:
            self.monitor.measure_teacher(self.phased.teacher)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._loop(start)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def resume(self, path: Optional[Path]) -> int:
        if path is None:
            return 0
        metadata = checkpoint.load_checkpoint(path, self.roles())
        log.info("resumed from %s (iteration %d)", path, metadata["iteration"])
        return self._next_step(metadata)

    def _next_step(self, metadata: Dict[str, Any]) -> int:
        """The step a checkpoint continues at: the one after it, or its own when it was saved
        inside an iteration (which then runs from its next sub-update)."""
        self._nonfinite = int(metadata.get(NONFINITE_STREAK, 0))
        partial = metadata.get(PARTIAL)
        if partial is None:
            return metadata["iteration"] + 1
        self._stopped_within = StoppedIteration(**partial)
        log.info("iteration %d continues after its fake update %d", metadata["iteration"], partial["fake_updates_done"])
        return metadata["iteration"]

    def _loop(self, start: int) -> int:
        # On a terminal, a bar; elsewhere the log lines of ``logging.log_every`` only.
        with Progress(len(self.schedule), self.cfg.phases.method, initial=start, log_every_s=None) as progress:
            return self._steps(start, progress)

    def _steps(self, start: int, progress: Progress) -> int:
        cfg = self.cfg
        total = len(self.schedule)
        for step in range(start, total):
            self._set_learning_rates(step, total)
            batch, tokens = self.batch(step)
            resume, self._stopped_within = self._stopped_within, None
            self.flops.take()  # what ran between iterations (samples, a resume) is not the iteration's
            logs = self.phased.iteration(self.schedule[step], batch, step, stop=self._stop_everywhere, resume=resume)
            if isinstance(logs, StoppedIteration):  # SIGTERM inside the iteration
                return self._stop_inside(step, self._with_flops(logs))
            flops = self._iteration_flops(logs)
            self._follow_generator(self.schedule[step], logs)
            finite = all(math.isfinite(v) for v in logs.values())
            self._nonfinite = 0 if finite else self._nonfinite + 1
            self._record(step, logs, tokens, flops, finite, progress)
            if self._nonfinite >= cfg.run.max_consecutive_nonfinite:
                self.save(step)
                raise NonFiniteLossError(
                    f"{self._nonfinite} non-finite steps in a row (up to iteration {step}); "
                    f"stopped with a checkpoint in {cfg.checkpoint.dir}"
                )
            stop = self._stop_everywhere()  # every step, on every rank: they must agree
            saved = (step + 1) % cfg.checkpoint.save_every == 0 or step == total - 1 or stop
            if saved:
                self.save(step)
            if (
                self.samples is not None
                and not stop
                and ((step + 1) % cfg.logging.sample_every == 0 or step == total - 1)
            ):
                self.samples.write(
                    self.sampling_generators(),
                    self.layout,
                    self.output / "samples" / checkpoint.checkpoint_name(step),
                    step,
                )
            if (
                self.monitor is not None
                and not stop
                and ((step + 1) % cfg.logging.eval_every == 0 or step == total - 1)
            ):
                self._watch(step, saved)
            if stop:
                log.warning("SIGTERM: stopped after iteration %d with a checkpoint", step)
                return step + 1
        return total

    def _follow_generator(self, phase: int, logs: Dict[str, float]) -> None:
        """After a generator update that was applied (a finite one): its EMA copy, and with IDA
        the phase's fake model, move toward it."""
        if not math.isfinite(logs["generator_grad_norm"]):
            return
        opt, generator = self.cfg.optimizer, self.generators[phase].model
        if self.ema is not None:
            update_ema(self.ema[phase], generator, opt.ema_decay)
        if opt.ida_decay is not None:
            pull_fake_toward_generator(self.fakes[phase], generator, self.layout, phase, opt.ida_decay)

    def _watch(self, step: int, saved: bool) -> None:
        """The collapse monitor's evaluation after iteration ``step``; a collapse stops the run
        (with a checkpoint, unless ``saved`` already) under ``logging.stop_on_collapse``."""
        verdict = self.monitor.check(self.sampling_generators(), self.layout, step, self._tensorboard)
        if verdict.healthy or not self.cfg.logging.stop_on_collapse:
            return
        if not saved:
            self.save(step)
        raise CollapseError(collapse_message(verdict, self.cfg.checkpoint.dir, self.monitor.last_healthy))

    def _with_flops(self, stopped: StoppedIteration) -> StoppedIteration:
        """The stopped part's FLOPs go into its logs, and with them into the checkpoint."""
        counted = self.flops.take()
        return dataclasses.replace(
            stopped, logs={**stopped.logs, "model_flops": counted.model, "hardware_flops": counted.hardware}
        )

    def _iteration_flops(self, logs: Dict[str, float]) -> Flops:
        """What the iteration ran: since it started, and before a stop inside it (its logs)."""
        counted = self.flops.take()
        earlier = Flops(logs.pop("model_flops", 0.0), logs.pop("hardware_flops", 0.0))
        return Flops(counted.model + earlier.model, counted.hardware + earlier.hardware)

    def _stop_inside(self, step: int, stopped: StoppedIteration) -> int:
        self.save(step, stopped)
        log.warning(
            "SIGTERM: stopped in iteration %d after %d of its %d fake updates, with a checkpoint",
            step,
            stopped.fake_updates_done,
            self.cfg.phases.fake_updates_per_generator_update,
        )
        return step

    def save(self, step: int, stopped: Optional[StoppedIteration] = None) -> None:
        """A checkpoint after iteration ``step``, or within it (``stopped``)."""
        metadata: Dict[str, Any] = {"phase": self.schedule[step], NONFINITE_STREAK: self._nonfinite}
        if stopped is not None:
            metadata[PARTIAL] = dataclasses.asdict(stopped)
        checkpoint.save_checkpoint(
            self.cfg.checkpoint.dir,
            step,
            self.roles(),
            metadata,
            self.cfg.checkpoint.keep_last,
            files={checkpoint.CONFIG_FILE: dump_yaml(self.cfg)},
        )

    def _set_learning_rates(self, step: int, total: int) -> None:
        """Each phase's roles start afresh, so warmup and decay run per phase: over the
        phase's own iterations. The warmup holds back the generator only, so that the fake model
        (which starts equal to the teacher, i.e. with no signal) can track the generator's
        distribution before the generator moves much."""
        opt = self.cfg.optimizer
        phase = self.schedule[step]
        phase_step = self.schedule[:step].count(phase)
        phase_total = self.schedule.count(phase)
        decay = learning_rate_factor(phase_step, phase_total, 0, opt.schedule)
        warmup = learning_rate_factor(phase_step, phase_total, opt.warmup_iterations, "constant")
        for roles, adam, factor in ((self.generators, opt.generator, decay * warmup), (self.fakes, opt.fake, decay)):
            for role in roles:
                set_learning_rate(role, adam.lr * factor)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True

    def _stop_everywhere(self) -> bool:
        """Every rank stops at the same sub-update if any rank was asked to (one small
        all-reduce; asked after every sub-update)."""
        self._stop_requested = not all_ranks_agree(not self._stop_requested)
        return self._stop_requested

    def _record(
        self, step: int, logs: Dict[str, float], tokens: int, flops: Flops, finite: bool, progress: Progress
    ) -> None:
        if not finite:
            log.warning("iteration %d: non-finite loss or gradient, update skipped (%s)", step, logs)
        if parallel.layout().rank != 0:
            return
        seconds = logs["step_seconds"]
        tflops = flops.model / seconds / 1e12
        entry = {
            "iteration": step,
            "phase": self.schedule[step],
            **logs,
            "tokens_per_second": tokens / seconds,  # DiT tokens of the generated batch, this rank's
            "model_flops": flops.model,  # this rank's, forward and backward (flops.py)
            "hardware_flops": flops.hardware,  # and the forwards activation recompute repeats
            "tflops_per_second": tflops,
            "mfu": None if self.peak_tflops is None else tflops / self.peak_tflops,
            "peak_memory_gib": peak_memory_gib(),
        }
        self.output.mkdir(parents=True, exist_ok=True)
        with open(self.output / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self._tensorboard is not None:
            for key, value in entry.items():
                if key != "iteration" and value is not None and math.isfinite(value):
                    self._tensorboard.add_scalar(f"train/{key}", value, step)
            self._tensorboard.flush()
        figures = {"phase": entry["phase"], "dmd": logs["dmd_loss"], "fake": logs["fake_loss"], "TFLOP/s": tflops}
        progress.update(1, figures)
        if step % self.cfg.logging.log_every == 0 or step == len(self.schedule) - 1:
            mfu = "" if entry["mfu"] is None else f"  MFU {100 * entry['mfu']:.1f}%"
            log.info(
                "iter %d/%d phase %d  dmd %.4g  fake %.4g  %.2fs/it  %.0f tokens/s  %.3g TFLOP/s%s  peak %.2f GiB"
                "  ETA %s",
                step + 1,
                len(self.schedule),
                self.schedule[step],
                logs["dmd_loss"],
                logs["fake_loss"],
                seconds,
                entry["tokens_per_second"],
                tflops,
                mfu,
                entry["peak_memory_gib"],
                progress.eta(),
            )


def claim_run_folders(cfg: Config) -> List[FolderLock]:
    """Before anything loads: rank 0 locks the checkpoint and output folders (a second run on them
    is refused, naming the holder), sweeps what killed saves left, and refuses a fresh start
    over another run's checkpoints (or moves them aside). Every rank learns whether it worked."""
    locks, error = [], None
    if parallel.global_rank() == 0:
        try:
            for folder in dict.fromkeys(str(Path(f).resolve()) for f in (cfg.checkpoint.dir, cfg.run.output_dir)):
                locks.append(FolderLock(folder).acquire())
            checkpoint_folder.sweep_staging(cfg.checkpoint.dir)
            for folder in (Path(cfg.run.output_dir), Path(cfg.run.output_dir) / "samples"):
                sweep_debris(folder)
            resume = cfg.checkpoint.resume
            in_dir = (
                resume not in ("auto", "none") and Path(resume).resolve().parent == Path(cfg.checkpoint.dir).resolve()
            )
            if resume != "auto" and not in_dir:  # a new run (or one continued from elsewhere) starts here
                checkpoint_folder.check_fresh_start(
                    cfg.checkpoint.dir, cfg.checkpoint.on_existing, f"checkpoint.resume={resume}"
                )
        except (ValueError, OSError) as err:
            error = err
            release_run_folders(locks)
    if not all_ranks_agree(error is None):
        if error is not None:
            raise error
        raise checkpoint_folder.CheckpointFolderError("rank 0 could not claim the run's folders (its error says why)")
    return locks


def release_run_folders(locks: List[FolderLock]) -> None:
    for lock in locks:
        lock.release()
    locks.clear()


def train(cfg: Config) -> int:
    """``phased-dmd train``: one process per GPU (torchrun), or one process on CPU."""
    layout = parallel.initialize(
        cfg.parallel.tensor_parallel,
        cfg.parallel.ulysses_parallel,
        cfg.parallel.sequence_parallel,
        cfg.run.seed,
        allow_tf32=cfg.run.tf32,
    )
    locks: List[FolderLock] = []
    try:
        inputs = open_inputs(cfg)  # read-only: a refusal leaves nothing behind
        locks = claim_run_folders(cfg)
        start_from = resume_point(cfg)  # checked against this run's config before the teacher loads
        trainer = Trainer(cfg, build_teacher(cfg), inputs.prompts, inputs.geometry, build_student(cfg))
        log.info(
            "training %s: %d phases, %d iterations, %d processes (TP %d, Ulysses %d, DP %d)",
            cfg.phases.method,
            trainer.layout.num_phases,
            len(trainer.schedule),
            layout.world_size,
            layout.tensor_parallel,
            layout.ulysses_parallel,
            layout.data_parallel,
        )
        trainer.run(start_from)
    finally:
        release_run_folders(locks)
        parallel.destroy()
    return 0
