"""Typed run configuration: dataclasses per section, loaded from YAML with dotted overrides.

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["optimizer.generator.lr=1e-6"])

Unknown keys, wrong types and impossible values raise ``ConfigError`` naming the key and where
it came from (the YAML file or the command-line override) before anything heavy starts. Keys
renamed since (``DEPRECATED_KEYS``) still load under their old names, with a warning.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml

from phased_dmd_mega.log import get_logger

log = get_logger(__name__)


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible."""


# ----------------------------------------------------------------------------- sections

MAX_SEED = 2**62 - 1  # keyed draws mix a seed with counters below torch's 64-bit seed range


def check_seed(check, seed: int) -> None:
    check(0 <= seed <= MAX_SEED, "seed", f"must be in [0, 2**62 - 1], got {seed}")


@dataclass
class LoraConfig:
    """LoRA adapters on the frozen teacher's (or student's) weights; rank 0 trains full weights."""

    rank: int = 0
    alpha: float = 0.0  # 0 means alpha = rank (scale 1)
    target_modules: List[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_q", "linear_kv", "linear_proj", "linear_fc1", "linear_fc2"]
    )

    def validate(self, check):
        check(self.rank >= 0, "rank", "must be >= 0")
        check(self.alpha >= 0, "alpha", "must be >= 0")
        check(not self.rank or self.target_modules, "target_modules", "must not be empty when rank > 0")


@dataclass
class ModelConfig:
    family: Literal["wan", "qwen_image"] = "wan"  # the model family (an architecture's name)
    preset: Optional[str] = None  # a named architecture, e.g. "wan2.2-t2v-a14b" or "tiny"
    teacher_path: Optional[str] = None  # Hugging Face folder (diffusers or original layout)
    # Another model of the family and latent space (e.g. Wan2.1-T2V-1.3B under a 14B teacher):
    # the generators, fake models and EMA copies start from it (LoRA: adapters on it); the
    # teacher stays teacher_path. A folder as teacher_path takes; one model, not two experts.
    student_path: Optional[str] = None
    student_preset: Optional[str] = None  # the student is checked against it; the memory estimate uses it
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attention_backend: Literal["auto", "flash", "te", "sdpa"] = "auto"
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    fp8_recipe: Optional[Literal["delayed", "current", "mxfp8"]] = None  # needs transformer_engine
    recompute: Literal["none", "full", "blocks"] = "none"
    recompute_num_blocks: int = 0  # with recompute=blocks: the first N blocks are recomputed
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, check):
        check(
            self.fp8_recipe is None or self.transformer_impl == "transformer_engine",
            "fp8_recipe",
            "needs model.transformer_impl=transformer_engine",
        )
        check(
            not (self.attention_backend == "flash" and self.dtype == "float32"),
            "attention_backend",
            "flash needs model.dtype bfloat16 or float16 (flash-attn refuses float32); use sdpa or auto",
        )
        check(self.recompute_num_blocks >= 0, "recompute_num_blocks", "must be >= 0")
        check(
            self.recompute != "blocks" or self.recompute_num_blocks > 0,
            "recompute_num_blocks",
            "must be > 0 when recompute=blocks",
        )


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    ulysses_parallel: int = 1
    sequence_parallel: bool = False  # Megatron sequence parallelism inside the TP group

    def validate(self, check):
        check(self.tensor_parallel >= 1, "tensor_parallel", "must be >= 1")
        check(self.ulysses_parallel >= 1, "ulysses_parallel", "must be >= 1")


@dataclass
class PhasesConfig:
    """Phased DMD (arXiv 2510.27684): the phases, the re-noising, the fake-model loss (its Eq. 13), the
    generator update (its Eq. 11) and the two time scales."""

    method: Literal["phased_dmd", "dmd_sgts", "dmd_naive"] = "phased_dmd"
    num_steps: int = 4
    num_phases: int = 2
    steps_per_phase: Optional[List[int]] = None  # explicit split; default num_steps / num_phases each
    shift: float = 5.0
    renoise_interval: Literal["reverse_nested", "disjoint"] = "reverse_nested"
    # Shift of the re-noising time distribution T(t; s, 1); None: `shift` (the paper). A tiny
    # latent (the CPU demo) is matched at low noise far more often with a smaller one.
    renoise_shift: Optional[float] = None
    t_min: float = 0.02  # re-noise times stay inside [t_min, t_max] (the released code's bounds)
    t_max: float = 0.98
    margin: float = 0.0  # re-noise t stays at least this far above the phase's level s
    expert_boundary: Optional[float] = None  # Wan2.2 A14B: 0.875 (T2V) or 0.9 (I2V)
    phase_order: Literal["sequential", "alternating"] = "sequential"
    iterations_per_phase: int = 1000  # with phase_order=sequential
    # Each phase's own count instead (e.g. more for the low-noise phase, which learns slower).
    iterations_by_phase: Optional[List[int]] = None
    step_rule: Literal["euler", "stochastic"] = "euler"
    dmd_form: Literal["subinterval", "x0"] = "subinterval"
    fake_updates_per_generator_update: int = 5
    # The fake updates' generator rollouts of one iteration as one batch per SGTS exit step: same
    # anchors, fewer DiT calls; costs rollout activation memory (off for the large recipes).
    batch_fake_rollouts: bool = False
    guidance_scale: float = 4.0
    guidance_scale_low_noise: Optional[float] = None  # Wan2.2: the low-noise expert's own scale
    # After the guidance, the official recipes' cfg_norm (distill/roles.py normalize_guidance):
    # "layer_norm" rescales each row along the last axis to the conditional velocity's norm,
    # "scalar" scales the whole velocity down to it; "none" (here and in the official Phased DMD
    # configs) leaves it.
    cfg_norm: Literal["none", "layer_norm", "scalar"] = "none"
    weight_clamp: Optional[float] = None  # w_max of the subinterval loss; None means no clamp
    norm_min: float = 1e-4

    def validate(self, check):
        check(self.num_steps >= 1, "num_steps", "must be >= 1")
        check(self.num_phases >= 1, "num_phases", "must be >= 1")
        if self.steps_per_phase is not None:
            check(
                len(self.steps_per_phase) == self.num_phases,
                "steps_per_phase",
                f"has {len(self.steps_per_phase)} entries but num_phases is {self.num_phases}",
            )
            check(all(n >= 1 for n in self.steps_per_phase), "steps_per_phase", "entries must be >= 1")
            check(
                sum(self.steps_per_phase) == self.num_steps,
                "steps_per_phase",
                f"sums to {sum(self.steps_per_phase)} but num_steps is {self.num_steps}",
            )
        else:
            check(
                self.num_steps % self.num_phases == 0,
                "num_phases",
                f"{self.num_phases} does not divide num_steps {self.num_steps}; give steps_per_phase",
            )
        check(self.shift > 0, "shift", "must be > 0")
        check(0.0 <= self.t_min < self.t_max <= 1.0, "t_min", "needs 0 <= t_min < t_max <= 1")
        check(0.0 <= self.margin < 1.0, "margin", "must be in [0, 1)")
        check(
            self.expert_boundary is None or 0.0 < self.expert_boundary < 1.0,
            "expert_boundary",
            "must be in (0, 1)",
        )
        check(self.iterations_per_phase >= 1, "iterations_per_phase", "must be >= 1")
        if self.iterations_by_phase is not None:
            check(
                len(self.iterations_by_phase) == self.num_phases,
                "iterations_by_phase",
                f"has {len(self.iterations_by_phase)} entries but num_phases is {self.num_phases}",
            )
            check(all(n >= 1 for n in self.iterations_by_phase), "iterations_by_phase", "every entry must be >= 1")
        check(self.fake_updates_per_generator_update >= 1, "fake_updates_per_generator_update", "must be >= 1")
        check(self.guidance_scale >= 0, "guidance_scale", "must be >= 0")
        check(self.weight_clamp is None or self.weight_clamp > 0, "weight_clamp", "must be > 0")
        check(self.renoise_shift is None or self.renoise_shift > 0, "renoise_shift", "must be > 0")
        check(self.norm_min > 0, "norm_min", "must be > 0")


@dataclass
class AdamWConfig:
    lr: float = 2e-6
    betas: List[float] = field(default_factory=lambda: [0.0, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01

    def validate(self, check):
        check(self.lr > 0, "lr", "must be > 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two values in [0, 1)")
        check(self.eps > 0, "eps", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")


@dataclass
class OptimizerConfig:
    generator: AdamWConfig = field(default_factory=AdamWConfig)
    fake: AdamWConfig = field(default_factory=lambda: AdamWConfig(lr=4e-7))
    grad_clip: Optional[float] = 1.0
    # Per phase (each phase's roles start afresh): the generator's learning rate ramps up over the
    # phase's first warmup_iterations (the fake model starts at its full rate), and the schedule
    # decays both over the phase's iterations.
    warmup_iterations: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    ema_decay: Optional[float] = None  # generator EMA; None disables it
    # Implicit distribution alignment (SenseFlow's IDA, distill/alignment.py): after each generator
    # update, the phase's fake model moves to decay * fake + (1 - decay) * generator. None: off;
    # the official recipes use 0.97.
    ida_decay: Optional[float] = None
    # megatron-core's distributed optimizer: AdamW states (and fp32 main weights of bf16/fp16
    # models) split over the data-parallel ranks, gradients reduce-scattered in fp32. false: torch
    # AdamW on every rank, with whole states in the weights' dtype. Checkpoints load either way.
    distributed: bool = True
    # torch's fused AdamW kernel (one pass over each tensor's states; measured 3.4x faster than
    # the for-loop AdamW on a 2-core CPU, BENCHMARKS.md); false: the for-loop one, same updates.
    fused: bool = True

    def validate(self, check):
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0")
        check(self.warmup_iterations >= 0, "warmup_iterations", "must be >= 0")
        check(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)")
        check(self.ida_decay is None or 0 < self.ida_decay <= 1, "ida_decay", "must be in (0, 1]")


@dataclass
class ResolutionConfig:
    frames: int = 81
    height: int = 480
    width: int = 832
    probability: float = 1.0

    @property
    def pixels(self) -> Tuple[int, int, int]:
        """(frames, height, width): the shape the latent geometry and the prompt source take."""
        return self.frames, self.height, self.width

    def validate(self, check):
        check(self.frames >= 1, "frames", "must be >= 1")
        check(self.height >= 1 and self.width >= 1, "height", "height and width must be >= 1")
        check(self.probability > 0, "probability", "must be > 0")


@dataclass
class DataConfig:
    prompt_cache: Optional[str] = None  # folder written by `phased-dmd encode-prompts`
    negative_prompt_cache: Optional[str] = None  # another cache whose negative prompt replaces prompt_cache's
    synthetic_prompts: int = 0  # > 0: random prompt embeddings instead of a cache (smoke tests)
    batch_size: int = 1  # per data-parallel rank
    # Gradient accumulation: every update runs its batch in micro-batches of this many samples
    # (it must divide batch_size) and steps once; the same update with a micro-batch's
    # activation memory. None: the whole batch at once.
    micro_batch_size: Optional[int] = None
    resolutions: List[ResolutionConfig] = field(default_factory=lambda: [ResolutionConfig()])
    seed: int = 0

    def validate(self, check):
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        if self.micro_batch_size is not None:
            check(
                1 <= self.micro_batch_size <= self.batch_size and self.batch_size % self.micro_batch_size == 0,
                "micro_batch_size",
                f"must divide batch_size {self.batch_size}, got {self.micro_batch_size}",
            )
        check(self.synthetic_prompts >= 0, "synthetic_prompts", "must be >= 0")
        check(len(self.resolutions) >= 1, "resolutions", "needs at least one entry")
        total = sum(r.probability for r in self.resolutions)
        check(abs(total - 1.0) < 1e-6, "resolutions", f"probabilities sum to {total:g}, not 1")
        check_seed(check, self.seed)


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    save_every: int = 500
    keep_last: int = 3
    resume: str = "auto"  # auto (from `latest` if present) | none | a checkpoint path
    # A run that does not resume, in a dir that holds checkpoints: refuse (the default), or move
    # them (and `latest`) into dir/superseded-<time>/ first.
    on_existing: Literal["refuse", "move_aside"] = "refuse"
    # Resume although model.teacher_path (or model.student_path) differs from the checkpoint's
    # (the folder moved).
    allow_teacher_path_change: bool = False

    def validate(self, check):
        check(self.save_every >= 1, "save_every", "must be >= 1")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")


@dataclass
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    all_ranks: bool = False  # by default only rank 0 prints
    log_every: int = 10
    tensorboard_dir: Optional[str] = None
    sample_every: int = 0  # > 0: write samples to run.output_dir/samples/iter_N every this many iterations
    sample_count: int = 4  # prompts sampled each time (the first ones of the prompt source)
    sample_vae: Optional[str] = None  # diffusers VAE folder (or pipeline root): also decode the samples
    # The per-GPU peak that MFU is measured against, TFLOP/s. None: the dense peak of the
    # detected GPU for the run's matmul precision (flops.PEAK_TFLOPS); on CPU no MFU is logged.
    peak_tflops: Optional[float] = None
    # The collapse monitor (distill/monitor.py): every eval_every iterations (0: off) the
    # generators sample eval_prompts x eval_seeds fixed prompts and noise; their diversity and
    # motion figures are compared with the teacher's (eval_teacher_steps guided steps, measured
    # once). A figure below collapse_fraction of the teacher's, or saturated samples, is
    # reported; stop_on_collapse also stops the run with a checkpoint.
    eval_every: int = 0
    eval_prompts: int = 2
    eval_seeds: int = 4
    eval_teacher_steps: int = 40
    eval_dino: Optional[str] = None  # a transformers DINOv2/DINOv3 folder: the DINO cosine too (needs sample_vae)
    collapse_fraction: float = 0.5
    saturation_limit: float = 0.25  # share of clipped decoded pixel values (needs sample_vae)
    stop_on_collapse: bool = False

    def validate(self, check):
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.eval_every >= 0, "eval_every", "must be >= 0 (0 turns the collapse monitor off)")
        check(self.eval_prompts >= 1, "eval_prompts", "must be >= 1")
        check(self.eval_seeds >= 2, "eval_seeds", "must be >= 2 (diversity is measured across seeds)")
        check(self.eval_teacher_steps >= 1, "eval_teacher_steps", "must be >= 1")
        check(0 < self.collapse_fraction < 1, "collapse_fraction", "must be in (0, 1)")
        check(0 < self.saturation_limit <= 1, "saturation_limit", "must be in (0, 1]")
        check(
            self.eval_dino is None or self.sample_vae is not None,
            "eval_dino",
            "needs logging.sample_vae (DINO reads decoded frames)",
        )
        check(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "must be > 0")
        check(self.sample_every >= 0, "sample_every", "must be >= 0 (0 turns samples off)")
        check(self.sample_count >= 1, "sample_count", "must be >= 1")


@dataclass
class RunConfig:
    name: str = "default"
    output_dir: str = "runs/default"
    seed: int = 0
    max_consecutive_nonfinite: int = 5  # NaN/Inf losses in a row before the run stops
    # TF32 tensor cores for float32 matmuls and cuDNN convolutions on CUDA (8x or so the strict
    # float32 rate on A100/H100; bf16 runs hardly have float32 matmuls). false: strict IEEE float32.
    # No effect on CPU.
    tf32: bool = True

    def validate(self, check):
        check(self.max_consecutive_nonfinite >= 1, "max_consecutive_nonfinite", "must be >= 1")
        check_seed(check, self.seed)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------- loading

# Old name -> new name. YAML files (a user's, or an old run folder's config.yaml) and key=value
# overrides may still give the old one: it is read as the new one, with a warning.
DEPRECATED_KEYS = {"model.arch": "model.family"}


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML; None means all defaults), apply ``key.sub=value`` overrides, and
    return a validated ``Config``."""
    data: Dict[str, Any] = {}
    origins: Dict[str, str] = {}
    default_origin = "the defaults"
    if path is not None:
        default_origin = f"the defaults, as file {path} leaves it"
        data = _read_yaml(Path(path))
        _rename_deprecated(data, "", f"file {path}")
        _record_origins(data, "", f"file {path}", origins)
    for override in overrides:
        _apply_override(data, override, origins)
    return config_from_dict(data, origins=origins, default_origin=default_origin)


def config_from_dict(
    data: Dict[str, Any], origins: Optional[Dict[str, str]] = None, default_origin: str = "<dict>"
) -> Config:
    builder = _Builder(origins or {}, default_origin)
    cfg = builder.build(Config, data, "")
    builder.validate(cfg, "")
    return cfg


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    return data


def _record_origins(data: Dict[str, Any], prefix: str, origin: str, origins: Dict[str, str]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        origins[dotted] = origin
        if isinstance(value, dict):
            _record_origins(value, f"{dotted}.", origin, origins)


def _apply_override(data: Dict[str, Any], override: str, origins: Dict[str, str]) -> None:
    origin = f"command-line override '{override}'"
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{origin}: expected key.sub=value")
    value = yaml.safe_load(raw) if raw.strip() else None
    if key in DEPRECATED_KEYS:
        _warn_deprecated(key, origin)
        key = DEPRECATED_KEYS[key]
    if isinstance(value, dict):
        _rename_deprecated(value, f"{key}.", origin)
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[: depth + 1])
        if part not in node:  # a section this override brings in: errors about it name the override
            node[part] = {}
            origins[prefix] = origin
        if not isinstance(node[part], dict):
            raise ConfigError(f"{origin}: {prefix} is a value, not a section")
        node = node[part]
    node[parts[-1]] = value
    origins[key] = origin
    if isinstance(value, dict):
        _record_origins(value, f"{key}.", origin, origins)


def _rename_deprecated(section: Dict[str, Any], prefix: str, origin: str) -> None:
    """Give the deprecated keys inside ``section`` (the config at ``prefix``, read from
    ``origin``) their new names."""
    for old, new in DEPRECATED_KEYS.items():
        if not old.startswith(prefix):
            continue
        *path, name = old[len(prefix) :].split(".")
        node: Any = section
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            continue
        new_name = new.rpartition(".")[2]
        if new_name in node:
            raise ConfigError(f"{old}: the deprecated name of {new}, given beside it (from {origin}); keep only {new}")
        _warn_deprecated(old, origin)
        node[new_name] = node.pop(name)


def _warn_deprecated(old: str, origin: str) -> None:
    log.warning("%s (from %s) is deprecated: it is read as %s; rename it", old, origin, DEPRECATED_KEYS[old])


class _Builder:
    """Turns nested dicts into the dataclasses, checking every key and type."""

    def __init__(self, origins: Dict[str, str], default_origin: str):
        self.origins = origins
        self.default_origin = default_origin

    def origin_of(self, key: str) -> str:
        # Keys inside list items were written with their list ("a.b[0].c" -> "a.b[0]" -> "a.b").
        while key not in self.origins and "[" in key:
            key = key[: max(key.rfind("."), key.rfind("["))]
        return self.origins.get(key, self.default_origin)

    def fail(self, key: str, message: str) -> None:
        raise ConfigError(f"{key}: {message} (from {self.origin_of(key)})")

    def build(self, cls: type, data: Any, prefix: str) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail(prefix.rstrip(".") or "<top>", f"expected a section (mapping), got {data!r}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                self.fail(f"{prefix}{key}", f"unknown key; {cls.__name__} has {', '.join(sorted(known))}")
        values = {name: self.convert(hints[name], data[name], f"{prefix}{name}") for name in known if name in data}
        return cls(**values)

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1:
                return self.convert(inner[0], value, key)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, f"{key}.")
        if origin is Literal:
            if value not in args:
                self.fail(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
            return value
        if origin in (list, List):
            if not isinstance(value, list):
                self.fail(key, f"expected a list, got {value!r}")
            return [self.convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
        return self.scalar(tp, value, key)

    def scalar(self, tp: Any, value: Any, key: str) -> Any:
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(key, f"expected true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(key, f"expected an integer, got {value!r}")
            return value
        if tp is float:
            # YAML 1.1 reads "1e-6" (no dot) as a string; accept any number a user would write.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(key, f"expected a number, got {value!r}")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                self.fail(key, f"expected a string, got {value!r}")
            return value
        raise TypeError(f"config field {key} has unsupported type {tp}")

    def validate(self, obj: Any, prefix: str) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                self.fail(f"{prefix}{name}", message)

        if hasattr(obj, "validate"):
            obj.validate(check)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                self.validate(value, f"{prefix}{f.name}.")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if dataclasses.is_dataclass(item):
                        self.validate(item, f"{prefix}{f.name}[{i}].")
