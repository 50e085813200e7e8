"""What ``phased-dmd evaluate`` writes: ``evaluation.json``, ``evaluation.md`` (a table, sets x
metrics), ``plots/<metric>.png`` (one bar chart per metric across the sets) and ``grid.png``.
The folder is built beside --out and published by one rename (files.staging_folder), so a
reader finds all of it or none."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from phased_dmd_mega.evaluation.errors import EvaluationError
from phased_dmd_mega.evaluation.statistics import PerPrompt, mean_over_prompts
from phased_dmd_mega.files import staging_folder, write_atomically, write_json, write_text_atomically

FORMAT = "phased-dmd-evaluation/1"
JSON_FILE, MARKDOWN_FILE, GRID_FILE, PLOTS = "evaluation.json", "evaluation.md", "grid.png", "plots"


@dataclass(frozen=True)
class Metric:
    label: str
    definition: str
    direction: str


METRICS: Dict[str, Metric] = {
    "latent_spread": Metric(
        "latent spread", "mean pairwise RMS distance between the seeds' latents", "higher = more diverse"
    ),
    "latent_rms": Metric("latent RMS", "RMS of each sample's latents", "a scale: far above the teacher's = blown up"),
    "latent_frame_change": Metric(
        "latent frame change", "mean absolute difference of consecutive latent frames", "higher = more change"
    ),
    "pixel_spread": Metric(
        "pixel spread",
        "mean pairwise RMS distance between the seeds' frames, pixels in [0, 1]",
        "higher = more diverse",
    ),
    "dino_cosine": Metric(
        "DINO cosine", "mean pairwise cosine of the seeds' DINO CLS (pooled) embeddings", "lower = more diverse"
    ),
    "lpips": Metric("LPIPS", "mean pairwise LPIPS (AlexNet, v0.1) between the seeds", "higher = more diverse"),
    "clipped_fraction": Metric(
        "clipped", "share of pixel values at 0 or 255 (clipped)", "lower = less saturation by clipping"
    ),
    "hsv_saturation": Metric("HSV saturation", "mean HSV saturation (max - min) / max of the pixels", "colourfulness"),
    "frame_change": Metric(
        "frame change", "mean absolute difference of consecutive frames, pixels in [0, 1]", "higher = more change"
    ),
    "flow_magnitude": Metric(
        "flow (px/frame)", "mean optical-flow magnitude, pixels per frame", "higher = more motion"
    ),
    "flow_top5": Metric(
        "top-5% flow (px/frame at 256)",
        "mean of the largest 5% flow magnitudes per frame pair, scaled to a 256-pixel short side",
        "higher = more motion",
    ),
    "dynamic_degree": Metric(
        "dynamic degree", "share of videos whose top-5% flow exceeds the dynamic threshold", "higher = more motion"
    ),
}


@dataclass
class SetResult:
    """One set's metrics (per prompt) and the metrics it skipped, with the reason."""

    summary: Dict[str, Any]
    metrics: Dict[str, PerPrompt] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)


def _number(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


def build_report(results: List[SetResult], used: Dict[str, Any]) -> Dict[str, Any]:
    """The contents of evaluation.json."""
    present = [name for name in METRICS if any(name in result.metrics for result in results)]
    sets = []
    for result in results:
        metrics = {
            name: {
                "mean": _number(mean_over_prompts(result.metrics[name])),
                "per_prompt": {str(p): _number(v) for p, v in sorted(result.metrics[name].items())},
            }
            for name in METRICS
            if name in result.metrics
        }
        sets.append({**result.summary, "metrics": metrics, "skipped": dict(result.skipped)})
    return {
        "format": FORMAT,
        "used": used,
        "metrics": {name: vars(METRICS[name]) for name in present},
        "sets": sets,
    }


def _cell(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}"


def markdown(report: Dict[str, Any]) -> str:
    """evaluation.md: the sets x metrics table of means over prompts, then what each metric is,
    what was skipped and what was used."""
    names = list(report["metrics"])
    lines = ["# Evaluation", ""]
    lines.append("| set | " + " | ".join(METRICS[name].label for name in names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for entry in report["sets"]:
        cells = [_cell(entry["metrics"][name]["mean"]) if name in entry["metrics"] else "—" for name in names]
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Each value is the mean over the set's prompts of the per-prompt value (evaluation.json).", ""]
    for name in names:
        metric = METRICS[name]
        lines.append(f"- **{metric.label}** (`{name}`): {metric.definition}; {metric.direction}.")
    skipped = [(entry["name"], name, why) for entry in report["sets"] for name, why in entry["skipped"].items()]
    if skipped:
        lines += ["", "Skipped:", ""]
        lines += [f"- {set_name}: `{name}`: {why}" for set_name, name, why in skipped]
    lines += ["", "Used:", ""]
    lines += [f"- {key}: {value if value is not None else '(none)'}" for key, value in report["used"].items()]
    lines += ["", "Sets:", ""]
    lines += [
        f"- {entry['name']}: {entry['path']} ({entry['num_samples']} samples, {entry['num_prompts']} prompts)"
        for entry in report["sets"]
    ]
    return "\n".join(lines) + "\n"


def bar_chart_png(report: Dict[str, Any], name: str) -> bytes:
    """One metric's bar chart across the sets (means over prompts), as PNG bytes (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [entry["name"] for entry in report["sets"]]
    values = [entry["metrics"].get(name, {}).get("mean") for entry in report["sets"]]
    figure = Figure(figsize=(max(4.0, 1.2 * len(labels) + 2), 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(labels))
    heights = [0.0 if value is None else value for value in values]
    bars = axes.bar(positions, heights, color="tab:blue")
    for bar, value in zip(bars, values):
        text = "n/a" if value is None else f"{value:.4g}"
        axes.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    axes.set_xticks(positions, labels, rotation=20 if len(labels) > 3 else 0)
    metric = METRICS[name]
    axes.set_title(f"{metric.label} ({metric.direction})", fontsize=10)
    axes.margins(y=0.15)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_report(out, report: Dict[str, Any], grid: np.ndarray, overwrite: bool = False) -> Path:
    """Publish --out: evaluation.json, evaluation.md, plots/, grid.png."""
    out = Path(out)
    with staging_folder(out, overwrite, EvaluationError) as staging:
        write_json(staging / JSON_FILE, report)
        write_text_atomically(staging / MARKDOWN_FILE, markdown(report))
        (staging / PLOTS).mkdir()
        for name in report["metrics"]:
            data = bar_chart_png(report, name)
            write_atomically(staging / PLOTS / f"{name}.png", lambda tmp, data=data: tmp.write_bytes(data))
        data = _png(grid)
        write_atomically(staging / GRID_FILE, lambda tmp: tmp.write_bytes(data))
    return out
