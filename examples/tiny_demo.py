"""The README's main job: a tiny end-to-end Phased DMD distillation on CPU.

    torchrun --standalone --nproc_per_node 2 examples/tiny_demo.py --config examples/configs/tiny_cpu.yaml

1. A tiny Wan-architecture teacher is pretrained by flow matching on synthetic latents whose
   distribution is known: every "prompt" (class) has a few distinct spatial patterns (modes),
   plus a little noise. Two gloo processes, tensor parallel 2 (the cluster code path).
2. The teacher is distilled into a 4-step, 2-phase generator with Phased DMD (reverse nested
   intervals, subinterval target), and, for comparison, into 4-step one-phase DMD with SGTS.
3. Samples are scored against the known distribution: RMS distance to the nearest mode of the
   right class (lower is better) and mode coverage (the share of each class's modes that get
   samples), for the teacher at 40 and 4 steps, Phased DMD and DMD+SGTS, and, as the reference,
   for true data samples (their distance is the data noise: a sampler of exactly the data
   distribution scores that, not zero). Rank 0 writes runs/demo/summary.json and samples.png and
   prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict

import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.config import Config, load_config
from phased_dmd_mega.data import LatentGeometry, PromptSource
from phased_dmd_mega.distill.optim import RoleOptimizer, make_adamw, set_learning_rate
from phased_dmd_mega.distill.phased import sample
from phased_dmd_mega.distill.roles import Experts
from phased_dmd_mega.distill.trainer import Trainer, learning_rate_factor
from phased_dmd_mega.evaluation import statistics
from phased_dmd_mega.evaluation.grid import GridBlock, grid_image
from phased_dmd_mega.log import get_logger, setup_logging
from phased_dmd_mega.models import WAN_PRESETS, ModelParallelOptions, WanModel
from phased_dmd_mega.progress import Progress, announce_stage
from phased_dmd_mega.schedule import PhaseLayout, shift

log = get_logger("demo")

# ----------------------------------------------------------------------------- the data


@dataclass
class Patterns:
    """Classes of latents [C, 1, H, W]; class k has ``modes`` spatial patterns, each with its
    own channel signs, and samples are pattern + ``noise`` * N(0, 1)."""

    means: torch.Tensor  # [classes, modes, C, 1, H, W]
    prompts: torch.Tensor  # [classes + 1, L, text_dim]; the last row is the empty prompt
    noise: float

    @classmethod
    def make(cls, classes: int, modes: int, channels: int, size: int, text_dim: int, noise: float, seed: int = 1234):
        gen = torch.Generator().manual_seed(seed)
        y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        shapes = [
            torch.sign(torch.sin(3 * x)),
            torch.sign(torch.sin(3 * y)),
            torch.sign(x * y),
            1 - 2 * (x**2 + y**2 < 0.5).float(),
            torch.sign(x + y),
            torch.sign(x - y + 0.3),
            torch.cos(4 * x) * torch.cos(4 * y),
            1 - 2 * ((x.abs() < 0.4) | (y.abs() < 0.4)).float(),
        ]
        if classes * modes > len(shapes):  # 8 patterns: e.g. 2 prompts x 4 modes (the default)
            raise ValueError(f"at most {len(shapes)} patterns are defined")
        signs = torch.randint(0, 2, (classes * modes, channels), generator=gen).float() * 2 - 1
        signs[:, 0] = 1.0  # channel 0 shows the pattern itself (the PNG draws it)
        means = torch.stack([shapes[i][None, None] * signs[i][:, None, None, None] for i in range(classes * modes)])
        prompts = torch.randn(classes + 1, 4, text_dim, generator=gen)
        prompts[-1] = 0.0
        return cls(means.reshape(classes, modes, channels, 1, size, size), prompts, noise)

    @property
    def classes(self) -> int:
        return self.means.shape[0]

    def draw(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        modes = torch.randint(0, self.means.shape[1], (labels.shape[0],), generator=gen)
        x0 = self.means[labels, modes]
        return x0 + self.noise * torch.randn(x0.shape, generator=gen)

    def condition(self, labels: torch.Tensor) -> Condition:
        return Condition(context=self.prompts[labels])

    def negative(self, batch: int) -> Condition:
        return Condition(context=self.prompts[-1:].expand(batch, -1, -1))

    def score(self, samples: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        """RMS distance to the nearest mode of the sample's class, and mode coverage."""
        means = self.means[labels]  # [N, modes, ...]
        rms = (samples[:, None] - means).flatten(2).pow(2).mean(-1).sqrt()  # [N, modes]
        distance, nearest = rms.min(dim=1)
        covered = []
        for k in range(self.classes):
            mine = nearest[labels == k]
            counts = torch.bincount(mine, minlength=self.means.shape[1]).float()
            covered.append(float((counts >= 0.05 * max(len(mine), 1)).float().mean()))
        return {
            "distance_to_data": float(distance.mean()),
            "mode_coverage": sum(covered) / len(covered),
            # Model-free diversity: the mean pairwise RMS distance of one prompt's samples
            # (evaluation.statistics, what `phased-dmd evaluate` and the collapse monitor report).
            "diversity": statistics.mean_over_prompts(statistics.latent_spread(samples, labels)),
        }


# ----------------------------------------------------------------------------- the teacher


def build_model(options: ModelParallelOptions, dim: int, ffn_dim: int, layers: int) -> Experts:
    """The Wan architecture at a demo size (4 latent channels). Capacity matters more than
    iterations here: a few-step generator must map noise to one of several sharp patterns in one
    or two calls, a harder function than the teacher's smooth velocity field."""
    dims = replace(WAN_PRESETS["tiny"], in_channels=4, out_channels=4, dim=dim, ffn_dim=ffn_dim, num_layers=layers)
    return Experts(WanModel(dims, options))


def pretrain_teacher(
    teacher: Experts, data: Patterns, steps: int, batch: int, lr: float, shift_s: float, seed: int
) -> float:
    """Flow matching on the known distribution, through the same optimizer path as distillation.
    The learning rate decays to zero on a cosine: in a short run that gives a far sharper
    teacher (fewer blended samples) than a constant rate."""
    role = RoleOptimizer(teacher, make_adamw(teacher, lr, (0.9, 0.999), 1e-8, 0.0), grad_clip=1.0)
    loss_value = math.nan
    with Progress(steps, "teacher", "step", log_every_s=None) as progress:  # a bar on a terminal
        for step in range(steps):
            set_learning_rate(role, lr * learning_rate_factor(step, steps, 0, "cosine"))
            gen = torch.Generator().manual_seed(seed * 100003 + step)  # identical on every TP rank
            labels = torch.randint(0, data.classes, (batch,), generator=gen)
            x0 = data.draw(labels, gen)
            eps = torch.randn(x0.shape, generator=gen)
            t = shift(torch.rand(batch, generator=gen).clamp(1e-3, 1.0), shift_s)
            x_t = (1 - t)[:, None, None, None, None] * x0 + t[:, None, None, None, None] * eps
            velocity = teacher(x_t, t, data.condition(labels))
            loss = (velocity - (eps - x0)).pow(2).mean()
            loss.backward()
            role.step()
            loss_value = loss.item()
            progress.update(1, {"loss": loss_value})
            if step % 200 == 0 or step == steps - 1:
                log.info(
                    "teacher step %d/%d  flow-matching loss %.4f  ETA %s", step + 1, steps, loss_value, progress.eta()
                )
    return loss_value


# The demo's default teacher, pretrained once and kept in the repository (`make demo-teacher`
# writes it again), so that `make demo` starts distilling at once; `make demo-full` pretrains.
SHIPPED_TEACHERS = Path(__file__).resolve().parent / "demo_teacher"


def teacher_file(folder: Path, settings: Dict, rank: int) -> Path:
    """This rank's shard of the teacher pretrained with ``settings``, in ``folder``."""
    # A content hash: Python's hash() of a string changes from process to process.
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return folder / f"teacher-{key}-rank{rank}.safetensors"


def teacher_tensors(teacher: Experts) -> Dict[str, torch.Tensor]:
    """The teacher's state as tensors (its layers' empty ``_extra_state`` entries left out)."""
    return {name: value.contiguous() for name, value in teacher.state_dict().items() if torch.is_tensor(value)}


def save_teacher(teacher: Experts, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(teacher_tensors(teacher), str(path))


def load_teacher(teacher: Experts, path: Path) -> None:
    from safetensors.torch import load_file

    missing, unexpected = teacher.load_state_dict(load_file(str(path)), strict=False)
    wrong = unexpected + [name for name in missing if not name.endswith("_extra_state")]
    if wrong:
        raise ValueError(f"{path} does not fit the demo's teacher: {', '.join(wrong[:5])}")


# ----------------------------------------------------------------------------- distillation


class PatternPrompts(PromptSource):
    """The synthetic prompts as the trainer's prompt source."""

    def __init__(self, data: Patterns):
        self.data = data

    def __len__(self) -> int:
        return self.data.classes

    def rows(self, indices, resolution=None):
        return self.data.condition(torch.tensor(indices))

    def negative(self, batch):
        return self.data.negative(batch)


def distill(method: str, teacher: Experts, data: Patterns, geometry: LatentGeometry, cfg, iterations: int):
    """The same Trainer as `phased-dmd train`, with the same number of generator updates for
    every method; each method writes its metrics and final checkpoint under its own folder."""
    num_phases = cfg.phases.num_phases if method == "phased_dmd" else 1
    folder = Path(cfg.run.output_dir) / method
    if parallel.layout().rank == 0:  # a fresh run: no metrics or checkpoints of an earlier one
        shutil.rmtree(folder, ignore_errors=True)
    method_cfg = replace(
        cfg,
        run=replace(cfg.run, output_dir=str(folder)),
        phases=replace(cfg.phases, method=method, iterations_per_phase=max(1, iterations // num_phases)),
        checkpoint=replace(cfg.checkpoint, dir=str(folder / "checkpoints"), resume="none", save_every=10**9),
    )
    trainer = Trainer(method_cfg, teacher, PatternPrompts(data), geometry)
    trainer.run()
    return trainer.sampling_generators(), trainer.layout


# ----------------------------------------------------------------------------- evaluation


def eval_labels(data: Patterns, per_class: int) -> torch.Tensor:
    return torch.arange(data.classes).repeat_interleave(per_class)


EVAL_SEED = 99  # every method is scored from the same noise


def eval_inputs(data: Patterns, per_class: int, seed: int = EVAL_SEED):
    """(labels, noise) of the evaluation: ``per_class`` samples of each prompt."""
    labels = eval_labels(data, per_class)
    return labels, torch.randn((len(labels), *data.means.shape[2:]), generator=torch.Generator().manual_seed(seed))


def evaluate(generators, layout, data: Patterns, per_class: int, seed: int = EVAL_SEED):
    labels, noise = eval_inputs(data, per_class, seed)
    start = time.perf_counter()
    samples = sample(generators, layout, noise, data.condition(labels))
    return samples, labels, {**data.score(samples, labels), "seconds": time.perf_counter() - start}


def save_grid(path: Path, rows: Dict[str, torch.Tensor], data: Patterns, per_class: int, shown: int = 8) -> None:
    """One block per method: a row per prompt, its first ``shown`` seeds side by side (a method
    that collapsed onto fewer modes shows it as repeats along the row); first the data's modes."""
    from PIL import Image

    modes = data.means.shape[1]
    blocks = [
        GridBlock.of(
            "data: the modes of each prompt",
            torch.arange(data.classes).repeat_interleave(modes),
            list(range(modes)) * data.classes,
            latents=data.means.flatten(0, 1),
            label="mode",
        )
    ]
    for name, samples in rows.items():
        picked = torch.cat([torch.arange(k * per_class, k * per_class + shown) for k in range(data.classes)])
        labels = eval_labels(data, per_class)[picked]
        blocks.append(GridBlock.of(name, labels, picked.tolist(), latents=samples[picked], label="sample"))
    Image.fromarray(grid_image(blocks, tile_height=40)).save(path)


STAGES = 4  # the teacher, its samples, Phased DMD, DMD + SGTS (announce_stage numbers them)
METHOD_NAMES = {"phased_dmd": "Phased DMD", "dmd_sgts": "DMD + SGTS"}


def demo_parser(description: str) -> argparse.ArgumentParser:
    """The demo's options (shared with bench/demo_regression_oracle.py, which must find the same
    cached teacher)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="examples/configs/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--pretrain", action="store_true", help="pretrain the teacher even where one is stored")
    parser.add_argument("--save-teacher", type=Path, help="also write the teacher into this folder")
    parser.add_argument("--teacher-only", action="store_true", help="stop once the teacher is ready")
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--teacher-batch", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=200, help="generator updates per method")
    parser.add_argument("--eval-per-class", type=int, default=64)
    parser.add_argument("--classes", type=int, default=2, help="prompts of the synthetic data")
    parser.add_argument("--modes", type=int, default=4, help="distinct patterns per prompt")
    parser.add_argument("--data-noise", type=float, default=0.05)
    parser.add_argument("--model-dim", type=int, default=128, help="width of the demo's Wan DiT")
    parser.add_argument("--model-ffn", type=int, default=512, help="its feed-forward width")
    parser.add_argument("--model-layers", type=int, default=3, help="its number of blocks")
    return parser


@dataclass
class DemoSetup:
    cfg: Config
    layout: parallel.ParallelLayout
    data: Patterns
    geometry: LatentGeometry
    teacher: Experts  # frozen
    model_size: Dict[str, int]
    out: Path


GEOMETRY = LatentGeometry(channels=4, temporal=1, spatial=8)


def pattern_settings(args, cfg) -> Dict:
    channels, _, size, _ = GEOMETRY.latent_shape(*cfg.data.resolutions[0].pixels)
    return {"classes": args.classes, "modes": args.modes, "channels": channels, "size": size, "noise": args.data_noise}


def model_size_of(args) -> Dict[str, int]:
    return {"dim": args.model_dim, "ffn_dim": args.model_ffn, "layers": args.model_layers}


def teacher_settings(args, cfg, tensor_parallel: int) -> Dict:
    """Everything the pretrained teacher depends on (its files are named by their hash)."""
    pretraining = {
        "steps": args.teacher_steps,
        "batch": args.teacher_batch,
        "lr_schedule": "cosine",
        "seed": cfg.run.seed,
        "tp": tensor_parallel,
    }
    return {**pretraining, **pattern_settings(args, cfg), **model_size_of(args)}


def set_up(args) -> DemoSetup:
    """Processes, data and the frozen teacher: pretrained here, or reused from the cache that an
    earlier run with the same settings wrote."""
    cfg = load_config(args.config, args.overrides)
    setup_logging(cfg.logging.level, cfg.logging.all_ranks)
    layout = parallel.initialize(tensor_parallel=cfg.parallel.tensor_parallel, seed=cfg.run.seed)
    torch.set_num_threads(1)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    geometry = GEOMETRY
    data_settings = pattern_settings(args, cfg)
    data = Patterns.make(**data_settings, text_dim=WAN_PRESETS["tiny"].text_dim)
    options = ModelParallelOptions(
        attention_backend=cfg.model.attention_backend, sequence_parallel=cfg.parallel.sequence_parallel
    )
    log.info("tiny demo: %d processes, tensor parallel %d", layout.world_size, layout.tensor_parallel)

    model_size = model_size_of(args)
    teacher = build_model(options, **model_size)
    settings = teacher_settings(args, cfg, layout.tensor_parallel)
    cached, shipped = (teacher_file(folder, settings, layout.rank) for folder in (out, SHIPPED_TEACHERS))
    found = next((path for path in (cached, shipped) if path.exists() and not args.pretrain), None)
    if found is not None:
        announce_stage(1, STAGES, f"teacher: reusing {found}")
        load_teacher(teacher, found)
    else:
        announce_stage(1, STAGES, f"teacher pretraining ({args.teacher_steps} flow-matching steps)")
        pretrain_teacher(teacher, data, args.teacher_steps, args.teacher_batch, 1e-3, cfg.phases.shift, cfg.run.seed)
        save_teacher(teacher, cached)
    if args.save_teacher is not None:
        save_teacher(teacher, teacher_file(args.save_teacher, settings, layout.rank))
    teacher.requires_grad_(False)
    return DemoSetup(cfg, layout, data, geometry, teacher, model_size, out)


ROWS = ("data_samples", "teacher_40_steps", "teacher_4_steps", "phased_dmd", "dmd_sgts")


def against_teacher(summary: Dict, name: str) -> Dict[str, float]:
    """A method's distance against the 4-step teacher's: raw (d / d4), and above the data floor
    ((d - d_data) / (d4 - d_data): the share of the 4-step teacher's excess error left)."""
    d, d4 = summary[name]["distance_to_data"], summary["teacher_4_steps"]["distance_to_data"]
    floor = summary["data_samples"]["distance_to_data"]
    return {"raw": d / d4, "above_floor": (d - floor) / (d4 - floor)}


def print_table(summary: Dict) -> None:
    print(
        "\n| method | distance to data (lower is better) | / 4-step teacher | above the floor | mode coverage |"
        " diversity (spread across seeds) | sampling s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in ROWS:
        r, ratio = summary[name], against_teacher(summary, name)
        print(
            f"| {name} | {r['distance_to_data']:.4f} | {ratio['raw']:.2f} | {ratio['above_floor']:.2f} | "
            f"{r['mode_coverage']:.2f} | {r['diversity']:.4f} | {r['seconds']:.2f} |"
        )
    ratio = against_teacher(summary, "phased_dmd")
    print(
        f"\nPhased DMD distance / teacher 4-step distance: {ratio['raw']:.2f} raw, "
        f"{ratio['above_floor']:.2f} above the data floor"
    )


def main() -> int:
    args = demo_parser(__doc__.splitlines()[0]).parse_args()
    started = time.perf_counter()
    setup = set_up(args)
    cfg, layout, data, teacher, out = setup.cfg, setup.layout, setup.data, setup.teacher, setup.out
    if args.teacher_only:
        parallel.destroy()
        return 0

    summary, rows = {}, {}
    labels = eval_labels(data, args.eval_per_class)  # the reference: true samples, the metric's floor
    summary["data_samples"] = {
        **data.score(data.draw(labels, torch.Generator().manual_seed(98)), labels),
        "seconds": 0.0,
    }
    announce_stage(2, STAGES, f"sampling the teacher at 40 and {cfg.phases.num_steps} steps")
    for name, steps in (("teacher_40_steps", 40), ("teacher_4_steps", cfg.phases.num_steps)):
        teacher_layout = PhaseLayout.build(steps, num_phases=1, shift=cfg.phases.shift)
        samples, _, summary[name] = evaluate([teacher], teacher_layout, data, args.eval_per_class)
        rows[name] = samples
    for number, method in enumerate(("phased_dmd", "dmd_sgts"), start=3):
        announce_stage(number, STAGES, f"{METHOD_NAMES[method]}: {args.iterations} generator updates, then sampling")
        start = time.perf_counter()
        generators, method_layout = distill(method, teacher, data, setup.geometry, cfg, args.iterations)
        train_seconds = time.perf_counter() - start
        samples, _, summary[method] = evaluate(generators, method_layout, data, args.eval_per_class)
        summary[method]["train_seconds"] = train_seconds
        rows[method] = samples

    if layout.rank == 0:
        summary["settings"] = {
            "teacher_steps": args.teacher_steps,
            "teacher_batch": args.teacher_batch,
            "generator_updates": args.iterations,
            "model": setup.model_size,
            "processes": layout.world_size,
            "tensor_parallel": layout.tensor_parallel,
            "total_seconds": time.perf_counter() - started,
        }
        for name in ROWS:
            summary[name]["against_teacher_4_steps"] = against_teacher(summary, name)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        save_grid(out / "samples.png", rows, data, args.eval_per_class)
        print_table(summary)
        print(f"wrote {out / 'summary.json'} and {out / 'samples.png'}")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
