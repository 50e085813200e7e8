"""``phased-dmd evaluate``: did a distillation keep the teacher's diversity and motion?

Over one or more folders of ``phased-dmd sample`` (one set each), per prompt across its seeds:
the model-free statistics (statistics.py; latents-only folders get the latent spread), and with
their options DINO cosine (dino.py), LPIPS (lpips.py) and optical-flow motion (motion.py).

Order of work: every path option is checked, then every sample folder is read and checked, then
the destination, and only then do models load; a refusal at any stage writes nothing. A metric
that needs decoded frames is skipped, with the reason in the outputs, on a latents-only set (and
motion on a set of images); asked for when no set has what it needs, it is refused.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from phased_dmd_mega.evaluation import statistics
from phased_dmd_mega.evaluation.arguments import DEFAULT_DYNAMIC_THRESHOLD, FlowSpec
from phased_dmd_mega.evaluation.dino import DinoEmbedder, check_dino_folder, dino_cosine
from phased_dmd_mega.evaluation.errors import EvaluationError
from phased_dmd_mega.evaluation.grid import GridBlock, grid_image
from phased_dmd_mega.evaluation.lpips import check_lpips_files, load_lpips, lpips_pairwise
from phased_dmd_mega.evaluation.motion import MOTION_METRICS, check_flow, load_flow, motion_metrics
from phased_dmd_mega.evaluation.report import SetResult, build_report, write_report
from phased_dmd_mega.evaluation.samples import SampleSet, read_sample_set, set_names
from phased_dmd_mega.files import check_destination
from phased_dmd_mega.log import get_logger, setup_logging

log = get_logger(__name__)

NO_FRAMES = "latents only: no decoded frames (sample with --vae)"
NOT_VIDEO = "images: motion needs videos"


@dataclass
class EvaluateOptions:
    """The options of ``phased-dmd evaluate`` (see cli.py for their help)."""

    samples: List[str]
    out: str
    names: Optional[List[str]] = None
    dino: Optional[str] = None
    lpips_backbone: Optional[str] = None
    lpips_weights: Optional[str] = None
    flow: Optional[FlowSpec] = None
    dynamic_threshold: Optional[float] = None  # None: DEFAULT_DYNAMIC_THRESHOLD
    frames: str = "middle"
    grid_frames: int = 1
    tile_height: int = 128
    device: Optional[str] = None
    batch_size: int = 16
    overwrite: bool = False

    @property
    def lpips(self) -> bool:
        return self.lpips_backbone is not None or self.lpips_weights is not None


def check_options(options: EvaluateOptions) -> None:
    """The path options, before any sample folder is read."""
    if not options.samples:
        raise EvaluationError("give at least one --samples folder")
    if importlib.util.find_spec("matplotlib") is None:
        raise EvaluationError("the plots need matplotlib: pip install 'phased-dmd-mega[evaluate]'")
    if options.dino is not None:
        check_dino_folder(options.dino)
    if options.lpips:
        check_lpips_files(options.lpips_backbone, options.lpips_weights)
    if options.flow is not None:
        check_flow(options.flow)


def _check_needs(options: EvaluateOptions, sets: List[SampleSet]) -> None:
    """A model metric asked for when no set has what it needs: refused."""
    if not any(s.frames is not None for s in sets):
        for wanted, option in ((options.dino, "--dino"), (options.lpips, "--lpips-backbone")):
            if wanted:
                raise EvaluationError(f"{option} needs decoded frames, and every --samples folder is latents only")
    if options.flow is not None and not any(s.is_video for s in sets):
        raise EvaluationError("--flow needs videos, and no --samples folder holds decoded videos")


def _destination(options: EvaluateOptions, sets: List[SampleSet]) -> bool:
    """Whether --out may be replaced (--overwrite, or an empty folder); refused if it overlaps a set."""
    out = Path(options.out)
    replace = options.overwrite or (out.is_dir() and not any(out.iterdir()))
    for sample_set in sets:
        check_destination(sample_set.path, out, replace, EvaluationError)
    return replace


def _used(options: EvaluateOptions, device: str) -> Dict[str, Any]:
    def absolute(path):
        return None if path is None else str(Path(path).resolve())

    flow = None
    if options.flow is not None:
        flow = options.flow.method if options.flow.path is None else f"raft:{absolute(options.flow.path)}"
    return {
        "dino": absolute(options.dino),
        "lpips_backbone": absolute(options.lpips_backbone),
        "lpips_weights": absolute(options.lpips_weights),
        "flow": flow,
        "dynamic_threshold": options.dynamic_threshold if options.flow is not None else None,
        "frames": options.frames,
        "device": device,
    }


def evaluate_set(sample_set: SampleSet, options: EvaluateOptions, models: Dict[str, Any]) -> SetResult:
    """Every metric of one set that its contents and the loaded ``models`` allow."""
    result = SetResult(sample_set.summary())
    prompts, frames = sample_set.prompt_index, sample_set.frames
    log.info("%s: model-free statistics", sample_set.name)
    result.metrics.update(statistics.model_free_statistics(sample_set.latents, frames, prompts))
    if frames is None:
        result.skipped.update(dict.fromkeys(("pixel_spread", "clipped_fraction", "hsv_saturation"), NO_FRAMES))
    if not sample_set.is_video:
        result.skipped["frame_change"] = NO_FRAMES if frames is None else "images: frame change needs videos"
    for name, model, run in (
        ("dino_cosine", "dino", lambda: dino_cosine(models["dino"], frames, prompts, options.frames)),
        (
            "lpips",
            "lpips",
            lambda: lpips_pairwise(models["lpips"], frames, prompts, options.frames, options.batch_size),
        ),
    ):
        if model not in models:
            continue
        if frames is None:
            result.skipped[name] = NO_FRAMES
            continue
        log.info("%s: %s", sample_set.name, name)
        result.metrics[name] = run()
    if "flow" in models:
        if sample_set.is_video:
            log.info("%s: optical flow (%s)", sample_set.name, models["flow"].name)
            result.metrics.update(motion_metrics(models["flow"], frames, prompts, options.dynamic_threshold))
        else:
            result.skipped.update(dict.fromkeys(MOTION_METRICS, NO_FRAMES if frames is None else NOT_VIDEO))
    return result


def load_models(options: EvaluateOptions, device: str) -> Dict[str, Any]:
    models: Dict[str, Any] = {}
    if options.dino is not None:
        models["dino"] = DinoEmbedder.load(options.dino, device, options.batch_size)
    if options.lpips:
        models["lpips"] = load_lpips(options.lpips_backbone, options.lpips_weights, device)
    if options.flow is not None:
        models["flow"] = load_flow(options.flow, device, options.batch_size)
    return models


def evaluate(options: EvaluateOptions) -> Path:
    """Run the evaluation and publish --out; returns its path."""
    check_options(options)
    if options.dynamic_threshold is None:
        options.dynamic_threshold = DEFAULT_DYNAMIC_THRESHOLD
    names = set_names([Path(p) for p in options.samples], options.names)
    sets = [read_sample_set(path, name) for path, name in zip(options.samples, names)]
    _check_needs(options, sets)
    replace = _destination(options, sets)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = load_models(options, device)
    results = [evaluate_set(sample_set, options, models) for sample_set in sets]
    blocks = [GridBlock.of(s.name, s.prompt_index, s.seeds, s.frames, s.latents, options.grid_frames) for s in sets]
    report = build_report(results, _used(options, device))
    out = write_report(options.out, report, grid_image(blocks, options.tile_height), replace)
    log.info("wrote the evaluation of %d sets to %s", len(sets), out)
    return out


def run_from_arguments(args) -> int:
    """``phased-dmd evaluate`` with argparse's namespace (cli.py)."""
    setup_logging()
    options = EvaluateOptions(
        samples=args.samples,
        out=args.out,
        names=args.names,
        dino=args.dino,
        lpips_backbone=args.lpips_backbone,
        lpips_weights=args.lpips_weights,
        flow=args.flow,
        dynamic_threshold=args.dynamic_threshold,
        frames=args.frames,
        grid_frames=args.grid_frames,
        tile_height=args.tile_height,
        device=args.device,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    print(evaluate(options))  # an EvaluationError (a ValueError): main's one line, exit status 1
    return 0
