"""Reading the folders ``phased-dmd sample`` writes (sample.py): ``latents.safetensors``
(``latents`` [N, C, F, H, W], ``prompt_index`` and ``seed`` [N]), ``samples.json`` (one entry per
sample), and, when a VAE decoded them, ``sample_<i>.png`` (images) or ``sample_<i>/frame_<j>.png``
(videos), named by the entries' ``image`` / ``frames`` fields. A folder without decoded frames is
a latents-only set.

Everything is checked before any metric runs: a missing or unreadable file, counts that disagree
between the two files, a frame file that is missing or of another size are refused naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from phased_dmd_mega.evaluation.errors import EvaluationError
from phased_dmd_mega.files import read_json
from phased_dmd_mega.sample import LATENTS_FILE, SAMPLES_FILE


@dataclass
class SampleSet:
    """One --samples folder, in memory: its latents, the prompt and seed of each sample, and its
    decoded frames (uint8 [N, F, H, W, 3]) or None for a latents-only folder."""

    name: str
    path: Path
    latents: torch.Tensor
    prompt_index: List[int]
    seeds: List[int]
    frames: Optional[torch.Tensor] = None
    record: Dict[str, Any] = field(default_factory=dict)  # samples.json without its samples list

    @property
    def num_samples(self) -> int:
        return self.latents.shape[0]

    @property
    def is_video(self) -> bool:
        return self.frames is not None and self.frames.shape[1] > 1

    def summary(self) -> Dict[str, Any]:
        """What evaluation.json records about the set itself."""
        seeds: Dict[str, List[int]] = {}
        for prompt, seed in zip(self.prompt_index, self.seeds):
            seeds.setdefault(str(prompt), []).append(seed)
        frames = None
        if self.frames is not None:
            count, height, width = self.frames.shape[1:4]
            frames = {"count": count, "height": height, "width": width}
        return {
            "name": self.name,
            "path": str(self.path),
            "num_samples": self.num_samples,
            "num_prompts": len(seeds),
            "seeds": dict(sorted(seeds.items(), key=lambda item: int(item[0]))),
            "latent_shape": list(self.latents.shape[1:]),
            "frames": frames,
            "source": self.record,
        }


def set_names(paths: Sequence[Path], names: Optional[Sequence[str]] = None) -> List[str]:
    """The sets' names: ``names`` (--name, one per --samples), else each folder's name, or its
    last two path parts where two folders share a name."""
    if names:
        if len(names) != len(paths):
            raise EvaluationError(f"--name was given {len(names)} times for {len(paths)} --samples folders")
        chosen = list(names)
    else:
        chosen = [Path(p).resolve().name for p in paths]
        if len(set(chosen)) < len(chosen):
            chosen = ["/".join(Path(p).resolve().parts[-2:]) for p in paths]
    duplicated = sorted({name for name in chosen if chosen.count(name) > 1})
    if duplicated:
        raise EvaluationError(f"two sets are named {duplicated[0]!r}: name them with --name, once per --samples")
    return chosen


def read_sample_set(path, name: Optional[str] = None) -> SampleSet:
    """The folder ``path`` as a SampleSet (frames read when the folder has them)."""
    folder = Path(path)
    if not folder.is_dir():
        raise EvaluationError(f"--samples {folder}: no such folder")
    latents, prompt_index, seeds = _read_latents(folder / LATENTS_FILE)
    record = read_json(folder / SAMPLES_FILE, EvaluationError)
    entries = record.get("samples")
    samples_file = folder / SAMPLES_FILE
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise EvaluationError(f"{samples_file} has no 'samples' list of objects")
    if len(entries) != latents.shape[0]:
        raise EvaluationError(
            f"{samples_file} lists {len(entries)} samples, {folder / LATENTS_FILE} holds {latents.shape[0]}"
        )
    for i, entry in enumerate(entries):
        for key, values in (("prompt_index", prompt_index), ("seed", seeds)):
            if key in entry and int(entry[key]) != values[i]:
                raise EvaluationError(f"{samples_file}: sample {i} has {key} {entry[key]}, {LATENTS_FILE} {values[i]}")
    frames = _read_frames(folder, entries)
    info = {key: value for key, value in record.items() if key != "samples"}
    return SampleSet(name or folder.resolve().name, folder, latents, prompt_index, seeds, frames, info)


def _read_latents(path: Path):
    if not path.is_file():
        raise EvaluationError(f"{path} is missing: --samples must name a folder written by `phased-dmd sample`")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise EvaluationError(f"{path} cannot be read: {err}") from err
    missing = [key for key in ("latents", "prompt_index", "seed") if key not in tensors]
    if missing:
        raise EvaluationError(f"{path} has no {', '.join(missing)} tensor")
    latents = tensors["latents"]
    if latents.dim() != 5 or not latents.is_floating_point():
        raise EvaluationError(f"{path}: latents must be floats [N, C, F, H, W], not {list(latents.shape)}")
    count = latents.shape[0]
    for key in ("prompt_index", "seed"):
        if tensors[key].dim() != 1 or tensors[key].shape[0] != count:
            raise EvaluationError(f"{path}: {key} holds {tensors[key].numel()} values, latents {count} samples")
    if count == 0:
        raise EvaluationError(f"{path} holds no samples")
    return (
        latents.float(),
        [int(p) for p in tensors["prompt_index"].tolist()],
        [int(s) for s in tensors["seed"].tolist()],
    )


def _frame_files(folder: Path, entry: Dict[str, Any], samples_file: Path) -> List[Path]:
    if "image" in entry:
        return [folder / entry["image"]]
    sub = folder / entry["frames"]
    files = sorted(sub.glob("frame_*.png"))
    expected = entry.get("num_frames", len(files))
    if not files or len(files) != expected:
        raise EvaluationError(f"{sub} holds {len(files)} frame_<j>.png files, {samples_file} says {expected}")
    return files


def _read_frames(folder: Path, entries: List[Dict[str, Any]]) -> Optional[torch.Tensor]:
    """uint8 [N, F, H, W, 3], or None when no sample was decoded."""
    from PIL import Image

    samples_file = folder / SAMPLES_FILE
    decoded = ["image" in entry or "frames" in entry for entry in entries]
    if not any(decoded):
        return None
    if not all(decoded):
        raise EvaluationError(f"{samples_file}: sample {decoded.index(False)} has no frames, others have")
    frames = None
    for i, entry in enumerate(entries):
        files = _frame_files(folder, entry, samples_file)
        for j, file in enumerate(files):
            if not file.is_file():
                raise EvaluationError(f"{file} is missing ({samples_file} names it)")
            try:
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert("RGB"))
            except OSError as err:
                raise EvaluationError(f"{file} cannot be read: {err}") from err
            if frames is None:
                frames = torch.empty((len(entries), len(files), *pixels.shape), dtype=torch.uint8)
            if len(files) != frames.shape[1] or pixels.shape != tuple(frames.shape[2:]):
                raise EvaluationError(
                    f"{file}: {len(files)} frames of {pixels.shape[1]}x{pixels.shape[0]}, the first sample "
                    f"has {frames.shape[1]} of {frames.shape[3]}x{frames.shape[2]}"
                )
            frames[i, j] = torch.from_numpy(pixels.copy())
    return frames
