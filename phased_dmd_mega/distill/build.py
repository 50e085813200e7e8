"""Everything a run is built from, read from its config: the teacher, the prompt source, the
latent geometry, and the roles (generators, fake score models, EMA copies, their optimizers)
made from the teacher, or from a student of another size (``model.student_path``). The trainer,
the generator loader, sampling, export and the memory estimate all build through here, so a
role is made the same way wherever it is made."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
from torch import nn

from phased_dmd_mega import parallel
from phased_dmd_mega.config import Config, ConfigError
from phased_dmd_mega.data import LatentGeometry, PromptSource, SyntheticPrompts, resolution_text
from phased_dmd_mega.distill.optim import make_role_optimizer
from phased_dmd_mega.distill.roles import Experts
from phased_dmd_mega.log import get_logger
from phased_dmd_mega.models import load_pretrained
from phased_dmd_mega.models.architectures import CheckpointError, architecture_of, registry
from phased_dmd_mega.models.checkpoints import (
    check_tensor_parallel,
    expert_boundary_ratio,
    inspect_checkpoint,
    open_model,
)
from phased_dmd_mega.models.lora import add_adapter
from phased_dmd_mega.models.options import ModelParallelOptions
from phased_dmd_mega.prompt_cache.reader import PromptCache
from phased_dmd_mega.schedule import PhaseLayout, renoise_range, renoise_range_kwargs

log = get_logger(__name__)


@dataclass
class WeightsOnly:
    """A model saved without optimizer states (the EMA copies)."""

    model: nn.Module
    optimizer: None = None


# ----------------------------------------------------------------------------- roles


def trainable_copy(model: nn.Module) -> nn.Module:
    """A trainable copy of a DiT on the model's own device (megatron layers hold process groups,
    so: build, then load). Built under that device, so that a GPU copy never passes through host
    memory; then moved there, for the tensors that layers create on a device of their own."""
    device = next(model.parameters()).device
    with torch.device(device):
        fresh = type(model)(model.dims, replace(model.par, initialize=False))
    fresh.to(device).load_state_dict(model.state_dict())
    return fresh.requires_grad_(True)


def role_model(expert: nn.Module, name: str, lora) -> nn.Module:
    """A trainable role initialised from a base expert (the teacher's or the student): a full
    copy, or, with LoRA, an adapter on the base's own (frozen, shared) weights."""
    if lora.rank > 0:
        return add_adapter(expert, name, lora.rank, lora.alpha, lora.target_modules)
    return trainable_copy(expert)


def frozen_copy(model: nn.Module, name: str, lora) -> nn.Module:
    """A frozen copy of a role's current weights (the EMA starts from the generator)."""
    if lora.rank > 0:
        copy = role_model(model.shared, name, lora)
        with torch.no_grad():
            for mine, theirs in zip(copy.parameters(), model.parameters()):
                mine.copy_(theirs)
    else:
        copy = trainable_copy(model)
    return copy.requires_grad_(False)


def phase_layout(cfg: Config) -> PhaseLayout:
    """The paper's baselines are one-phase layouts of the same steps."""
    phases = cfg.phases
    if phases.method == "phased_dmd":
        return PhaseLayout.build(
            phases.num_steps, num_phases=phases.num_phases, steps_per_phase=phases.steps_per_phase, shift=phases.shift
        )
    return PhaseLayout.build(phases.num_steps, num_phases=1, shift=phases.shift)


def teacher_expert_for_phase(bases: Experts, layout: PhaseLayout, phase: int) -> nn.Module:
    """The base expert (``role_bases``: the teacher's, or the student in its place) whose noise
    range holds the phase (its generator starts from it; a LoRA generator stays an adapter on it)."""
    if bases.low is None or layout.phase_is_high_noise(phase, bases.boundary):
        return bases.high
    return bases.low


def generator_for_phase(bases: Experts, layout: PhaseLayout, phase: int, cfg: Config) -> Experts:
    """Initialised from the base expert for the phase's noise range."""
    return Experts(role_model(teacher_expert_for_phase(bases, layout, phase), f"generator{phase}", cfg.model.lora))


def fake_experts(layout: PhaseLayout, phase: int, cfg: Config, boundary) -> Tuple[str, ...]:
    """The teacher experts ("high", and "low" when there is a boundary that the phase's
    re-noise times reach) that the phase's fake model copies."""
    if boundary is None:
        return ("high",)
    low_t, _ = renoise_range(layout, phase, **renoise_range_kwargs(cfg.phases))
    return ("high",) if low_t >= boundary else ("high", "low")


def fake_for_phase(bases: Experts, layout: PhaseLayout, phase: int, cfg: Config) -> Experts:
    """One fake model per teacher expert that the phase's re-noise times reach, each started
    from its base expert."""
    lora = cfg.model.lora
    high = role_model(bases.high, f"fake{phase}_high", lora)
    if fake_experts(layout, phase, cfg, bases.boundary) == ("high",):
        return Experts(high)
    return Experts(high, role_model(bases.low, f"fake{phase}_low", lora), bases.boundary)


def ema_of(generator: Experts, phase: int, cfg: Config) -> Experts:
    low = frozen_copy(generator.low, f"generator{phase}_ema_low", cfg.model.lora) if generator.low is not None else None
    return Experts(frozen_copy(generator.high, f"generator{phase}_ema", cfg.model.lora), low, generator.boundary)


def role_optimizer(model: nn.Module, adam, opt):
    """The role's AdamW (``adam``: its settings) with the run's clipping and optimizer kind."""
    return make_role_optimizer(
        model, adam.lr, adam.betas, adam.eps, adam.weight_decay, opt.grad_clip, opt.distributed, opt.fused
    )


# ----------------------------------------------------------------------------- the teacher


def build_model(cfg: Config, path: Optional[str], preset: Optional[str], weights: bool = True) -> Experts:
    """A frozen model of the run (the teacher, or the student) from ``path``: a Hugging Face or
    converted checkpoint (two experts for Wan2.2-A14B), or, with no path, a randomly
    initialised preset (smoke tests only). With ``preset`` set (the recipes), the checkpoint
    must be that architecture. ``weights=False``: the models' shapes only, no weights read."""
    model_cfg = cfg.model
    options = dict(
        attention_backend=model_cfg.attention_backend,
        transformer_impl=model_cfg.transformer_impl,
        fp8_recipe=model_cfg.fp8_recipe,
        recompute=model_cfg.recompute,
        recompute_num_blocks=model_cfg.recompute_num_blocks,
    )
    dtype = getattr(torch, model_cfg.dtype)
    if path is None:
        architecture = registry()[model_cfg.family]
        preset = preset or "tiny"
        log.warning("no model.teacher_path: using a randomly initialised %s preset %r", model_cfg.family, preset)
        par = ModelParallelOptions(
            sequence_parallel=cfg.parallel.sequence_parallel, dtype=dtype, initialize=weights, **options
        )
        model = Experts(architecture.model_class(architecture.presets[preset], par))
    elif inspect_checkpoint(path).has_experts:
        found = inspect_checkpoint(path)
        high, low = (
            load_pretrained(path, expect=preset, expert=e, dtype=dtype, weights=weights, **options)
            for e in ("high", "low")
        )
        model = Experts(high, low, cfg.phases.expert_boundary or expert_boundary_ratio(found, high.dims))
    else:
        model = Experts(load_pretrained(path, expect=preset, dtype=dtype, weights=weights, **options))
    if not weights:  # a shell: left on the CPU, where its untouched pages cost no memory
        return model.requires_grad_(False)
    return model.to(parallel.layout().device).requires_grad_(False)


def build_teacher(cfg: Config, weights: bool = True) -> Experts:
    """The frozen teacher (``build_model`` of ``model.teacher_path``). ``weights=False``: a
    shell (sampling and export of full fine-tunes, whose generators' weights come from the
    training checkpoint)."""
    return build_model(cfg, cfg.model.teacher_path, cfg.model.preset, weights)


def teacher_dims(cfg: Config):
    """The teacher's dims (its high-noise expert's for two experts), from its config and its
    safetensors headers: no weight is read."""
    model_cfg = cfg.model
    if model_cfg.teacher_path is None:
        return registry()[model_cfg.family].presets[model_cfg.preset or "tiny"]
    found = inspect_checkpoint(model_cfg.teacher_path, expect=model_cfg.preset)
    return model_dims(found, model_cfg.preset, "high" if found.has_experts else None)


def model_dims(found, preset: Optional[str], expert: Optional[str] = None):
    """A checkpoint's dims (``expert``'s of two), from its config and safetensors headers."""
    folder = found.model_folder(expert)
    return open_model(folder, found.layout, preset, found.architecture).dims


# ----------------------------------------------------------------------------- the student

# What the student must share with the teacher: the latents it makes and reads (channels, token
# patch), the prompt embeddings it reads (text width; Wan I2V's CLIP image width).
SHARED_WITH_TEACHER = ("in_channels", "out_channels", "patch_size", "text_dim", "image_dim")


def student_checkpoint(cfg: Config):
    """The student's checkpoint, inspected (configs only), or None without ``model.student_path``."""
    model_cfg = cfg.model
    if model_cfg.student_path is None:
        if model_cfg.student_preset is not None:
            raise ConfigError(
                f"model.student_preset is {model_cfg.student_preset!r} but model.student_path is not set: name the "
                "student's Hugging Face folder or converted checkpoint (model.student_path=PATH)"
            )
        return None
    try:
        found = inspect_checkpoint(model_cfg.student_path, expect=model_cfg.family)
    except CheckpointError as err:
        raise ConfigError(f"model.student_path ({model_cfg.student_path}): {err}") from err
    if found.has_experts:
        raise ConfigError(
            f"model.student_path ({model_cfg.student_path}) holds two experts (high and low noise): a student is one "
            "model (every expert role of a two-expert teacher starts from it)"
        )
    return found


def student_dims(cfg: Config):
    """The student's dims from its config and headers (no weight read), or None without one."""
    found = student_checkpoint(cfg)
    if found is None:
        return None
    try:
        return model_dims(found, cfg.model.student_preset)
    except CheckpointError as err:
        raise ConfigError(f"model.student_path ({cfg.model.student_path}): {err}") from err


def check_student(cfg: Config, student, teacher) -> None:
    """The student makes the teacher's latents from the teacher's prompts, and splits over this
    run's ranks."""
    path = cfg.model.student_path
    for field_name in SHARED_WITH_TEACHER:
        mine, theirs = getattr(student, field_name, None), getattr(teacher, field_name, None)
        if mine != theirs:
            raise ConfigError(
                f"model.student_path ({path}): the student's {field_name} is {mine}, the teacher's "
                f"(model.teacher_path) is {theirs}: a student must share the teacher's latent channels, patch size "
                "and text width"
            )
    try:
        check_tensor_parallel(student, cfg.parallel.tensor_parallel, cfg.parallel.ulysses_parallel)
    except CheckpointError as err:
        raise ConfigError(f"model.student_path ({path}): {err}") from err


def build_student(cfg: Config, weights: bool = True) -> Optional[Experts]:
    """The frozen student (``build_model`` of ``model.student_path``), or None without one."""
    if student_checkpoint(cfg) is None:
        return None
    return build_model(cfg, cfg.model.student_path, cfg.model.student_preset, weights)


def role_bases(teacher: Experts, student: Optional[Experts]) -> Experts:
    """What the roles start from, expert by expert: the teacher's, or the student in the place
    of each (a one-model student under a two-expert teacher: every expert role, generator or
    fake, starts from the same student weights, routed at the teacher's boundary)."""
    if student is None:
        return teacher
    if teacher.low is None:
        return student
    return Experts(student.high, student.high, teacher.boundary)


# ----------------------------------------------------------------------------- the data


def build_prompts(cfg: Config, dims) -> PromptSource:
    """The prompt source for a teacher of ``dims``; a cache is opened with every shard checked."""
    dim = dims.text_dim
    if cfg.data.prompt_cache is not None:
        cache = PromptCache(cfg.data.prompt_cache, negative_from=cfg.data.negative_prompt_cache)
        cache.check_model(cfg.model.family, dim)
        return cache
    if cfg.data.synthetic_prompts > 0:
        tokens = architecture_of(dims).synthetic_prompt_tokens
        return SyntheticPrompts(cfg.data.synthetic_prompts, tokens, dim, seed=cfg.data.seed)
    raise ValueError(
        "data.prompt_cache is not set (write one with `phased-dmd encode-prompts`), and data.synthetic_prompts is 0"
    )


def latent_geometry(dims, prompts: Optional[PromptSource] = None) -> LatentGeometry:
    """The latents the generator makes for a teacher of ``dims``. A teacher with more input than
    output channels (Wan2.2 I2V: 16 noisy + 4 mask + 16 first-frame latents) takes its extra
    channels from the prompt source's image condition, which must then provide exactly those."""
    in_channels = getattr(dims, "in_channels", 16)
    out_channels = getattr(dims, "out_channels", in_channels)
    conditions = getattr(prompts, "image_conditions", None)
    image = None if conditions is None else conditions.first  # every resolution's channels are the same
    extra = in_channels - out_channels
    if image is None:
        if extra:
            raise ValueError(
                f"the teacher takes {in_channels} input channels for {out_channels} output channels: its {extra} "
                "extra channels are an image condition (Wan2.2 I2V: 4 mask + 16 first-frame latent channels), and "
                "the prompt source has none; encode the prompts with their first frames (`phased-dmd encode-prompts "
                "--vae VAE --resolution FxHxW` on rows with an image) and set data.prompt_cache to that cache"
            )
        return architecture_of(dims).latent_geometry(dims)
    if extra != image.channels or image.latent_shape[0] != out_channels:
        needs = (
            f"it needs {extra} extra channels ({extra - out_channels} mask + {out_channels} latent)"
            if extra
            else "it takes no extra channels (a text-to-video teacher, or Wan2.2-TI2V-5B, whose image replaces the "
            "first latent frame: encode its first frames with its own 48-channel Wan2.2 VAE)"
        )
        raise ValueError(
            f"the prompt cache's image condition has {image.channels} channels ({image.mask_channels} mask + "
            f"{image.latent_shape[0]} latent); the teacher takes {in_channels} input channels for {out_channels} "
            f"output channels: {needs}"
        )
    return image.geometry


def check_resolutions(cfg: Config, dims, geometry: LatentGeometry) -> None:
    """Every resolution of the mixture makes latents of whole tokens (``latent_geometry``'s VAE
    compression, the teacher's token patch and frame limit)."""
    max_frames = architecture_of(dims).max_frames
    for i, resolution in enumerate(cfg.data.resolutions):
        problem = geometry.unfit(resolution.pixels, dims.token_patch, max_frames)
        if problem is not None:
            raise ConfigError(f"data.resolutions[{i}] ({resolution_text(resolution.pixels)}): {problem}")


# ----------------------------------------------------------------------------- a run's inputs, checked first


@dataclass
class RunInputs:
    """What a run reads besides weights."""

    prompts: PromptSource
    geometry: LatentGeometry


def open_inputs(cfg: Config) -> RunInputs:
    """Everything but the weights, opened and checked before any model loads (bad input is
    refused in seconds, not after minutes of loading 14B weights at every requeue): the
    teacher's config and headers, the layout against its heads, the prompt source with every
    shard against its index, the latent geometry, every resolution of the mixture; the
    student's config and headers against the teacher's and the layout."""
    dims = teacher_dims(cfg)
    check_tensor_parallel(dims, cfg.parallel.tensor_parallel, cfg.parallel.ulysses_parallel)
    student = student_dims(cfg)
    if student is not None:
        check_student(cfg, student, dims)
    prompts = build_prompts(cfg, dims)
    geometry = latent_geometry(dims, prompts)
    check_resolutions(cfg, dims, geometry)
    if prompts.image_conditions is not None:
        prompts.image_conditions.check_resolutions(cfg.data.resolutions)
    return RunInputs(prompts, geometry)
