"""Writing sharded safetensors folders one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once. Here the shard
plan (names, dtypes, shapes) is known before any data is read, so each file's header is written
first and the tensors are streamed after it: memory stays bounded by the largest tensor. The
files are plain safetensors (8-byte little-endian header length, JSON header, data), with the
usual ``<prefix>-0000i-of-0000N.safetensors`` names and ``<prefix>.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

import torch

from phased_dmd_mega.files import write_json
from phased_dmd_mega.progress import Progress

SAFETENSORS_DTYPES: Dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES: Dict[str, torch.dtype] = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the plan: what will be written, before its data is read."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str) -> int:
    """'5GB', '500MB', '64KiB' or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"shard size {text!r} is not a size like 5GB, 500MB or 1048576")
    number, prefix, unit = match.groups()
    base = 1024 if unit and unit.upper() == "IB" else 1000
    power = "KMGT".index(prefix.upper()) + 1 if prefix else 0
    size = int(float(number) * base**power)
    if size <= 0:
        raise ValueError(f"shard size {text!r} must be positive")
    return size


def plan_shards(entries: Sequence[TensorEntry], max_shard_bytes: int) -> List[List[TensorEntry]]:
    """Consecutive entries grouped into files of at most ``max_shard_bytes`` (a tensor larger
    than that gets a file of its own)."""
    shards: List[List[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_file_names(prefix: str, count: int) -> List[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_sharded(
    folder: Path,
    prefix: str,
    entries: Sequence[TensorEntry],
    tensors: Iterable[Tuple[str, torch.Tensor]],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    report: Callable[[str], None] = lambda message: None,
) -> List[str]:
    """Write ``tensors`` (yielded in the order of ``entries``) as safetensors shards in
    ``folder``, plus an index when there is more than one; returns the file names. ``report``
    gets a line per file written; a progress bar counts the bytes."""
    shards = plan_shards(entries, max_shard_bytes)
    names = shard_file_names(prefix, len(shards))
    stream = iter(tensors)
    total = sum(e.nbytes for e in entries)
    with Progress(total, f"writing {Path(folder).name}", "B", unit_scale=True) as progress:
        for number, (name, shard) in enumerate(zip(names, shards), start=1):
            _write_file(Path(folder) / name, shard, stream, progress)
            megabytes = sum(e.nbytes for e in shard) / 1e6
            report(f"wrote {name} ({number}/{len(shards)}, {len(shard)} tensors, {megabytes:.1f} MB)")
    leftover = next(stream, None)
    if leftover is not None:
        raise ValueError(f"tensor {leftover[0]!r} is not in the shard plan")
    if len(shards) > 1:
        weight_map = {entry.name: file for file, shard in zip(names, shards) for entry in shard}
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        write_json(Path(folder) / f"{prefix}.safetensors.index.json", index)
    return names


def _header(shard: Sequence[TensorEntry]) -> bytes:
    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in shard:
        header[entry.name] = {
            "dtype": SAFETENSORS_DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it


def _write_file(
    path: Path, shard: Sequence[TensorEntry], stream: Iterator[Tuple[str, torch.Tensor]], progress: Progress
) -> None:
    header = _header(shard)
    with open(path, "wb") as file:
        file.write(len(header).to_bytes(8, "little"))
        file.write(header)
        for entry in shard:
            name, tensor = next(stream, (None, None))
            _check_matches_plan(entry, name, tensor)
            file.write(_tensor_bytes(tensor))
            progress.update(entry.nbytes)


def _check_matches_plan(entry: TensorEntry, name, tensor) -> None:
    if name != entry.name:
        raise ValueError(f"expected tensor {entry.name!r} next, got {name!r}")
    if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
        raise ValueError(
            f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, planned as {entry.dtype} {entry.shape}"
        )


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
