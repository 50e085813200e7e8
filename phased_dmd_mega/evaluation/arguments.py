"""The options of ``phased-dmd evaluate`` (cli.py adds them with ``add_evaluate_arguments``).
Light on purpose: the command line is built for every ``phased-dmd`` call, so what evaluating
needs (torch, the metrics) is imported when the command runs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DEFAULT_DYNAMIC_THRESHOLD = 6.0  # VBench's dynamic-degree threshold at a 256-pixel short side (motion.py)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Diversity and motion of sample folders written by `phased-dmd sample`, per prompt across its "
        "seeds and per set (one set per --samples): latent and pixel spread, clipping, saturation and "
        "frame change always; DINO cosine, LPIPS and optical flow with their options. Weights are read "
        "from local paths only. Writes evaluation.json, evaluation.md, plots/ and grid.png to --out."
    )
    parser.add_argument(
        "--samples", required=True, action="append", metavar="DIR", help="a sample folder (repeat: one set each)"
    )
    parser.add_argument(
        "--name",
        action="append",
        dest="names",
        metavar="NAME",
        help="a set's name, once per --samples, in order (default: the folder's name)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist, or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    models = parser.add_argument_group("model metrics (local weights only)")
    models.add_argument("--dino", metavar="PATH", help="a transformers DINOv2/DINOv3 folder: pairwise CLS cosine")
    models.add_argument(
        "--lpips-backbone", metavar="FILE", help="AlexNet weights in torchvision's alexnet layout (.pth/.safetensors)"
    )
    models.add_argument(
        "--lpips-weights",
        metavar="FILE",
        help="LPIPS's linear layers (the lpips package's weights/v0.1/alex.pth); optional when "
        "--lpips-backbone holds them too",
    )
    models.add_argument(
        "--flow",
        type=_flow,
        metavar="METHOD",
        help="videos' optical flow: farneback (OpenCV) or raft:PATH (torchvision)",
    )
    models.add_argument(
        "--dynamic-threshold",
        type=float,
        metavar="PX",
        help="a video is dynamic when its top-5%% flow, in pixels per frame at a 256-pixel short side, "
        f"exceeds this (default {DEFAULT_DYNAMIC_THRESHOLD})",
    )
    models.add_argument(
        "--frames",
        choices=("middle", "all"),
        default="middle",
        help="video frames DINO and LPIPS compare: the middle one (default) or every frame",
    )
    models.add_argument("--device", help="e.g. cuda:0 or cpu (default: cuda when available)")
    models.add_argument(
        "--batch-size", type=_positive, default=16, metavar="N", help="images per model call (default 16)"
    )
    grid = parser.add_argument_group("grid.png")
    grid.add_argument(
        "--grid-frames",
        type=_positive,
        metavar="K",
        default=1,
        help="frames per video tile: 1, the middle frame (default), or a strip",
    )
    grid.add_argument(
        "--tile-height", type=_positive, default=128, metavar="PX", help="tile height in pixels (default 128)"
    )


@dataclass(frozen=True)
class FlowSpec:
    """What --flow asked for: ``farneback``, or ``raft`` with its weights file."""

    method: str
    path: Optional[Path] = None

    def __str__(self) -> str:
        return self.method if self.path is None else f"{self.method}:{self.path}"


def parse_flow(text: str) -> FlowSpec:
    if text == "farneback":
        return FlowSpec("farneback")
    if text.startswith("raft:") and len(text) > len("raft:"):
        return FlowSpec("raft", Path(text[len("raft:") :]))
    raise ValueError(f"{text!r} is neither farneback nor raft:PATH")


def _flow(text: str) -> FlowSpec:
    try:
        return parse_flow(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value
