"""Weight conversion between Hugging Face layouts and the trainer's own ("mega") format, for
every registered architecture (``models.architectures``: Wan, Qwen-Image).

``hf_to_mega`` reads a diffusers checkpoint (a transformer folder or a pipeline root), or an
original Wan one (one model, or the two Wan2.2 A14B experts), and writes the mega format: full
tensors under the model's parameter names, fused per head exactly as the weight rule table
builds them at TP 1, sharded safetensors with an index, and a config.json naming the
family ("family") with its numbers and where it came from. ``mega_to_hf`` writes a diffusers
(or, for Wan, original) folder back; the round trip is bitwise (dtypes kept per tensor).

Everything is checked before anything is written (layout, config against weights, keys,
shapes, dtypes, tensor parallel size); the output is built in a hidden folder beside the
destination and renamed at the end, so a failure leaves no destination behind. Tensors are
read and written one rule at a time: memory is bounded by the largest tensor, not the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch

from phased_dmd_mega import __version__
from phased_dmd_mega.files import check_destination, staging_folder, write_json
from phased_dmd_mega.log import get_logger
from phased_dmd_mega.models.architectures import Architecture, CheckpointError
from phased_dmd_mega.models.checkpoints import (
    EXPERT_FOLDERS,
    MEGA_FORMAT,
    MEGA_FORMAT_VERSION,
    SINGLE,
    Checkpoint,
    ModelFiles,
    check_tensor_parallel,
    expert_boundary_ratio,
    inspect_checkpoint,
    open_model,
)
from phased_dmd_mega.models.shards import DEFAULT_MAX_SHARD_BYTES, TensorEntry, write_sharded
from phased_dmd_mega.models.weights import split_interleaved_heads

log = get_logger(__name__)

PathLike = Union[str, Path]
TARGETS = ("mega", "diffusers", "original")
SHARD_PREFIX = {"mega": "model", "diffusers": "diffusion_pytorch_model", "original": "diffusion_pytorch_model"}


def hf_to_mega(
    src: PathLike,
    dst: PathLike,
    *,
    expect: Optional[str] = "wan",
    tensor_parallel: int = 1,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    boundary_ratio: Optional[float] = None,
) -> Path:
    """A Hugging Face checkpoint -> the mega format in ``dst``. ``expect``, what the source must
    hold: "wan", "qwen_image", a preset name of either (the source must be that preset), or None
    (whatever the source's config says). ``tensor_parallel`` is checked against the heads and recorded;
    ``boundary_ratio`` overrides the source's (two experts only)."""
    checkpoint = inspect_checkpoint(src, expect)
    if checkpoint.layout == "mega":
        raise CheckpointError(f"{src} is already in the trainer's format ({MEGA_FORMAT}); use mega-to-hf")
    return convert(
        checkpoint,
        dst,
        to="mega",
        expect=expect,
        tensor_parallel=tensor_parallel,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        boundary_ratio=boundary_ratio,
    )


def mega_to_hf(
    src: PathLike,
    dst: PathLike,
    *,
    layout: str = "diffusers",
    expect: Optional[str] = "wan",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """The mega format -> a diffusers or (Wan only) original (``layout``) checkpoint in ``dst``;
    ``expect`` as for ``hf_to_mega``."""
    if layout not in ("diffusers", "original"):
        raise CheckpointError(f"unknown layout {layout!r}: expected diffusers or original")
    checkpoint = inspect_checkpoint(src, expect)
    if checkpoint.layout != "mega":
        raise CheckpointError(
            f"{src} is a {checkpoint.layout} checkpoint, not {MEGA_FORMAT}; mega-to-hf reads the "
            f"trainer's format (hf-to-mega goes the other way)"
        )
    return convert(checkpoint, dst, to=layout, expect=expect, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def convert(
    source: Union[PathLike, Checkpoint],
    dst: PathLike,
    *,
    to: str,
    expect: Optional[str] = "wan",
    tensor_parallel: int = 1,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    boundary_ratio: Optional[float] = None,
) -> Path:
    """Any layout -> ``to`` (mega, diffusers or original); see the module docstring."""
    if to not in TARGETS:
        raise CheckpointError(f"unknown target layout {to!r}: expected one of {TARGETS}")
    checkpoint = source if isinstance(source, Checkpoint) else inspect_checkpoint(source, expect)
    architecture = checkpoint.architecture
    layouts = architecture.hf_layouts + ("mega",)
    if to not in layouts:
        raise CheckpointError(
            f"{checkpoint.root} is {architecture.title}, which has no {to} layout (it has {', '.join(layouts)})"
        )
    dst = Path(dst)
    check_destination(checkpoint.root, dst, overwrite, CheckpointError)
    models = {
        name: open_model(folder, checkpoint.layout, expect, architecture) for name, folder in checkpoint.folders.items()
    }
    for files in models.values():
        check_tensor_parallel(files.dims, tensor_parallel)
    ratio = _experts_boundary(checkpoint, models, boundary_ratio)
    with staging_folder(dst, overwrite, CheckpointError) as staging:
        for name, files in models.items():
            folder = staging if name == SINGLE else staging / EXPERT_FOLDERS[to][name]
            log.info("converting %s (%s) -> %s", files.folder, files.layout, to)
            write_model(folder, files, to, tensor_parallel, max_shard_bytes)
        if checkpoint.has_experts:
            _write_experts_index(staging, checkpoint, models, to, ratio, tensor_parallel)
    log.info("wrote %s", dst)
    return dst


def _experts_boundary(checkpoint: Checkpoint, models: Dict[str, ModelFiles], override: Optional[float]):
    if not checkpoint.has_experts:
        if override is not None:
            raise CheckpointError(f"boundary_ratio given, but {checkpoint.root} holds a single model")
        return None
    ratio = override if override is not None else expert_boundary_ratio(checkpoint, models["high"].dims)
    if not 0.0 < ratio < 1.0:
        raise CheckpointError(f"boundary_ratio {ratio} must be between 0 and 1")
    return ratio


# ----------------------------------------------------------------------------- one model


def write_model(folder: Path, files: ModelFiles, to: str, tensor_parallel: int, max_shard_bytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if to == "mega":
        entries, tensors = _mega_tensors(files)
    else:
        entries, tensors = _hf_tensors(files, to)
    write_sharded(folder, SHARD_PREFIX[to], entries, tensors, max_shard_bytes, report=log.info)
    config = _mega_config(files, tensor_parallel) if to == "mega" else _hf_config(files, to)
    write_json(folder / "config.json", config)


def _mega_tensors(files: ModelFiles) -> Tuple[List[TensorEntry], Iterator[Tuple[str, torch.Tensor]]]:
    view = files.view
    entries = [TensorEntry(rule.own, view.dtype(rule.sources[0]), view.own_shape(rule)) for rule in files.rules]
    return entries, ((rule.own, view.read_full(rule)) for rule in files.rules)


def _hf_tensors(files: ModelFiles, to: str) -> Tuple[List[TensorEntry], Iterator[Tuple[str, torch.Tensor]]]:
    view = files.view
    sources = [source for rule in files.rules for source in rule.sources]
    names = files.architecture.original.names(sources) if to == "original" else {s: s for s in sources}
    entries = [TensorEntry(names[s], view.dtype(s), view.shape(s)) for s in sources]

    def tensors():
        for rule in files.rules:
            full = view.read_full(rule)
            parts = split_interleaved_heads(full, len(rule.sources), rule.head_dim) if len(rule.sources) > 1 else [full]
            for source, part in zip(rule.sources, parts):
                yield names[source], part

    return entries, tensors()


def _mega_config(files: ModelFiles, tensor_parallel: int) -> Dict[str, Any]:
    return {
        "format": MEGA_FORMAT,
        "format_version": MEGA_FORMAT_VERSION,
        "family": files.architecture.name,
        "architecture": files.architecture.dims_to_json(files.dims),
        "tensor_parallel": tensor_parallel,
        "provenance": _provenance(files),
    }


def _provenance(files: ModelFiles) -> Dict[str, Any]:
    if files.layout == "mega":  # mega -> mega keeps the first source
        return files.config.get("provenance", {})
    return {
        "source": str(files.folder.resolve()),
        "source_layout": files.layout,
        "source_config": files.config,
        "converter": f"phased-dmd-mega {__version__}",
    }


def _hf_config(files: ModelFiles, to: str) -> Dict[str, Any]:
    source = _source_config(files, to)
    if to == "diffusers":
        return files.architecture.diffusers_config(files.dims, source)
    return files.architecture.original.config(files.dims, source)


def _source_config(files: ModelFiles, layout: str) -> Optional[Dict[str, Any]]:
    """The config the weights came from, when it was in ``layout`` (its non-architecture fields
    such as model_type or rope_max_seq_len are kept)."""
    if files.layout == layout:
        return files.config
    provenance = files.config.get("provenance", {}) if files.layout == "mega" else {}
    return provenance.get("source_config") if provenance.get("source_layout") == layout else None


# ----------------------------------------------------------------------------- two experts


def _write_experts_index(
    staging: Path, checkpoint: Checkpoint, models: Dict[str, ModelFiles], to: str, ratio: float, tensor_parallel: int
) -> None:
    if to == "mega":
        write_json(
            staging / "config.json",
            {
                "format": MEGA_FORMAT,
                "format_version": MEGA_FORMAT_VERSION,
                "family": checkpoint.architecture.name,
                "experts": dict(EXPERT_FOLDERS["mega"]),
                "boundary_ratio": ratio,
                "tensor_parallel": tensor_parallel,
                "provenance": _experts_provenance(checkpoint),
            },
        )
    elif to == "diffusers":
        index = model_index(checkpoint.architecture, models["high"].dims, ratio, pipeline_source_index(checkpoint))
        write_json(staging / "model_index.json", index)
    else:
        log.warning("the original Wan layout stores no boundary_ratio (it was %s)", ratio)


def _experts_provenance(checkpoint: Checkpoint) -> Dict[str, Any]:
    if checkpoint.layout == "mega":
        return (checkpoint.top_config or {}).get("provenance", {})
    return {
        "source": str(checkpoint.root.resolve()),
        "source_layout": checkpoint.layout,
        "source_index": checkpoint.top_config,
        "converter": f"phased-dmd-mega {__version__}",
    }


def pipeline_source_index(checkpoint: Checkpoint) -> Optional[Dict[str, Any]]:
    """The diffusers model_index.json that ``checkpoint``'s weights came from: its own, or the
    one a mega checkpoint recorded; None when there was none."""
    if checkpoint.layout == "diffusers":
        return checkpoint.top_config
    if checkpoint.layout == "mega":
        provenance = (checkpoint.top_config or {}).get("provenance", {})
        return provenance.get("source_index") if provenance.get("source_layout") == "diffusers" else None
    return None


def model_index(
    architecture: Architecture, dims, ratio: float, source: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """A model_index.json for the two transformers only (the other pipeline components are
    not part of the conversion); ``source``: the model_index.json the weights came from, whose
    pipeline class and diffusers version are kept."""
    default_class = architecture.experts.pipeline_class(dims)
    index = {"_class_name": (source or {}).get("_class_name", default_class)}
    if source and "_diffusers_version" in source:
        index["_diffusers_version"] = source["_diffusers_version"]
    transformer = ["diffusers", architecture.diffusers_class]
    index.update(boundary_ratio=ratio, transformer=transformer, transformer_2=transformer)
    index.update(architecture.experts.pipeline_settings(dims))
    return index
