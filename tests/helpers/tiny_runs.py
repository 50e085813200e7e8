"""Tiny training runs for the export and sampling tests.

A teacher is a tiny random diffusers model saved with diffusers' own ``save_pretrained`` (Wan,
a Wan2.2-A14B-style pair in a pipeline root, or Qwen-Image); the real ``Trainer`` trains it for a
few iterations, writing real checkpoints. What the tests compare against is computed from the
trainer's own models before the run's parallel state ends: each generator's (and EMA's)
velocity on fixed inputs, and whatever else a test asks for (``extra``).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import yaml

from phased_dmd_mega import parallel
from phased_dmd_mega.config import Config, load_config
from phased_dmd_mega.distill import build as build_module
from phased_dmd_mega.distill import trainer as trainer_module
from phased_dmd_mega.distill.build import build_prompts, build_student, build_teacher, latent_geometry
from phased_dmd_mega.distill.trainer import Trainer

from helpers.tiny_models import QWEN_TINY, WAN_TINY

TINY_RUN = {
    "run": {"seed": 1, "max_consecutive_nonfinite": 2},
    "model": {"family": "wan", "preset": "tiny", "dtype": "float32", "attention_backend": "sdpa"},
    "phases": {
        "num_steps": 4,
        "num_phases": 2,
        "iterations_per_phase": 3,
        "fake_updates_per_generator_update": 1,
        "guidance_scale": 2.0,
        "weight_clamp": 10.0,
    },
    "optimizer": {"generator": {"lr": 1e-3}, "fake": {"lr": 1e-3}},
    "data": {"synthetic_prompts": 4, "batch_size": 2, "resolutions": [{"frames": 1, "height": 32, "width": 48}]},
    "checkpoint": {"save_every": 1, "keep_last": 10},
    "logging": {"log_every": 1},
}


def write_config(tmp_path: Path, name="run", **sections) -> Path:
    config = json.loads(json.dumps(TINY_RUN))
    config["run"]["output_dir"] = str(tmp_path / name)
    config["checkpoint"]["dir"] = str(tmp_path / name / "checkpoints")
    for section, values in sections.items():
        config[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def forbid_loading(monkeypatch):
    """From now on, the test fails if a run gets as far as loading the teacher (or a student,
    or any model through the builders)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the refusal")

    monkeypatch.setattr(trainer_module, "build_teacher", refuse)
    monkeypatch.setattr(trainer_module, "build_student", refuse)
    monkeypatch.setattr(build_module, "load_pretrained", refuse)


# Fewer iterations than test_trainer's run; the generators still move away from the teacher.
SHORT = ["phases.iterations_per_phase=2", "checkpoint.save_every=100"]


def save_wan_teacher(folder: Path, seed: int = 0, **overrides) -> Path:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    WanTransformer3DModel(**{**WAN_TINY, **overrides}).save_pretrained(folder, max_shard_size="40KB")
    return folder


# A student of the tiny teacher's family and latent space, half its width (2 heads of 12: dim 24
# against 48) and a narrower MLP: the same channels, patch and text width.
WAN_STUDENT = dict(num_attention_heads=2, ffn_dim=20)


def save_wan_student(folder: Path, seed: int = 5, **overrides) -> Path:
    return save_wan_teacher(folder, seed, **{**WAN_STUDENT, **overrides})


def save_a14b_teacher(root: Path, boundary_ratio: float) -> Path:
    """A diffusers pipeline root with a high-noise (transformer/) and a low-noise
    (transformer_2/) expert of different weights."""
    save_wan_teacher(root / "transformer", seed=1)
    save_wan_teacher(root / "transformer_2", seed=2)
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "boundary_ratio": boundary_ratio,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def save_qwen_teacher(folder: Path, seed: int = 0) -> Path:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    QwenImageTransformer2DModel(**QWEN_TINY).save_pretrained(folder)
    return folder


def velocity_inputs(dims) -> Dict[str, torch.Tensor]:
    """Inputs of one velocity call on the 0..1000 timestep scale, for Wan (a video of 3 latent
    frames, 512 text tokens as the pipeline pads them) or Qwen-Image (a 6 x 10 latent image,
    masked text)."""
    gen = torch.Generator().manual_seed(11)
    timestep = torch.tensor([990.0, 300.0])
    if hasattr(dims, "freq_dim") and hasattr(dims, "cross_attn_norm"):  # Wan
        return {
            "latents": torch.randn(2, dims.in_channels, 3, 4, 6, generator=gen),
            "timestep": timestep,
            "context": torch.randn(2, 512, dims.text_dim, generator=gen),
        }
    mask = (torch.arange(7)[None, :] < torch.tensor([7, 4])[:, None]).long()
    return {
        "latents": torch.randn(2, dims.in_channels, 6, 10, generator=gen),
        "timestep": timestep,
        "context": torch.randn(2, 7, dims.text_dim, generator=gen),
        "context_mask": mask,
    }


@torch.no_grad()
def velocity(model, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    extra = {"context_mask": inputs["context_mask"]} if "context_mask" in inputs else {}
    return model(inputs["latents"], inputs["timestep"], inputs["context"], **extra)


@dataclass
class TinyRun:
    root: Path  # the run's folder
    checkpoints: Path  # checkpoint.dir (with `latest`)
    config: Config
    inputs: Dict[str, torch.Tensor]
    outputs: Dict[str, torch.Tensor]  # "generator{k}" / "generator{k}_ema" -> velocity on inputs
    teacher_outputs: Dict[str, torch.Tensor]  # "high" (and "low") -> the teacher's velocity on inputs
    extra: Any = None


def train_tiny(
    tmp: Path,
    name: str,
    teacher: Path,
    overrides: Sequence[str] = (),
    family: str = "wan",
    extra: Optional[Callable[[Trainer], Any]] = None,
    student: Optional[Path] = None,
    before_run: Optional[Callable[[Trainer], Any]] = None,
) -> TinyRun:
    """Train on ``teacher`` (of family ``family``; with ``student``, from that student) in this
    process, one rank, and record the references; ``before_run`` sees the trainer before it runs."""
    students = [] if student is None else [f"model.student_path={student}"]
    cfg = load_config(
        write_config(tmp, name),
        [f"model.teacher_path={teacher}", f"model.family={family}", "model.preset=null", *SHORT, *students, *overrides],
    )
    parallel.initialize(seed=cfg.run.seed)
    try:
        teacher_model, student_model = build_teacher(cfg), build_student(cfg)
        dims = teacher_model.high.dims
        prompts = build_prompts(cfg, dims)
        trainer = Trainer(cfg, teacher_model, prompts, latent_geometry(dims, prompts), student_model)
        if before_run is not None:
            before_run(trainer)
        trainer.run()
        inputs = velocity_inputs(teacher_model.high.dims)
        outputs = {f"generator{k}": velocity(role.model.high, inputs) for k, role in enumerate(trainer.generators)}
        for k, ema in enumerate(trainer.ema or []):
            outputs[f"generator{k}_ema"] = velocity(ema.high, inputs)
        experts = {"high": teacher_model.high, "low": teacher_model.low}
        teacher_outputs = {name: velocity(model, inputs) for name, model in experts.items() if model is not None}
        result = extra(trainer) if extra is not None else None
    finally:
        parallel.destroy()
    return TinyRun(tmp / name, Path(cfg.checkpoint.dir), cfg, inputs, outputs, teacher_outputs, result)


def table_scheduler(sigmas):
    """diffusers' Euler flow-matching scheduler on a fixed step table (phased_dmd.json's sigmas,
    already shifted: shift 1 keeps them)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class ExportedSteps(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=list(sigmas[:-1]), device=device)

    return ExportedSteps(shift=1.0)


@torch.no_grad()
def run_image_pipeline(pipe, image, frames: int, height: int, width: int, guidance_scale: float = 3.0):
    """A diffusers image-to-video pipeline run for 2 steps on ``image`` (a path), random prompt
    embeddings and zero negative ones, to latents (its transformers' hooks record what they see)."""
    from diffusers.utils import load_image

    text = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(0))
    return pipe(
        image=load_image(str(image)),
        prompt_embeds=text,
        negative_prompt_embeds=torch.zeros_like(text),
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        output_type="latent",
    )
