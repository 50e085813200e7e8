"""LPIPS among the seeds of a prompt (``--lpips-backbone`` / ``--lpips-weights``): the paper's
second diversity measure, higher = more diverse.

The distance of the ``lpips`` package (Zhang et al. 2018, version 0.1, AlexNet) computed here,
since that package imports torchvision: images in [-1, 1] are shifted and scaled by LPIPS's fixed
constants, run through AlexNet's convolutional stack, and at each of its five ReLUs the features
are unit-normalised over channels, their squared difference weighted per channel by a learned
non-negative 1x1 convolution, averaged over space; the five layers' values are summed.

Weights, from local files only:

- ``--lpips-backbone FILE``: AlexNet's convolutions under torchvision's ``alexnet`` names
  (``features.0.weight`` ... ``features.10.bias``; torchvision's ``alexnet-owt-7be5be79.pth``
  loads as it is, its classifier ignored), or under the lpips package's own full-model names
  (``net.slice1.0.weight`` ...);
- ``--lpips-weights FILE``: the linear layers, the lpips package's ``weights/v0.1/alex.pth``
  layout (``lin0.model.1.weight`` ... ``lin4.model.1.weight``, each [C, 1, 1] per layer as
  [1, C, 1, 1]). Optional when the backbone file holds them too (one file with both).

``.pth`` / ``.pt`` files are read with ``torch.load(weights_only=True)``, ``.safetensors`` with
safetensors. Frames as for DINO (``--frames``): the middle one of a video, or every frame, where
the distance of two seeds is the mean over k of their frames k.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from phased_dmd_mega.evaluation.errors import EvaluationError
from phased_dmd_mega.evaluation.statistics import PerPrompt, group_by_prompt, select_frames, unit_frames

BACKBONE_OPTION, WEIGHTS_OPTION = "--lpips-backbone", "--lpips-weights"
CHANNELS = (64, 192, 384, 256, 256)  # at the five taps
TAPS = (1, 4, 7, 9, 11)  # features.N: the ReLUs after conv1..conv5
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's ScalingLayer
SCALE = (0.458, 0.448, 0.450)
_CONVS = {
    0: (3, 64, 11, 4, 2),
    3: (64, 192, 5, 1, 2),
    6: (192, 384, 3, 1, 1),
    8: (384, 256, 3, 1, 1),
    10: (256, 256, 3, 1, 1),
}
_LIN = re.compile(r"^(?:lin(\d)|lins\.(\d))\.model\.1\.weight$")
_SLICE = re.compile(r"^net\.slice\d\.(\d+)\.(weight|bias)$")


class AlexNetFeatures(nn.Module):
    """torchvision's ``alexnet().features`` up to the last ReLU, with the same module indices
    (so its state-dict keys are ``features.N.weight``); returns the five ReLU outputs."""

    def __init__(self):
        super().__init__()
        layers: List[nn.Module] = []
        for index in range(TAPS[-1] + 1):
            if index in _CONVS:
                cin, cout, kernel, stride, padding = _CONVS[index]
                layers.append(nn.Conv2d(cin, cout, kernel, stride, padding))
            elif index in (2, 5):
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                taps.append(x)
        return taps


class LPIPS(nn.Module):
    """The LPIPS distance; ``forward(a, b)`` takes [B, 3, H, W] in [-1, 1] and returns [B]."""

    def __init__(self):
        super().__init__()
        self.net = AlexNetFeatures()
        self.lins = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        both = self.net((torch.cat([a, b]) - self.shift) / self.scale)
        total = 0.0
        for features, lin in zip(both, self.lins):
            unit = features / (features.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            first, second = unit.chunk(2)
            total = total + lin((first - second).square()).mean(dim=(2, 3))
        return total.reshape(-1)


# ----------------------------------------------------------------------------- weights


def _read_state(path: Path, option: str) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise EvaluationError(f"{option} {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle, zip or safetensors error: the file is not a state dict
        raise EvaluationError(f"{option} {path} cannot be read as weights: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EvaluationError(f"{option} {path} does not hold a state dict")
    return {key.removeprefix("module."): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _backbone_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    found = {}
    for key, value in state.items():
        match = _SLICE.match(key)
        if match:
            key = f"features.{match[1]}.{match[2]}"
        if key.startswith("features.") and int(key.split(".")[1]) <= TAPS[-1]:
            found[f"net.{key}"] = value
    return found


def _lin_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    found = {}
    for key, value in state.items():
        match = _LIN.match(key)
        if match:
            found[f"lins.{match[1] or match[2]}.weight"] = value
    return found


def _load_into(model: nn.Module, wanted: Dict[str, torch.Tensor], prefix: str, source: str) -> None:
    expected = {key: value for key, value in model.state_dict().items() if key.startswith(prefix)}
    missing = sorted(set(expected) - set(wanted))
    if missing:
        raise EvaluationError(f"{source} lacks {len(missing)} tensors, e.g. {missing[0].split('.', 1)[1]}")
    for key, value in wanted.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise EvaluationError(
                f"{source}: {key.split('.', 1)[1]} is {list(value.shape)}, AlexNet's LPIPS needs "
                f"{list(expected[key].shape)}"
            )
    model.load_state_dict(wanted, strict=False)


def check_lpips_files(backbone, weights=None) -> Tuple[Path, Optional[Path]]:
    """The two paths, refused (naming the option) when one is missing."""
    if backbone is None:
        raise EvaluationError(f"{WEIGHTS_OPTION} needs {BACKBONE_OPTION} (the AlexNet weights)")
    backbone = Path(backbone)
    if not backbone.is_file():
        raise EvaluationError(f"{BACKBONE_OPTION} {backbone}: no such file")
    if weights is not None and not Path(weights).is_file():
        raise EvaluationError(f"{WEIGHTS_OPTION} {weights}: no such file")
    return backbone, Path(weights) if weights is not None else None


def load_lpips(backbone, weights=None, device="cpu") -> LPIPS:
    """LPIPS with AlexNet from ``backbone`` and the linear layers from ``weights`` (or from
    ``backbone`` when it holds them)."""
    backbone, weights = check_lpips_files(backbone, weights)
    model = LPIPS()
    backbone_state = _read_state(backbone, BACKBONE_OPTION)
    features = _backbone_keys(backbone_state)
    if not features:
        raise EvaluationError(
            f"{BACKBONE_OPTION} {backbone} holds no AlexNet features.N weights (torchvision's alexnet layout)"
        )
    _load_into(model, features, "net.", f"{BACKBONE_OPTION} {backbone}")
    if weights is not None:
        lins = _lin_keys(_read_state(weights, WEIGHTS_OPTION))
        source = f"{WEIGHTS_OPTION} {weights}"
    else:
        lins = _lin_keys(backbone_state)
        source = f"{BACKBONE_OPTION} {backbone}"
        if not lins:
            raise EvaluationError(
                f"{source} holds no LPIPS linear layers (lin0.model.1.weight ...): give them with "
                f"{WEIGHTS_OPTION} (the lpips package's weights/v0.1/alex.pth)"
            )
    if not lins:
        raise EvaluationError(f"{source} holds no LPIPS linear layers (lin0.model.1.weight ... lin4.model.1.weight)")
    _load_into(model, lins, "lins.", source)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- pairs


def _as_input(frames: torch.Tensor, device) -> torch.Tensor:
    """[B, H, W, 3] uint8 or [0, 1] floats -> [B, 3, H, W] in [-1, 1]."""
    return (unit_frames(frames) * 2 - 1).permute(0, 3, 1, 2).to(device)


@torch.no_grad()
def lpips_pairwise(
    model: LPIPS, frames: torch.Tensor, prompt_index, mode: str = "middle", batch_size: int = 16
) -> PerPrompt:
    """Mean LPIPS over the pairs of each prompt's seeds (frames [N, F, H, W, 3])."""
    chosen = select_frames(frames, mode)
    device = model.shift.device
    out = {}
    for prompt, members in group_by_prompt(prompt_index).items():
        pairs = [(a, b, k) for i, a in enumerate(members) for b in members[i + 1 :] for k in range(chosen.shape[1])]
        if not pairs:
            continue
        total = 0.0
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            first = _as_input(torch.stack([chosen[a, k] for a, _, k in batch]), device)
            second = _as_input(torch.stack([chosen[b, k] for _, b, k in batch]), device)
            total += model(first, second).double().sum().item()
        out[prompt] = total / len(pairs)
    return out
