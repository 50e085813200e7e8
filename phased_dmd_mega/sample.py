"""Few-step sampling with the distilled experts: ``phased-dmd sample`` and the trainer's periodic samples.

Every step runs the generator of the phase that owns it (``distill.phased.sample``), without
classifier-free guidance: the guidance was distilled into the generators. Sample ``i`` starts
from noise drawn with seed ``seed + i``, so a sample does not depend on how many others are
drawn or how they are batched (``step_rule: stochastic`` draws its re-noising per batch).

What is written to a folder: ``latents.safetensors`` (``latents`` [N, C, F, H, W] in float32,
``prompt_index`` and ``seed`` [N]), ``samples.json`` (what produced them), and, with a VAE
(diffusers' ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage``), the decoded samples: latents
are denormalised with the VAE config's ``latents_mean`` / ``latents_std`` exactly as the
diffusers pipelines do, decoded, and written as ``sample_<i>.png`` (one frame) or
``sample_<i>/frame_<j>.png`` plus ``sample_<i>.mp4`` when imageio with an ffmpeg plugin is
installed (otherwise the frames only, and the log says so).

Under tensor or Ulysses parallelism every rank of the model-parallel group runs the generators
(they return full outputs on every rank); rank 0 alone decodes and writes.

``teacher_sampling`` makes the run's teacher a sampler of the same kind (many steps, guided), so
that its reference samples come from the same prompts, noise and folder code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from phased_dmd_mega import parallel
from phased_dmd_mega import vae as vae_latents
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.data import PromptSource
from phased_dmd_mega.distill.build import build_prompts, latent_geometry
from phased_dmd_mega.distill.generators import open_generators
from phased_dmd_mega.distill.phased import sample as few_step_sample
from phased_dmd_mega.distill.roles import Experts
from phased_dmd_mega.errors import RequestError
from phased_dmd_mega.export import open_export
from phased_dmd_mega.files import check_destination, staging_folder, write_json
from phased_dmd_mega.log import get_logger
from phased_dmd_mega.models.architectures import CheckpointError, architecture_of, registry
from phased_dmd_mega.progress import Progress
from phased_dmd_mega.schedule import PhaseLayout
from phased_dmd_mega.vae import find_vae_folder

log = get_logger(__name__)

LATENTS_FILE = "latents.safetensors"
SAMPLES_FILE = "samples.json"


# ----------------------------------------------------------------------------- latents


def sample_noise(latent_shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """[N, *latent_shape] standard normal noise, sample i drawn with its own ``seeds[i]``."""
    return torch.stack(
        [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


@torch.no_grad()
def generate(
    generators: List[Experts],
    layout: PhaseLayout,
    condition: Condition,
    noise: torch.Tensor,
    step_rule: str = "euler",
    batch_size: Optional[int] = None,
    seeds: Optional[Sequence[int]] = None,
    negative: Optional[Condition] = None,
) -> torch.Tensor:
    """Run the few-step MoE sampler over ``noise`` [N, ...] and ``condition`` (batched like it)
    in batches; returns the latents in float32 on the CPU. ``seeds`` (per sample): a stochastic
    step rule's draws for a batch come from its first sample's seed. ``negative`` (batched like
    ``condition``): the generators are guided teachers, called with the batch's negative prompts."""
    device = parallel.device(noise.device)
    batch_size = batch_size or noise.shape[0]
    out = []
    with Progress(noise.shape[0], "sampling", "sample", log_every_s=None) as progress:
        for start in range(0, noise.shape[0], batch_size):
            index = torch.arange(start, min(start + batch_size, noise.shape[0]))
            stochastic = None
            if step_rule == "stochastic":
                seed = int(seeds[start]) if seeds is not None else start
                stochastic = torch.Generator(device=device).manual_seed(seed)
            velocities = generators
            if negative is not None:
                velocities = [partial(g, negative=negative.select(index).to(device)) for g in generators]
            latents = few_step_sample(
                velocities, layout, noise[index].to(device), condition.select(index).to(device), step_rule, stochastic
            )
            out.append(latents.float().cpu())
            progress.update(len(index))
            if not progress.drawing:  # the bar shows the count
                log.info("sampled %d/%d", int(index[-1]) + 1, noise.shape[0])
    return torch.cat(out)


# ----------------------------------------------------------------------------- VAE


def load_vae(path, family: str, dtype: torch.dtype = torch.float32, device=None):
    """diffusers' VAE of the family, from a VAE folder or a pipeline root with ``vae/``."""
    try:
        import diffusers
    except ImportError as err:
        raise RuntimeError("decoding samples needs diffusers' VAEs: pip install 'phased-dmd-mega[sample]'") from err
    known = registry()
    if family not in known:
        raise RequestError(f"no VAE is known for family {family!r} (known: {', '.join(known)})")
    cls = getattr(diffusers, known[family].vae_class)
    vae = cls.from_pretrained(vae_folder(path), torch_dtype=dtype)
    return vae.to(device or "cpu").eval()


def vae_folder(path) -> Path:
    """The VAE's folder: ``path`` itself, or its ``vae/`` (a pipeline root)."""
    folder = find_vae_folder(path)
    if folder is not None:
        return folder
    raise FileNotFoundError(f"{path} is neither a VAE folder (config.json) nor a pipeline root with vae/")


def denormalize(vae, latents: torch.Tensor) -> torch.Tensor:
    """The latents as the VAE decodes them (in the VAE's dtype, on its device)."""
    config = vae.config
    if latents.shape[1] != config.z_dim:
        raise RequestError(f"the latents have {latents.shape[1]} channels, the VAE decodes {config.z_dim} (z_dim)")
    return vae_latents.denormalize(config, latents.to(vae.device, vae.dtype))


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, C, F, H, W] -> uint8 frames [N, F', H', W', 3] (diffusers' postprocessing:
    x / 2 + 1/2 clamped to [0, 1], times 255, rounded). One sample at a time: the VAE's memory
    grows with the frames."""
    frames = []
    for one in latents.split(1):
        video = vae.decode(denormalize(vae, one), return_dict=False)[0]
        pixels = (video.float() * 0.5 + 0.5).clamp(0, 1)
        frames.append((pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu())
    return torch.cat(frames)


# ----------------------------------------------------------------------------- files


def write_latents(folder: Path, latents: torch.Tensor, prompt_index: Sequence[int], seeds: Sequence[int]) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / LATENTS_FILE
    save_file(
        {
            "latents": latents.float().contiguous(),
            "prompt_index": torch.tensor(list(prompt_index), dtype=torch.int64),
            "seed": torch.tensor(list(seeds), dtype=torch.int64),
        },
        str(path),
        metadata={"format": "pt"},
    )
    return path


def write_frames(folder: Path, frames: torch.Tensor, fps: int = 16) -> List[Dict[str, Any]]:
    """PNG files (and an mp4 per video when imageio can write one); returns what was written
    per sample."""
    from PIL import Image

    folder = Path(folder)
    writer = _video_writer()
    if writer is None and frames.shape[1] > 1:
        log.info(
            "mp4 files not written: install imageio with an ffmpeg plugin (pip install 'imageio[ffmpeg]'); "
            "the frames are written as PNG"
        )
    written = []
    for i, sample_frames in enumerate(frames.numpy()):
        if len(sample_frames) == 1:
            name = f"sample_{i:04d}.png"
            Image.fromarray(sample_frames[0]).save(folder / name)
            written.append({"image": name})
            continue
        sub = folder / f"sample_{i:04d}"
        sub.mkdir(exist_ok=True)
        for j, frame in enumerate(sample_frames):
            Image.fromarray(frame).save(sub / f"frame_{j:04d}.png")
        entry = {"frames": sub.name, "num_frames": len(sample_frames)}
        if writer is not None:
            writer(folder / f"{sub.name}.mp4", sample_frames, fps)
            entry["video"] = f"{sub.name}.mp4"
        written.append(entry)
    return written


def _video_writer():
    """imageio's mp4 writer, or None when imageio or its ffmpeg plugin is missing."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the plugin imageio needs for mp4)
    except ImportError:
        return None

    def write(path, frames, fps):
        imageio.mimwrite(str(path), list(frames), fps=fps)

    return write


def write_samples(
    generators: List[Experts],
    layout: PhaseLayout,
    condition: Condition,
    noise: torch.Tensor,
    folder,
    vae=None,
    step_rule: str = "euler",
    prompt_index: Optional[Sequence[int]] = None,
    seeds: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    info: Optional[Dict[str, Any]] = None,
    fps: int = 16,
) -> torch.Tensor:
    """Sample with the generators (every model-parallel rank takes part) and write the latents,
    and the decoded frames when a VAE is given, into ``folder`` (rank 0). Returns the latents."""
    latents = generate(generators, layout, condition, noise, step_rule, batch_size, seeds)
    if parallel.global_rank() == 0:
        record_samples(folder, latents, layout, step_rule, prompt_index, seeds, vae, info, fps)
        log.info("wrote %d samples to %s", latents.shape[0], folder)
    return latents


def record_samples(
    folder,
    latents: torch.Tensor,
    layout: PhaseLayout,
    step_rule: str,
    prompt_index: Optional[Sequence[int]] = None,
    seeds: Optional[Sequence[int]] = None,
    vae=None,
    info: Optional[Dict[str, Any]] = None,
    fps: int = 16,
) -> None:
    """Write sampled latents (and, with a VAE, their frames) and ``samples.json`` into ``folder``."""
    count = latents.shape[0]
    seeds = list(seeds) if seeds is not None else [-1] * count  # -1: noise not drawn from a recorded seed
    prompt_index = list(prompt_index) if prompt_index is not None else list(range(count))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_latents(folder, latents, prompt_index, seeds)
    decoded = write_frames(folder, decode(vae, latents), fps) if vae is not None else [{} for _ in range(count)]
    record = {
        **(info or {}),
        "num_steps": layout.num_steps,
        "steps_per_phase": list(layout.steps_per_phase),
        "shift": layout.shift,
        "timesteps": [1000.0 * t for t in layout.times[:-1]],
        "step_rule": step_rule,
        "latent_shape": list(latents.shape[1:]),
        "samples": [
            {"index": i, "prompt_index": p, "seed": s, **d}
            for i, (p, s, d) in enumerate(zip(prompt_index, seeds, decoded))
        ],
    }
    write_json(folder / SAMPLES_FILE, record)


# ----------------------------------------------------------------------------- during training


@dataclass
class PeriodicSamples:
    """The trainer's samples (``logging.sample_every``): the same prompts and noise every time,
    so that successive iterations compare; decoded when ``logging.sample_vae`` is set."""

    condition: Condition
    noise: torch.Tensor
    prompt_index: List[int]
    seeds: List[int]
    step_rule: str
    vae_path: Optional[str]
    dims: Any
    _vae: Any = None

    @classmethod
    def for_run(cls, cfg, prompts, geometry, dims) -> "PeriodicSamples":
        resolution = cfg.data.resolutions[0].pixels
        prompt_index = [i % len(prompts) for i in range(cfg.logging.sample_count)]
        seeds = [cfg.run.seed + i for i in range(cfg.logging.sample_count)]
        return cls(
            prompts.rows(prompt_index, resolution),
            sample_noise(geometry.latent_shape(*resolution), seeds),
            prompt_index,
            seeds,
            cfg.phases.step_rule,
            cfg.logging.sample_vae,
            dims,
        )

    def write(self, generators: List[Experts], layout: PhaseLayout, folder, iteration: int) -> torch.Tensor:
        if self.vae_path is not None and self._vae is None and parallel.layout().rank == 0:
            self._vae = load_vae(self.vae_path, family_of(self.dims), device=parallel.layout().device)
        return write_samples(
            generators,
            layout,
            self.condition,
            self.noise,
            folder,
            self._vae,
            self.step_rule,
            self.prompt_index,
            self.seeds,
            info={"iteration": iteration},
        )


# ----------------------------------------------------------------------------- phased-dmd sample


@dataclass
class Samplers:
    """What sampling needs from a training checkpoint or an export (or, ``teacher_sampling``,
    the teacher of a checkpoint's run)."""

    generators: List[Any]  # velocity models (x_t, t, condition): one per phase
    layout: PhaseLayout
    step_rule: str
    default_prompts: Optional[PromptSource]  # the run's own prompts (checkpoints)
    default_resolution: Optional[Tuple[int, int, int]]  # the run's first resolution (checkpoints)
    source: Dict[str, Any]  # recorded in samples.json
    dims: Any  # the models' (a two-expert model's high-noise expert's)
    guided: bool = False  # the generators are GuidedTeachers, which also take the negative prompts

    @classmethod
    def from_checkpoint(cls, path, ema: bool = False, overrides: Sequence[str] = ()) -> "Samplers":
        opened = open_generators(path, ema=ema, overrides=overrides)
        cfg = opened.config
        return cls(
            opened.generators,
            opened.layout,
            cfg.phases.step_rule,
            run_prompts(cfg, opened.dims),
            cfg.data.resolutions[0].pixels,
            {"checkpoint": str(opened.path), "iteration": opened.iteration, "ema": ema},
            opened.dims,
        )

    @classmethod
    def from_export(cls, path, dtype: Optional[str] = None, attention_backend: str = "auto") -> "Samplers":
        generators, layout, info = open_export(path, dtype, attention_backend)
        source = {"exported": str(Path(path).resolve())}
        return cls(generators, layout, info["step_rule"], None, None, source, generators[0].high.dims)


def run_prompts(cfg, dims) -> Optional[PromptSource]:
    """The prompts a run trained on (with its negative prompt), or None when it names none."""
    return build_prompts(cfg, dims) if (cfg.data.prompt_cache or cfg.data.synthetic_prompts) else None


@dataclass
class SampleRequest:
    """The options of ``phased-dmd sample`` (see cli.py for their help)."""

    output: str
    prompts: Optional[str] = None  # a prompt cache folder
    indices: Optional[List[int]] = None  # prompt rows; default 0..num_samples-1 (wrapping)
    synthetic_prompts: int = 0  # > 0: random prompt embeddings (as the trainer's, seed 0)
    num_samples: Optional[int] = None
    resolution: Optional[Tuple[int, int, int]] = None  # frames, height, width in pixels
    seed: int = 0
    batch_size: int = 1
    vae: Optional[str] = None
    vae_dtype: str = "float32"
    fps: int = 16
    overwrite: bool = False


def sample_to_folder(samplers: Samplers, request: SampleRequest) -> Path:
    """``phased-dmd sample``: draw the requested samples and publish them in ``request.output``
    (built in a hidden folder beside it, renamed at the end)."""

    layout = parallel.layout()
    if layout.data_parallel != 1:
        raise RequestError(
            f"sampling runs one model-parallel group: launch tensor_parallel x ulysses = "
            f"{layout.tensor_parallel * layout.ulysses_parallel} processes, not {layout.world_size}"
        )
    output = Path(request.output)
    source = Path(samplers.source.get("checkpoint") or samplers.source["exported"])
    check_destination(source, output, request.overwrite, CheckpointError)
    prompts = _prompt_source(request, samplers)
    indices = request.indices if request.indices else [i % len(prompts) for i in range(request.num_samples or 1)]
    outside = [i for i in indices if not 0 <= i < len(prompts)]
    if outside:
        raise RequestError(f"prompt indices {outside} are outside the {len(prompts)} prompts")
    if request.vae is not None:
        vae_folder(request.vae)  # before sampling, on every rank
    resolution = request.resolution or samplers.default_resolution
    if resolution is None:
        raise RequestError("give --resolution FRAMESxHEIGHTxWIDTH (an export does not record one)")
    # An image-to-video generator takes its first frames from the prompt cache, at this resolution.
    shape = latent_geometry(samplers.dims, prompts).latent_shape(*resolution)
    seeds = [request.seed + i for i in range(len(indices))]
    # Guidance's negative prompts come with the prompts, padded to one length (both CFG branches
    # run in one batch), as the trainer draws them.
    condition, negative = (
        prompts.conditions(indices, resolution) if samplers.guided else (prompts.rows(indices, resolution), None)
    )
    latents = generate(
        samplers.generators,
        samplers.layout,
        condition,
        sample_noise(shape, seeds),
        samplers.step_rule,
        request.batch_size,
        seeds,
        negative,
    )
    if layout.rank != 0:
        return output
    vae = None
    if request.vae is not None:
        family = family_of(samplers.dims)
        vae = load_vae(request.vae, family, getattr(torch, request.vae_dtype), layout.device)
    info = {**samplers.source, "resolution": list(resolution), "seed": request.seed}
    with staging_folder(output, request.overwrite, CheckpointError) as staging:
        record_samples(staging, latents, samplers.layout, samplers.step_rule, indices, seeds, vae, info, request.fps)
    log.info("wrote %d samples to %s", latents.shape[0], output)
    return output


def _prompt_source(request: SampleRequest, samplers: Samplers) -> PromptSource:
    from phased_dmd_mega.data import SyntheticPrompts
    from phased_dmd_mega.prompt_cache.reader import PromptCache

    if request.prompts is not None:
        return PromptCache(request.prompts)
    if request.synthetic_prompts > 0:
        tokens = architecture_of(samplers.dims).synthetic_prompt_tokens
        return SyntheticPrompts(request.synthetic_prompts, tokens, samplers.dims.text_dim, seed=0)
    if samplers.default_prompts is not None:
        return samplers.default_prompts
    raise RequestError("no prompts: give --prompts CACHE_FOLDER (or --synthetic-prompts N for a smoke test)")


def family_of(dims) -> str:
    return architecture_of(dims).name
