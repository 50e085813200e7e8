"""Motion of videos (``--flow``): optical flow between consecutive frames.

- ``--flow farneback``: OpenCV's dense Farneback flow (``cv2.calcOpticalFlowFarneback`` on the
  grey frames, pyramid scale 0.5, 3 levels, window 15, 3 iterations, poly_n 5, poly_sigma 1.2;
  ``pip install 'phased-dmd-mega[evaluate]'`` for opencv-python-headless);
- ``--flow raft:PATH``: torchvision's RAFT (``raft_large``, else ``raft_small``: whichever the
  weights file at PATH fits), frames scaled to [-1, 1] and padded to multiples of 8 as its
  weights' transforms expect. torchvision is imported only then.

Per video, from the flow magnitude |(u, v)| of each pair of consecutive frames:

- ``flow_magnitude``: the mean magnitude over the pixels, averaged over the pairs (pixels per frame);
- ``flow_top5``: the mean of the largest 5% of the magnitudes, averaged over the pairs, then
  rescaled to a 256-pixel short side (times 256 / min(H, W)): the dynamic score;
- ``dynamic_degree``: 1 when the dynamic score exceeds ``--dynamic-threshold`` (default 6.0, the
  pixels per frame VBench's dynamic degree uses at a 256-pixel short side, VBench scaling its
  threshold with the frame size as we scale the score), else 0. Per prompt, the share of its
  videos that are dynamic. (VBench itself counts the frame pairs above the threshold and samples
  the video at 8 fps; this is its per-pair score averaged over every pair.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from phased_dmd_mega.evaluation.arguments import DEFAULT_DYNAMIC_THRESHOLD, FlowSpec
from phased_dmd_mega.evaluation.errors import EvaluationError
from phased_dmd_mega.evaluation.statistics import PerPrompt, per_sample_per_prompt, uint8_frames, unit_frames

OPTION = "--flow"
REFERENCE_SIDE = 256  # the short side the dynamic score and threshold refer to
TOP_SHARE = 0.05
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
MOTION_METRICS = ("flow_magnitude", "flow_top5", "dynamic_degree")


def check_flow(spec: FlowSpec) -> None:
    """Before anything loads: the package the method needs, and RAFT's weights file."""
    if spec.method == "farneback":
        if importlib.util.find_spec("cv2") is None:
            raise EvaluationError(
                f"{OPTION} farneback needs OpenCV: pip install 'phased-dmd-mega[evaluate]' (opencv-python-headless)"
            )
        return
    if not spec.path.is_file():
        raise EvaluationError(
            f"{OPTION} raft:{spec.path}: no such file (RAFT weights for torchvision's raft_large/_small)"
        )
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # missing, or broken against this torch
        raise EvaluationError(f"{OPTION} raft:PATH needs torchvision, which does not import here: {err}") from err


# ----------------------------------------------------------------------------- flow methods


def _grey(frame: torch.Tensor) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(uint8_frames(frame).numpy()), cv2.COLOR_RGB2GRAY)


class FarnebackFlow:
    name = "farneback"

    def pairs(self, video: torch.Tensor) -> List[np.ndarray]:
        """[F, H, W, 3] -> F - 1 flows [H, W, 2] (pixels), frame j to frame j + 1."""
        import cv2

        grey = [_grey(frame) for frame in video]
        return [cv2.calcOpticalFlowFarneback(a, b, None, **FARNEBACK) for a, b in zip(grey[:-1], grey[1:])]


RAFT_MIN_SIDE = 128  # RAFT's correlation pyramid wants feature maps of 16+ at 1/8 resolution


class RaftFlow:
    name = "raft"

    def __init__(self, model, device: torch.device, batch_size: int = 8):
        self.model, self.device, self.batch_size = model, device, batch_size

    @classmethod
    def load(cls, path: Path, device="cpu", batch_size: int = 8) -> "RaftFlow":
        from torchvision.models.optical_flow import raft_large, raft_small

        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise EvaluationError(f"{OPTION} raft:{path} cannot be read as weights: {err}") from err
        errors = []
        for build in (raft_large, raft_small):
            model = build(weights=None, progress=False)
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                errors.append(f"{build.__name__}: {str(err).splitlines()[0]}")
                continue
            return cls(model.to(device).eval(), torch.device(device), batch_size)
        raise EvaluationError(f"{OPTION} raft:{path} fits neither raft_large nor raft_small ({'; '.join(errors)})")

    @torch.no_grad()
    def pairs(self, video: torch.Tensor) -> List[np.ndarray]:
        """[F, H, W, 3] -> F - 1 flows [H, W, 2] (pixels of the given frames). RAFT needs sides of
        at least RAFT_MIN_SIDE pixels, in multiples of 8: smaller frames are upsampled to that,
        and the flow is resampled back to the frames and divided by the scale."""
        pixels = unit_frames(video).permute(0, 3, 1, 2) * 2 - 1  # [F, 3, H, W] in [-1, 1]
        height, width = pixels.shape[-2:]
        size = [max(side, RAFT_MIN_SIDE) for side in (height, width)]
        size = [side + (-side) % 8 for side in size]
        resized = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        flows = []
        for start in range(0, pixels.shape[0] - 1, self.batch_size):
            stop = min(start + self.batch_size, pixels.shape[0] - 1)
            first, second = (resized[a:b].to(self.device) for a, b in ((start, stop), (start + 1, stop + 1)))
            flow = self.model(first, second)[-1].float()  # [n, 2 (x, y), h', w']
            flow = torch.nn.functional.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([width / size[1], height / size[0]], device=flow.device)[None, :, None, None]
            flows.extend(flow.permute(0, 2, 3, 1).cpu().numpy())
        return flows


def load_flow(spec: FlowSpec, device="cpu", batch_size: int = 8):
    check_flow(spec)
    if spec.method == "farneback":
        return FarnebackFlow()
    return RaftFlow.load(spec.path, device, batch_size)


# ----------------------------------------------------------------------------- statistics


def magnitude_statistics(flow: np.ndarray) -> tuple:
    """(mean magnitude, mean of the top 5% magnitudes) of one flow [H, W, 2]."""
    magnitude = np.sqrt(np.square(flow[..., 0].astype(np.float64)) + np.square(flow[..., 1].astype(np.float64)))
    flat = magnitude.reshape(-1)
    top = max(1, int(flat.size * TOP_SHARE))
    return float(flat.mean()), float(np.partition(flat, flat.size - top)[flat.size - top :].mean())


def video_motion(flow_method, video: torch.Tensor) -> Dict[str, float]:
    """flow_magnitude and flow_top5 of one video [F, H, W, 3] (F >= 2)."""
    stats = [magnitude_statistics(flow) for flow in flow_method.pairs(video)]
    scale = REFERENCE_SIDE / min(video.shape[1], video.shape[2])
    return {
        "flow_magnitude": sum(mean for mean, _ in stats) / len(stats),
        "flow_top5": scale * sum(top for _, top in stats) / len(stats),
    }


def motion_metrics(
    flow_method, frames: torch.Tensor, prompt_index, threshold: float = DEFAULT_DYNAMIC_THRESHOLD
) -> Dict[str, PerPrompt]:
    """{flow_magnitude, flow_top5, dynamic_degree: per prompt} of videos [N, F, H, W, 3]."""
    if frames.shape[1] < 2:
        raise ValueError("motion needs videos (two frames or more)")
    per_video = [video_motion(flow_method, video) for video in frames]
    dynamic = [1.0 if motion["flow_top5"] > threshold else 0.0 for motion in per_video]
    out = {name: per_sample_per_prompt([m[name] for m in per_video], prompt_index) for name in MOTION_METRICS[:2]}
    out["dynamic_degree"] = per_sample_per_prompt(dynamic, prompt_index)
    return out
