"""Checkpoint folders of any registered architecture (Wan, Qwen-Image) in any of their layouts,
opened for reading and checked.

Layouts (the architecture's adapter, ``architectures``, says which it has):
- ``diffusers``: a transformer folder (config.json + safetensors: ``WanTransformer3DModel``,
  ``QwenImageTransformer2DModel``), or a pipeline root (model_index.json) with ``transformer/``
  and, for Wan2.2 A14B, ``transformer_2/`` (the low-noise expert) and ``boundary_ratio`` in
  model_index.json;
- ``original`` (Wan only): Wan-Video's own names and config fields; Wan2.2 A14B as
  ``high_noise_model/`` + ``low_noise_model/``;
- ``mega``: the trainer's own format written by the converter: full tensors under the model's
  parameter names, config.json ``{"format": "phased-dmd-mega", "family": "wan" | "qwen_image",
  "architecture": {...}}`` (older versions wrote the family as "arch", still read); two experts
  (Wan) as ``high_noise/`` + ``low_noise/`` with ``boundary_ratio`` on top.

The config says which architecture a folder holds (its ``_class_name``, or the mega ``family``).
Whatever the layout, a model's tensors are presented under diffusers names (``CheckpointView``),
so the architecture's one rule table builds the model's parameters, and every tensor-parallel
rank reads only its own slices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from phased_dmd_mega.errors import DamagedFileError
from phased_dmd_mega.files import read_json
from phased_dmd_mega.models.architecture_types import MEGA_FORMAT, Architecture, CheckpointError, Shape
from phased_dmd_mega.models.architectures import (
    architecture_of,
    check_requested_family,
    check_requested_name,
    get_architecture,
    registry,
)
from phased_dmd_mega.models.shards import TORCH_DTYPES
from phased_dmd_mega.models.weights import (
    COLUMN,
    REPLICATED,
    TensorReader,
    WeightRule,
    build_local_tensor,
    key_mismatch_lines,
    split_interleaved_heads,
)

LAYOUTS = ("diffusers", "original", "mega")
MEGA_FORMAT_VERSION = 1
SINGLE = "model"  # the key of a checkpoint's only model; two experts are "high" and "low"
EXPERTS = ("high", "low")
# Two-expert checkpoints (architectures with ExpertPairs: Wan2.2 A14B): each expert's folder per layout.
EXPERT_FOLDERS = {
    "mega": {"high": "high_noise", "low": "low_noise"},
    "original": {"high": "high_noise_model", "low": "low_noise_model"},
    "diffusers": {"high": "transformer", "low": "transformer_2"},
}
_KEYS_LISTED = 50


# ----------------------------------------------------------------------------- safetensors folders


class SafetensorsFolder(TensorReader):
    """A TensorReader that also knows dtypes, and refuses inconsistent folders up front (an
    index naming absent shards (a DamagedFileError) or keys, several indexes, a key in two
    files)."""

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
        raise DamagedFileError(f"{index} names shards that are not in {index.parent}: {absent}")


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

    def __init__(self, files: SafetensorsFolder, layout: str, architecture: Architecture, dims):
        self.files, self.layout, self.architecture = files, layout, architecture
        self.rules: List[WeightRule] = architecture.weight_rules(dims)
        self.folder = files.folder
        self.stored = _stored_names(layout, self.rules, architecture)

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


def _stored_names(layout: str, rules: Iterable[WeightRule], architecture: Architecture) -> Dict[str, StoredAs]:
    rules = list(rules)
    sources = [source for rule in rules for source in rule.sources]
    if layout == "diffusers":
        return {name: StoredAs(name) for name in sources}
    if layout == "original" and architecture.original is not None:
        return {name: StoredAs(original) for name, original in architecture.original.names(sources).items()}
    if layout == "mega":
        stored = {}
        for rule in rules:
            for part, name in enumerate(rule.sources):
                stored[name] = StoredAs(rule.own, part, len(rule.sources), rule.head_dim)
        return stored
    raise ValueError(
        f"unknown layout {layout!r} for {architecture.title}; expected one of {architecture.hf_layouts + ('mega',)}"
    )


# ----------------------------------------------------------------------------- checks


def check_weights(view: CheckpointView, dims, where: str) -> None:
    """Keys (missing and unexpected, listed), shapes (key, file's and config's) and dtypes
    (floating point; one dtype per fused tensor) against the architecture of ``where``."""
    expected = _expected_file_shapes(view, dims)
    summary = view.architecture.summary(dims)
    lines = key_mismatch_lines(expected, view.files.weight_map, _listed)
    if lines:
        raise CheckpointError("\n".join([f"weights in {view.folder} do not match {where} ({summary}):", *lines]))
    wrong = [
        f"  {key}: {view.files.shape(key)} in the weights, {shape} from the config"
        for key, shape in expected.items()
        if view.files.shape(key) != shape
    ]
    if wrong:
        raise CheckpointError(f"tensor shapes in {view.folder} do not match {where} ({summary}):\n" + "\n".join(wrong))
    _check_dtypes(view)


def _expected_file_shapes(view: CheckpointView, dims) -> Dict[str, Shape]:
    shapes = view.architecture.diffusers_shapes(dims)
    expected: Dict[str, Shape] = {}
    for name, at in view.stored.items():
        shape = shapes[name]
        expected[at.key] = (shape[0] * at.parts, *shape[1:])
    return expected


def _check_dtypes(view: CheckpointView) -> None:
    not_float = [
        f"{key} ({view.files.dtype(key)})"
        for key in sorted(view.files.weight_map)
        if not view.files.dtype(key).is_floating_point
    ]
    if not_float:
        raise CheckpointError(f"weights in {view.folder} must be floating point: {_listed(not_float)}")
    for rule in view.rules:
        dtypes = {view.stored[s].key: view.dtype(s) for s in rule.sources}
        if len(set(dtypes.values())) > 1:
            found = ", ".join(f"{key} {dtype}" for key, dtype in dtypes.items())
            raise CheckpointError(
                f"dtype mismatch in {view.folder}: {found}; they are fused into {rule.own} and must share one dtype"
            )


def check_tensor_parallel(dims, tensor_parallel: int, ulysses_parallel: int = 1) -> None:
    """Heads (and the MLP) must split evenly over the ranks (any architecture: both have
    num_heads, dim, head_dim and ffn_dim)."""
    if tensor_parallel < 1:
        raise CheckpointError(f"tensor parallel size must be positive, got {tensor_parallel}")
    ranks = tensor_parallel * ulysses_parallel
    what = f"tensor parallel size {tensor_parallel}" + (
        f" x Ulysses size {ulysses_parallel}" if ulysses_parallel > 1 else ""
    )
    if dims.num_heads % ranks:
        raise CheckpointError(
            f"{what} does not divide the {dims.num_heads} attention heads of this {architecture_of(dims).title} model "
            f"(dim {dims.dim}, head_dim {dims.head_dim}); choose a size that divides {dims.num_heads}"
        )
    if dims.ffn_dim % tensor_parallel:
        raise CheckpointError(f"tensor parallel size {tensor_parallel} does not divide ffn_dim {dims.ffn_dim}")


def _listed(names: List[str]) -> str:
    shown = ", ".join(names[:_KEYS_LISTED])
    return shown + (f", ... ({len(names) - _KEYS_LISTED} more)" if len(names) > _KEYS_LISTED else "")


# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """What a folder holds: its layout and architecture, one folder per model (``{"model": ...}``
    or ``{"high": ..., "low": ...}`` for Wan2.2 A14B) and the experts' boundary when stored."""

    root: Path
    layout: str
    architecture: Architecture
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


def inspect_checkpoint(path, expect: Optional[str] = None) -> Checkpoint:
    """Tell the layout and architecture of ``path`` and find its models, reading configs but no
    weights. ``expect`` (a family or preset name; None: any) must name the folder's family;
    whether the folder is that preset is checked when a model is opened."""
    check_requested_name(expect)
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root} {'is not a folder' if root.exists() else 'does not exist'}")
    found = _layout_markers(root)
    if len(found) > 1:
        raise CheckpointError(f"the layout of {root} is ambiguous: it has {' and '.join(found)}")
    if not found:
        configs = ", ".join(_config_descriptions())
        raise CheckpointError(
            f"cannot tell the layout of {root}: expected a config.json ({configs} or a {MEGA_FORMAT} config), a "
            f"diffusers pipeline (model_index.json with transformer/), or Wan2.2 A14B expert folders "
            f"(high_noise_model/ and low_noise_model/)"
        )
    if found[0] == "model_index.json":
        return _diffusers_pipeline(root, expect)
    if found[0] == "config.json":
        return _single_config_folder(root, expect)
    return _original_experts(root, expect)


def _layout_markers(root: Path) -> List[str]:
    found = [name for name in ("config.json", "model_index.json") if (root / name).is_file()]
    experts = [f"{name}/" for name in EXPERT_FOLDERS["original"].values() if (root / name).is_dir()]
    if experts:
        found.append(" + ".join(experts))
    return found


def config_kind(config: Mapping[str, Any], path: Path, requested: Optional[str] = None) -> Tuple[str, Architecture]:
    """The layout ("diffusers", "original", "mega") and architecture of a model's config.json;
    ``requested`` (a family or preset name, or None) must name that family."""
    layout, architecture = _classify_config(config, path)
    check_requested_family(architecture, f"{path} is {_described(layout, architecture)}", requested)
    return layout, architecture


def _classify_config(config: Mapping[str, Any], path: Path) -> Tuple[str, Architecture]:
    if "format" in config:
        if config["format"] != MEGA_FORMAT:
            raise CheckpointError(f"{path}: unknown format {config['format']!r} (expected {MEGA_FORMAT!r})")
        return "mega", get_architecture(mega_family(config), str(path))
    kinds = [(adapter.hf_layout_of(config), adapter) for adapter in registry().values()]
    kinds = [(layout, adapter) for layout, adapter in kinds if layout is not None]
    if len(kinds) > 1:
        claims = " or ".join(_described(layout, adapter) for layout, adapter in kinds)
        raise CheckpointError(f"{path} is ambiguous: it could be {claims}; give its _class_name")
    if not kinds:
        configs = _config_descriptions()
        raise CheckpointError(
            f"{path} is neither {', '.join(configs)} nor a {MEGA_FORMAT} config "
            f"(_class_name: {config.get('_class_name')!r})"
        )
    return kinds[0]


def mega_family(config: Mapping[str, Any]) -> Optional[str]:
    """A mega config's family: "family", or "arch" in folders written by older versions."""
    return config.get("family", config.get("arch"))


def _config_descriptions() -> List[str]:
    return [description for adapter in registry().values() for description in adapter.config_descriptions()]


def _described(layout: str, architecture: Architecture) -> str:
    if layout == "mega":
        return f"a {MEGA_FORMAT} {architecture.name!r} config"
    if layout == "original":
        return architecture.original.description
    return f"a diffusers {architecture.diffusers_class} config"


def _single_config_folder(root: Path, requested: Optional[str]) -> Checkpoint:
    config = read_json(root / "config.json", CheckpointError)
    layout, architecture = config_kind(config, root / "config.json", requested)
    if layout == "mega" and "experts" in config:
        _require_expert_pairs(architecture, root)
        experts = config["experts"]
        if not isinstance(experts, dict) or set(experts) != set(EXPERTS):
            raise CheckpointError(f"{root / 'config.json'}: experts must map 'high' and 'low' to folders")
        folders = {name: root / sub for name, sub in experts.items()}
        _require_folders(folders, root)
        return Checkpoint(root, layout, architecture, folders, config.get("boundary_ratio"), config)
    return Checkpoint(root, layout, architecture, {SINGLE: root}, None, config if layout == "mega" else None)


def _diffusers_pipeline(root: Path, requested: Optional[str]) -> Checkpoint:
    index = read_json(root / "model_index.json", CheckpointError)
    high, low = (root / EXPERT_FOLDERS["diffusers"][e] for e in EXPERTS)
    if not high.is_dir():
        raise CheckpointError(f"{root} has a model_index.json but no transformer/ folder")
    _, architecture = config_kind(read_json(high / "config.json", CheckpointError), high / "config.json", requested)
    if not low.is_dir():
        return Checkpoint(root, "diffusers", architecture, {SINGLE: high}, None, index)
    _require_expert_pairs(architecture, root)
    return Checkpoint(root, "diffusers", architecture, {"high": high, "low": low}, index.get("boundary_ratio"), index)


def _original_experts(root: Path, requested: Optional[str]) -> Checkpoint:
    folders = {name: root / sub for name, sub in EXPERT_FOLDERS["original"].items()}
    _require_folders(folders, root)
    config_path = folders["high"] / "config.json"
    _, architecture = config_kind(read_json(config_path, CheckpointError), config_path, requested)
    _require_expert_pairs(architecture, root)
    return Checkpoint(root, "original", architecture, folders, None, None)


def _require_folders(folders: Mapping[str, Path], root: Path) -> None:
    absent = [str(folder) for folder in folders.values() if not folder.is_dir()]
    if absent:
        raise CheckpointError(f"{root} holds two experts but {', '.join(absent)} is missing")


def _require_expert_pairs(architecture: Architecture, root: Path) -> None:
    if architecture.experts is None:
        raise CheckpointError(
            f"{root} is laid out as two experts (high and low noise), but a {architecture.title} checkpoint "
            f"holds one model"
        )


def expert_boundary_ratio(checkpoint: Checkpoint, dims) -> float:
    """The stored boundary, or the architecture's default (Wan2.2: 0.875 T2V, 0.9 I2V)."""
    if checkpoint.boundary_ratio is not None:
        return float(checkpoint.boundary_ratio)
    default = checkpoint.architecture.experts.default_boundary_ratio(dims)
    if default is None:
        raise CheckpointError(
            f"{checkpoint.root} stores no boundary_ratio and {checkpoint.architecture.title} has no default for "
            f"{dims.in_channels} input channels; give one explicitly"
        )
    return default


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelFiles:
    """One model of a checkpoint, opened and checked: its architecture and a view of its
    tensors under diffusers names."""

    folder: Path
    layout: str
    dims: Any  # the architecture's dims class (WanDims, QwenImageDims)
    config: Dict[str, Any]
    view: CheckpointView

    @property
    def architecture(self) -> Architecture:
        return self.view.architecture

    @property
    def rules(self) -> List[WeightRule]:
        return self.view.rules


def open_model(
    folder: Path, layout: str, expect: Optional[str] = None, architecture: Optional[Architecture] = None
) -> ModelFiles:
    """Read ``folder``'s config, check its weights against it, and (with a preset name in
    ``expect``) that it is that preset. ``architecture``: the one its checkpoint was found to be
    (every model of a checkpoint is of one architecture). Nothing but safetensors headers is read."""
    config_path = Path(folder) / "config.json"
    config = read_json(config_path, CheckpointError)
    found, found_architecture = config_kind(config, config_path, expect)
    if found != layout:
        raise CheckpointError(f"{config_path} is a {found} config inside a {layout} checkpoint")
    if architecture is not None and found_architecture is not architecture:
        raise CheckpointError(
            f"{config_path} is a {found_architecture.title} model inside a {architecture.title} checkpoint"
        )
    files = SafetensorsFolder(folder)
    found_dims = _dims_from_config(found_architecture, layout, config, files, config_path)
    found_dims = found_architecture.check_preset(found_dims, expect, str(config_path))
    view = CheckpointView(files, layout, found_architecture, found_dims)
    check_weights(view, found_dims, str(config_path))
    return ModelFiles(Path(folder), layout, found_dims, config, view)


def _dims_from_config(
    architecture: Architecture, layout: str, config: Mapping[str, Any], files: SafetensorsFolder, path: Path
):
    if layout == "diffusers":
        return architecture.dims_from_diffusers_config(config, str(path))
    if layout == "original":
        # Some original configs leave a choice to the weights (Wan2.1 vs Wan2.2 I2V): their shapes go along.
        shapes = {key: files.shape(key) for key in files.weight_map}
        return architecture.original.dims_from_config(config, shapes, str(path))
    if "architecture" not in config:
        raise CheckpointError(f"{path}: no 'architecture' in a {MEGA_FORMAT} model config")
    return architecture.dims_from_json(config["architecture"], str(path))
