"""Wan checkpoint folders in any of their three layouts, opened for reading and checked.

Layouts (see also wan_formats):
- ``diffusers``: a ``WanTransformer3DModel`` folder (config.json + safetensors), or a pipeline
  root (model_index.json) with ``transformer/`` and, for Wan2.2 A14B, ``transformer_2/`` (the
  low-noise expert) and ``boundary_ratio`` in model_index.json;
- ``original``: Wan-Video's own names and config fields; Wan2.2 A14B as ``high_noise_model/`` +
  ``low_noise_model/``;
- ``mega``: the trainer's own format written by the converter: full tensors under the model's
  parameter names, config.json ``{"format": "phased-dmd-mega", "arch": "wan", "architecture":
  {...}}``; two experts as ``high_noise/`` + ``low_noise/`` with ``boundary_ratio`` on top.

Whatever the layout, a model's tensors are presented under diffusers names (``CheckpointView``),
so the one rule table of ``wan.diffusers_weight_rules`` builds the model's parameters, and every
tensor-parallel rank reads only its own slices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from phased_dmd_mega.models.shards import TORCH_DTYPES
from phased_dmd_mega.models.wan import WAN_PRESETS, WanArch, diffusers_weight_rules
from phased_dmd_mega.models.wan_formats import (
    CheckpointError,
    Shape,
    arch_differences,
    arch_from_diffusers_config,
    arch_from_json,
    arch_from_original_config,
    diffusers_shapes,
    is_diffusers_config,
    is_original_config,
    original_names,
)
from phased_dmd_mega.models.weights import (
    COLUMN,
    REPLICATED,
    TensorReader,
    WeightRule,
    build_local_tensor,
    split_interleaved_heads,
)

LAYOUTS = ("diffusers", "original", "mega")
MEGA_FORMAT = "phased-dmd-mega"
MEGA_FORMAT_VERSION = 1
SINGLE = "model"  # the key of a checkpoint's only model; two experts are "high" and "low"
EXPERTS = ("high", "low")
EXPERT_FOLDERS = {
    "mega": {"high": "high_noise", "low": "low_noise"},
    "original": {"high": "high_noise_model", "low": "low_noise_model"},
    "diffusers": {"high": "transformer", "low": "transformer_2"},
}
# Wan2.2 A14B: the expert boundary on the 0..1 noise scale, by input channels (T2V, I2V).
DEFAULT_BOUNDARY_RATIO = {16: 0.875, 36: 0.9}
_KEYS_LISTED = 50


# ----------------------------------------------------------------------------- safetensors folders


class SafetensorsFolder(TensorReader):
    """A TensorReader that also knows dtypes, and refuses inconsistent folders up front (an
    index naming absent shards or keys, several indexes, a key in two files)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{folder} has several safetensors indexes: {[p.name for p in indexes]}")
        if indexes:
            _check_index_files(indexes[0])
        elif not any(folder.glob("*.safetensors")):
            raise CheckpointError(f"no safetensors weights in {folder}")
        super().__init__(folder)
        if indexes:
            _check_index_keys(indexes[0], self.weight_map, self._handles)
        else:
            _check_no_duplicate_keys(folder, self._handles)

    def dtype(self, name: str) -> torch.dtype:
        code = self._handles[self._file(name)].get_slice(name).get_dtype()
        if code not in TORCH_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {self.folder} has unsupported dtype {code}")
        return TORCH_DTYPES[code]


def _check_index_files(index: Path) -> None:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{index} is not a safetensors index (JSON with a weight_map): {err}") from err
    absent = sorted({name for name in weight_map.values() if not (index.parent / name).is_file()})
    if absent:
        raise CheckpointError(f"{index} names shards that are not in {index.parent}: {absent}")


def _check_index_keys(index: Path, weight_map: Mapping[str, str], handles) -> None:
    held = {file: set(handle.keys()) for file, handle in handles.items()}
    not_there = sorted(key for key, file in weight_map.items() if key not in held[file])
    if not_there:
        raise CheckpointError(f"{index} lists tensors that its shards do not hold: {_listed(not_there)}")


def _check_no_duplicate_keys(folder: Path, handles) -> None:
    seen: Dict[str, str] = {}
    for file, handle in sorted(handles.items()):
        for key in handle.keys():
            if key in seen:
                raise CheckpointError(
                    f"tensor {key!r} is in both {seen[key]} and {file} in {folder} (one model per folder)"
                )
            seen[key] = file


# ----------------------------------------------------------------------------- the view


@dataclass(frozen=True)
class StoredAs:
    """Where a diffusers-named tensor is on disk: a key, or part ``part`` of ``parts`` of a
    tensor fused per head (the mega layout's qkv / kv)."""

    key: str
    part: int = 0
    parts: int = 1
    head_dim: int = 0


class CheckpointView(TensorReader):
    """A model's tensors under diffusers names, whatever the layout on disk. It is a
    TensorReader, so ``weights.build_local_tensor`` reads this rank's slices through it."""

    def __init__(self, files: SafetensorsFolder, layout: str, rules: List[WeightRule]):
        self.files, self.layout, self.rules = files, layout, rules
        self.folder = files.folder
        self.stored = _stored_names(layout, rules)

    # TensorReader's interface, diffusers names
    def keys(self) -> List[str]:
        return sorted(name for name, at in self.stored.items() if at.key in self.files.weight_map)

    def shape(self, name: str) -> Tuple[int, ...]:
        at = self.stored[name]
        shape = self.files.shape(at.key)
        return (shape[0] // at.parts, *shape[1:])

    def dtype(self, name: str) -> torch.dtype:
        return self.files.dtype(self.stored[name].key)

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        at = self.stored[name]
        if at.parts == 1:
            return self.files.read(at.key, dim, start, stop)
        if dim not in (None, 0):
            raise ValueError(f"{name!r} is fused per head in {self.folder}: only rows can be sliced")
        if dim is None:
            fused = self.files.read(at.key)
        else:  # whole heads of every part: rows [start, stop) of each part are contiguous here
            stop = self.shape(name)[0] if stop is None else stop
            fused = self.files.read(at.key, 0, start * at.parts, stop * at.parts)
        return split_interleaved_heads(fused, at.parts, at.head_dim)[at.part]

    # building the model's parameters
    def read_local(self, rule: WeightRule, rank: int, size: int) -> torch.Tensor:
        """This tensor-parallel rank's piece of the model parameter ``rule.own``."""
        if self.layout != "mega":
            return build_local_tensor(rule, self, rank, size)
        # Stored as built: a rank's heads are contiguous rows of the fused tensor.
        if rule.split == REPLICATED:
            return self.files.read(rule.own)
        dim = 0 if rule.split == COLUMN else 1
        per_rank = self.files.shape(rule.own)[dim] // size
        return self.files.read(rule.own, dim, rank * per_rank, (rank + 1) * per_rank)

    def read_full(self, rule: WeightRule) -> torch.Tensor:
        return self.read_local(rule, 0, 1)

    def own_shape(self, rule: WeightRule) -> Tuple[int, ...]:
        first = self.shape(rule.sources[0])
        return (first[0] * len(rule.sources), *first[1:])


def _stored_names(layout: str, rules: Iterable[WeightRule]) -> Dict[str, StoredAs]:
    rules = list(rules)
    sources = [source for rule in rules for source in rule.sources]
    if layout == "diffusers":
        return {name: StoredAs(name) for name in sources}
    if layout == "original":
        return {name: StoredAs(original) for name, original in original_names(sources).items()}
    if layout == "mega":
        stored = {}
        for rule in rules:
            for part, name in enumerate(rule.sources):
                stored[name] = StoredAs(rule.own, part, len(rule.sources), rule.head_dim)
        return stored
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


# ----------------------------------------------------------------------------- checks


def check_weights(view: CheckpointView, arch: WanArch, where: str) -> None:
    """Keys (missing and unexpected, listed), shapes (key, file's and config's) and dtypes
    (floating point; one dtype per fused tensor) against the architecture of ``where``."""
    expected = _expected_file_shapes(view, arch)
    available = set(view.files.weight_map)
    missing, unexpected = sorted(set(expected) - available), sorted(available - set(expected))
    if missing or unexpected:
        lines = [f"weights in {view.folder} do not match {where} ({_summary(arch)}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        raise CheckpointError("\n".join(lines))
    wrong = [
        f"  {key}: {view.files.shape(key)} in the weights, {shape} from the config"
        for key, shape in expected.items()
        if view.files.shape(key) != shape
    ]
    if wrong:
        raise CheckpointError(
            f"tensor shapes in {view.folder} do not match {where} ({_summary(arch)}):\n" + "\n".join(wrong)
        )
    _check_dtypes(view)


def _expected_file_shapes(view: CheckpointView, arch: WanArch) -> Dict[str, Shape]:
    shapes = diffusers_shapes(arch)
    expected: Dict[str, Shape] = {}
    for name, at in view.stored.items():
        shape = shapes[name]
        expected[at.key] = (shape[0] * at.parts, *shape[1:])
    return expected


def _check_dtypes(view: CheckpointView) -> None:
    not_float = [f"{key} ({view.files.dtype(key)})" for key in sorted(view.files.weight_map)
                 if not view.files.dtype(key).is_floating_point]
    if not_float:
        raise CheckpointError(f"weights in {view.folder} must be floating point: {_listed(not_float)}")
    for rule in view.rules:
        dtypes = {view.stored[s].key: view.dtype(s) for s in rule.sources}
        if len(set(dtypes.values())) > 1:
            found = ", ".join(f"{key} {dtype}" for key, dtype in dtypes.items())
            raise CheckpointError(
                f"dtype mismatch in {view.folder}: {found}; they are fused into {rule.own} and must share one dtype"
            )


def check_tensor_parallel(arch: WanArch, tensor_parallel: int, ulysses_parallel: int = 1) -> None:
    """Heads (and the MLP) must split evenly over the ranks."""
    if tensor_parallel < 1:
        raise CheckpointError(f"tensor parallel size must be positive, got {tensor_parallel}")
    ranks = tensor_parallel * ulysses_parallel
    what = f"tensor parallel size {tensor_parallel}" + (
        f" x Ulysses size {ulysses_parallel}" if ulysses_parallel > 1 else ""
    )
    if arch.num_heads % ranks:
        raise CheckpointError(
            f"{what} does not divide the {arch.num_heads} attention heads of this Wan model "
            f"(dim {arch.dim}, head_dim {arch.head_dim}); choose a size that divides {arch.num_heads}"
        )
    if arch.ffn_dim % tensor_parallel:
        raise CheckpointError(f"tensor parallel size {tensor_parallel} does not divide ffn_dim {arch.ffn_dim}")


def _summary(arch: WanArch) -> str:
    image = f", image_dim {arch.image_dim}" if arch.image_dim is not None else ""
    return (
        f"dim {arch.dim}, {arch.num_heads} heads, {arch.num_layers} layers, ffn_dim {arch.ffn_dim}, "
        f"in/out channels {arch.in_channels}/{arch.out_channels}{image}"
    )


def _listed(names: List[str]) -> str:
    shown = ", ".join(names[:_KEYS_LISTED])
    return shown + (f", ... ({len(names) - _KEYS_LISTED} more)" if len(names) > _KEYS_LISTED else "")


# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """What a folder holds: its layout, one folder per model (``{"model": ...}`` or
    ``{"high": ..., "low": ...}`` for Wan2.2 A14B) and the experts' boundary when stored."""

    root: Path
    layout: str
    folders: Dict[str, Path]
    boundary_ratio: Optional[float] = None
    top_config: Optional[Dict[str, Any]] = None  # model_index.json or the mega top config

    @property
    def has_experts(self) -> bool:
        return SINGLE not in self.folders

    def model_folder(self, expert: Optional[str]) -> Path:
        """The folder of ``expert`` ("high" / "low"; None for a single-model checkpoint)."""
        if self.has_experts:
            if expert not in EXPERTS:
                raise CheckpointError(
                    f"{self.root} holds two experts (high and low noise): pass expert='high' or "
                    f"expert='low' (got {expert!r})"
                )
            return self.folders[expert]
        if expert is not None:
            raise CheckpointError(f"expert={expert!r} given, but {self.root} holds a single model, not two experts")
        return self.folders[SINGLE]


def inspect_checkpoint(path) -> Checkpoint:
    """Tell the layout of ``path`` and find its models, without reading any weights."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root} {'is not a folder' if root.exists() else 'does not exist'}")
    found = _layout_markers(root)
    if len(found) > 1:
        raise CheckpointError(f"the layout of {root} is ambiguous: it has {' and '.join(found)}")
    if not found:
        raise CheckpointError(
            f"cannot tell the layout of {root}: expected a config.json (diffusers WanTransformer3DModel, "
            f"original Wan, or {MEGA_FORMAT}), a diffusers pipeline (model_index.json with transformer/), "
            f"or Wan2.2 A14B expert folders (high_noise_model/ and low_noise_model/)"
        )
    if found[0] == "model_index.json":
        return _diffusers_pipeline(root)
    if found[0] == "config.json":
        return _single_config_folder(root)
    return _original_experts(root)


def _layout_markers(root: Path) -> List[str]:
    found = [name for name in ("config.json", "model_index.json") if (root / name).is_file()]
    experts = [f"{name}/" for name in EXPERT_FOLDERS["original"].values() if (root / name).is_dir()]
    if experts:
        found.append(" + ".join(experts))
    return found


def read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def config_layout(config: Mapping[str, Any], path: Path) -> str:
    if "format" in config:
        if config["format"] != MEGA_FORMAT:
            raise CheckpointError(f"{path}: unknown format {config['format']!r} (expected {MEGA_FORMAT!r})")
        return "mega"
    if is_diffusers_config(config):
        return "diffusers"
    if is_original_config(config):
        return "original"
    raise CheckpointError(
        f"{path} is neither a diffusers WanTransformer3DModel config, an original Wan config "
        f"(dim, num_heads, ...) nor a {MEGA_FORMAT} config (_class_name: {config.get('_class_name')!r})"
    )


def _single_config_folder(root: Path) -> Checkpoint:
    config = read_json(root / "config.json")
    layout = config_layout(config, root / "config.json")
    if layout == "mega" and "experts" in config:
        experts = config["experts"]
        if not isinstance(experts, dict) or set(experts) != set(EXPERTS):
            raise CheckpointError(f"{root / 'config.json'}: experts must map 'high' and 'low' to folders")
        folders = {name: root / sub for name, sub in experts.items()}
        _require_folders(folders, root)
        return Checkpoint(root, layout, folders, config.get("boundary_ratio"), config)
    return Checkpoint(root, layout, {SINGLE: root}, None, config if layout == "mega" else None)


def _diffusers_pipeline(root: Path) -> Checkpoint:
    index = read_json(root / "model_index.json")
    high, low = (root / EXPERT_FOLDERS["diffusers"][e] for e in EXPERTS)
    if not high.is_dir():
        raise CheckpointError(f"{root} has a model_index.json but no transformer/ folder")
    if not low.is_dir():
        return Checkpoint(root, "diffusers", {SINGLE: high}, None, index)
    return Checkpoint(root, "diffusers", {"high": high, "low": low}, index.get("boundary_ratio"), index)


def _original_experts(root: Path) -> Checkpoint:
    folders = {name: root / sub for name, sub in EXPERT_FOLDERS["original"].items()}
    _require_folders(folders, root)
    return Checkpoint(root, "original", folders, None, None)


def _require_folders(folders: Mapping[str, Path], root: Path) -> None:
    absent = [str(folder) for folder in folders.values() if not folder.is_dir()]
    if absent:
        raise CheckpointError(f"{root} holds two experts but {', '.join(absent)} is missing")


def expert_boundary_ratio(checkpoint: Checkpoint, arch: WanArch) -> float:
    """The stored boundary, or Wan2.2's default for the input channels (0.875 T2V, 0.9 I2V)."""
    if checkpoint.boundary_ratio is not None:
        return float(checkpoint.boundary_ratio)
    if arch.in_channels not in DEFAULT_BOUNDARY_RATIO:
        raise CheckpointError(
            f"{checkpoint.root} stores no boundary_ratio and Wan has no default for {arch.in_channels} "
            f"input channels (known: {DEFAULT_BOUNDARY_RATIO}); give one explicitly"
        )
    return DEFAULT_BOUNDARY_RATIO[arch.in_channels]


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelFiles:
    """One model of a checkpoint, opened and checked: its architecture and a view of its
    tensors under diffusers names."""

    folder: Path
    layout: str
    arch: WanArch
    config: Dict[str, Any]
    view: CheckpointView

    @property
    def rules(self) -> List[WeightRule]:
        return self.view.rules


def open_model(folder: Path, layout: str, arch: Optional[str] = None) -> ModelFiles:
    """Read ``folder``'s config, check its weights against it, and (with a preset name in
    ``arch``) that it is that preset. Nothing but safetensors headers is read."""
    config_path = Path(folder) / "config.json"
    config = read_json(config_path)
    found = config_layout(config, config_path)
    if found != layout:
        raise CheckpointError(f"{config_path} is a {found} config inside a {layout} checkpoint")
    files = SafetensorsFolder(folder)
    if layout == "diffusers":
        found_arch = arch_from_diffusers_config(config, str(config_path))
    elif layout == "original":
        image_shapes = {key: files.shape(key) for key in files.weight_map if key.startswith("img_emb.")}
        found_arch = arch_from_original_config(config, image_shapes, str(config_path))
    else:
        found_arch = _mega_arch(config, config_path)
    found_arch = resolve_arch(found_arch, arch, str(config_path))
    view = CheckpointView(files, layout, diffusers_weight_rules(found_arch))
    check_weights(view, found_arch, str(config_path))
    return ModelFiles(Path(folder), layout, found_arch, config, view)


def _mega_arch(config: Mapping[str, Any], path: Path) -> WanArch:
    if config.get("arch") != "wan":
        raise CheckpointError(f"{path}: arch {config.get('arch')!r} is not supported (only 'wan')")
    if "architecture" not in config:
        raise CheckpointError(f"{path}: no 'architecture' in a {MEGA_FORMAT} model config")
    try:
        return arch_from_json(config["architecture"], str(path))
    except TypeError as err:
        raise CheckpointError(f"{path}: bad architecture: {err}") from err


def resolve_arch(found: WanArch, requested: Optional[str], where: str) -> WanArch:
    """``requested`` None or "wan": the folder's own architecture; a preset name: the folder's
    architecture must be that preset."""
    if requested in (None, "wan"):
        return found
    if requested not in WAN_PRESETS:
        raise CheckpointError(f"unknown arch {requested!r}: expected 'wan' or a preset ({', '.join(WAN_PRESETS)})")
    preset = WAN_PRESETS[requested]
    if found != preset:
        raise CheckpointError(f"{where} is not preset {requested!r}: {arch_differences(found, preset)}")
    return found
