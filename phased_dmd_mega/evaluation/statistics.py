"""Model-free statistics of samples, on tensors only (no file I/O): what ``phased-dmd evaluate``
reports for every set, and what a collapse monitor can compute on samples held in memory.

Inputs:

- ``latents`` [N, C, F, H, W], any floating dtype;
- ``frames`` [N, F, H, W, 3]: floats in [0, 1], or uint8 in 0..255 (what ``sample.decode``
  returns), converted one sample at a time so a uint8 batch of long videos never exists as floats;
- ``prompt_index`` [N] (a sequence of ints or a tensor): the prompt each sample was drawn for.
  The samples of one prompt are its seeds.

Every statistic returns ``{prompt index: value}``. Pairwise ones (a spread, a similarity) are the
mean over the unordered pairs of one prompt's samples; per-sample ones are the mean over the
prompt's samples. A prompt on which a statistic is undefined (a pairwise one with one sample,
frame change on single images) is absent. ``mean_over_prompts`` averages such a dict, each prompt
weighing the same.

The statistics, with the units they are in:

- ``latent_spread``: mean pairwise RMS distance between the seeds' latents,
  sqrt(mean((x_i - x_j)^2)) over all C*F*H*W elements, in float64 (latent units; 0 = collapse);
- ``pixel_spread``: the same on the frames, in [0, 1] pixel units (a model-free pixel diversity);
- ``clipped_fraction``: the share of pixel values (all channels, all frames) at the range's ends,
  0 or 255 (floats: <= 0 or >= 1): saturation by clipping, 1 for an image of pure 0s and 255s;
- ``hsv_saturation``: mean HSV saturation (max - min) / max over the pixels (0 where max is 0);
- ``frame_change``: mean absolute difference of consecutive frames, [0, 1] units (videos only);
- ``latent_rms``: each sample's RMS over its latent elements (a scale, for blown-up samples);
- ``latent_frame_change``: mean absolute difference of consecutive latent frames (motion without
  a VAE; latent videos only);
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch

PerPrompt = Dict[int, float]
FRAME_MODES = ("middle", "all")


# ----------------------------------------------------------------------------- grouping


def prompt_list(prompt_index) -> List[int]:
    if isinstance(prompt_index, torch.Tensor):
        return [int(p) for p in prompt_index.reshape(-1).tolist()]
    return [int(p) for p in prompt_index]


def group_by_prompt(prompt_index) -> Dict[int, List[int]]:
    """{prompt: the indices of its samples, in sample order}, prompts ascending."""
    groups: Dict[int, List[int]] = {}
    for i, prompt in enumerate(prompt_list(prompt_index)):
        groups.setdefault(prompt, []).append(i)
    return dict(sorted(groups.items()))


def pairwise_per_prompt(prompt_index, distance: Callable[[int, int], float]) -> PerPrompt:
    """The mean of ``distance(i, j)`` over the pairs i < j of each prompt's samples (prompts with
    at least two)."""
    out = {}
    for prompt, members in group_by_prompt(prompt_index).items():
        pairs = [(a, b) for k, a in enumerate(members) for b in members[k + 1 :]]
        if pairs:
            out[prompt] = sum(float(distance(a, b)) for a, b in pairs) / len(pairs)
    return out


def per_sample_per_prompt(values: Sequence[Optional[float]], prompt_index) -> PerPrompt:
    """The mean of each prompt's per-sample ``values`` (None: undefined for that sample, left out)."""
    out = {}
    for prompt, members in group_by_prompt(prompt_index).items():
        defined = [float(values[i]) for i in members if values[i] is not None]
        if defined:
            out[prompt] = sum(defined) / len(defined)
    return out


def mean_over_prompts(per_prompt: PerPrompt) -> Optional[float]:
    """Each prompt weighing the same; None when no prompt has a value."""
    values = list(per_prompt.values())
    return sum(values) / len(values) if values else None


def _check_count(name: str, tensor: torch.Tensor, prompt_index) -> None:
    if tensor.shape[0] != len(prompt_list(prompt_index)):
        raise ValueError(f"{name} hold {tensor.shape[0]} samples, prompt_index {len(prompt_list(prompt_index))}")


# ----------------------------------------------------------------------------- frames


def unit_frames(sample: torch.Tensor) -> torch.Tensor:
    """One sample's frames [F, H, W, 3] (or any frames tensor) as float32 in [0, 1]."""
    if sample.dtype == torch.uint8:
        return sample.float() / 255.0
    return sample.float()


def uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """Frames as uint8 0..255: uint8 ones as they are, floats in [0, 1] clamped and rounded."""
    if frames.dtype == torch.uint8:
        return frames
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)


def select_frames(frames: torch.Tensor, mode: str = "middle") -> torch.Tensor:
    """[N, F, H, W, 3] -> [N, K, H, W, 3]: ``middle`` keeps frame F // 2 (K = 1), ``all`` keeps
    every frame (K = F). Single images (F = 1) are the same either way."""
    if mode == "middle":
        middle = frames.shape[1] // 2
        return frames[:, middle : middle + 1]
    if mode == "all":
        return frames
    raise ValueError(f"frame selection {mode!r} is not one of {', '.join(FRAME_MODES)}")


def _clipped(sample: torch.Tensor) -> float:
    if sample.dtype == torch.uint8:
        hits = (sample == 0) | (sample == 255)
    else:
        hits = (sample <= 0) | (sample >= 1)
    return hits.sum(dtype=torch.float64).item() / sample.numel()


def _hsv_saturation(sample: torch.Tensor) -> float:
    pixels = unit_frames(sample)
    high = pixels.amax(dim=-1)
    low = pixels.amin(dim=-1)
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-12), torch.zeros_like(high))
    return saturation.sum(dtype=torch.float64).item() / saturation.numel()


def _frame_change(sample: torch.Tensor) -> Optional[float]:
    if sample.shape[0] < 2:
        return None
    total = 0.0
    for j in range(sample.shape[0] - 1):
        diff = (unit_frames(sample[j + 1]) - unit_frames(sample[j])).abs()
        total += diff.sum(dtype=torch.float64).item()
    return total / ((sample.shape[0] - 1) * sample[0].numel())


def clipped_fraction(frames: torch.Tensor, prompt_index) -> PerPrompt:
    _check_count("frames", frames, prompt_index)
    return per_sample_per_prompt([_clipped(sample) for sample in frames], prompt_index)


def hsv_saturation(frames: torch.Tensor, prompt_index) -> PerPrompt:
    _check_count("frames", frames, prompt_index)
    return per_sample_per_prompt([_hsv_saturation(sample) for sample in frames], prompt_index)


def frame_change(frames: torch.Tensor, prompt_index) -> PerPrompt:
    _check_count("frames", frames, prompt_index)
    return per_sample_per_prompt([_frame_change(sample) for sample in frames], prompt_index)


# ----------------------------------------------------------------------------- spreads


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """sqrt(mean((a - b)^2)) in float64."""
    return math.sqrt((a.double() - b.double()).square().mean().item())


def _frames_rms_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """rms_distance of two samples' frames [F, H, W, 3], one frame at a time (in [0, 1] units)."""
    total = 0.0
    for j in range(a.shape[0]):
        total += (unit_frames(a[j]).double() - unit_frames(b[j]).double()).square().sum().item()
    return math.sqrt(total / a.numel())


def latent_rms(latents: torch.Tensor, prompt_index) -> PerPrompt:
    """Each sample's RMS over all its latent elements, averaged per prompt (a scale: samples
    blown up by a diverging generator have many times the teacher's)."""
    _check_count("latents", latents, prompt_index)
    return per_sample_per_prompt([sample.double().square().mean().sqrt().item() for sample in latents], prompt_index)


def latent_frame_change(latents: torch.Tensor, prompt_index) -> PerPrompt:
    """Mean absolute difference of consecutive latent frames (dimension 2), per prompt: motion
    without a VAE (videos only; single-frame latents give none)."""
    _check_count("latents", latents, prompt_index)
    if latents.shape[2] < 2:
        return {}
    change = [(s[:, 1:].double() - s[:, :-1].double()).abs().mean().item() for s in latents]
    return per_sample_per_prompt(change, prompt_index)


def latent_spread(latents: torch.Tensor, prompt_index) -> PerPrompt:
    """Mean pairwise RMS distance between the latents of each prompt's seeds."""
    _check_count("latents", latents, prompt_index)
    return pairwise_per_prompt(prompt_index, lambda i, j: rms_distance(latents[i], latents[j]))


def pixel_spread(frames: torch.Tensor, prompt_index) -> PerPrompt:
    """Mean pairwise RMS distance between the frames of each prompt's seeds ([0, 1] units)."""
    _check_count("frames", frames, prompt_index)
    return pairwise_per_prompt(prompt_index, lambda i, j: _frames_rms_distance(frames[i], frames[j]))


def pairwise_cosine(embeddings: torch.Tensor, prompt_index) -> PerPrompt:
    """Mean pairwise cosine similarity of each prompt's samples' embeddings: [N, D], or [N, K, D]
    (K frames per sample: the cosine of frame k with frame k, averaged over k). In float64."""
    _check_count("embeddings", embeddings, prompt_index)
    unit = embeddings.double()
    if unit.dim() == 2:
        unit = unit[:, None]
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return pairwise_per_prompt(prompt_index, lambda i, j: (unit[i] * unit[j]).sum(-1).mean().item())


# ----------------------------------------------------------------------------- all of them


def model_free_statistics(
    latents: Optional[torch.Tensor], frames: Optional[torch.Tensor], prompt_index
) -> Dict[str, PerPrompt]:
    """Every statistic above that the inputs allow: the latent spread from ``latents``, the pixel
    ones from ``frames`` (frame change only for videos). {name: per-prompt values}."""
    out: Dict[str, PerPrompt] = {}
    if latents is not None:
        out["latent_spread"] = latent_spread(latents, prompt_index)
        out["latent_rms"] = latent_rms(latents, prompt_index)
        if latents.shape[2] > 1:
            out["latent_frame_change"] = latent_frame_change(latents, prompt_index)
    if frames is not None:
        out["pixel_spread"] = pixel_spread(frames, prompt_index)
        out["clipped_fraction"] = clipped_fraction(frames, prompt_index)
        out["hsv_saturation"] = hsv_saturation(frames, prompt_index)
        if frames.shape[1] > 1:
            out["frame_change"] = frame_change(frames, prompt_index)
    return out
