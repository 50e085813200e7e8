"""State-dict adapters: Hugging Face (diffusers) names <-> the trainer's own names.

One table of rules per architecture says, for each of the model's parameters, which Hugging
Face tensors it is made of and how it is split over tensor-parallel ranks. The loader reads
only this rank's slices (safetensors slicing), so no rank ever holds the full weights; the
converter uses the same table with one rank.

A safetensors file that is missing, truncated or corrupt is refused with a DamagedFileError
naming it (and the first tensor cut off by a truncation), never safetensors' own exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from phased_dmd_mega.errors import DamagedFileError
from phased_dmd_mega.files import read_json

REPLICATED, COLUMN, ROW = "replicated", "column", "row"


@dataclass(frozen=True)
class WeightRule:
    """``own`` is built from ``sources``. Column-parallel tensors are split along dim 0, row-
    parallel ones along dim 1. Several sources are interleaved per head, megatron's fused
    layout: [src0_h0, src1_h0, ..., src0_h1, ...] with ``head_dim`` rows each."""

    own: str
    sources: Tuple[str, ...]
    split: str = REPLICATED
    head_dim: int = 0


class TensorReader:
    """Reads named tensors, or slices of them, from a folder of safetensors files (sharded with
    an index JSON, or single), without loading whole files."""

    def __init__(self, folder: Path, files: Optional[List[str]] = None):
        """All safetensors files of ``folder`` (or only ``files`` of it)."""
        self.folder = Path(folder)
        index = [] if files else sorted(self.folder.glob("*.safetensors.index.json"))
        weight_map = None
        if index:
            weight_map = read_json(index[0])["weight_map"]
            files = sorted(set(weight_map.values()))
        elif not files:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no safetensors files in {self.folder}")
        # Kept open for the headers (names, shapes, dtypes); tensor data goes through read().
        self._handles = {name: open_safetensors(self.folder / name) for name in files}
        if weight_map is None:
            weight_map = {key: name for name, h in self._handles.items() for key in h.keys()}
        self.weight_map: Dict[str, str] = weight_map

    @classmethod
    def for_file(cls, path) -> "TensorReader":
        """One safetensors file on its own (e.g. one shard of a prompt cache)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return cls(path.parent, [path.name])

    def keys(self) -> List[str]:
        return sorted(self.weight_map)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handles[self._file(name)].get_slice(name).get_shape())

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The tensor, or its [start, stop) slice along ``dim``. Data is read through a mapping
        opened for this read alone: the file pages it touched leave this process's memory when
        it closes (a slice along dim 1 touches every page of the tensor)."""
        from safetensors import SafetensorError

        path = self.folder / self._file(name)
        try:
            handle = open_safetensors(path)
        except DamagedFileError as err:  # damaged since the headers were read
            raise DamagedFileError(f"{err} (reading tensor {name!r})") from err
        try:
            with handle:
                if dim is None:
                    return handle.get_tensor(name)
                index = tuple(slice(None) for _ in range(dim)) + (slice(start, stop),)
                return handle.get_slice(name)[index]
        except (SafetensorError, OSError) as err:
            raise DamagedFileError(f"cannot read tensor {name!r} from {path}: {_reason(err)}") from err

    def _file(self, name: str) -> str:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is missing from {self.folder}")
        return self.weight_map[name]


def open_safetensors(path: Path):
    """``safe_open`` of ``path`` (headers read, data mapped); DamagedFileError naming the file
    when it is missing, truncated or not a safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path} is missing")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise DamagedFileError(f"{path} is not a readable safetensors file: {damage(path, err)}") from err


def damage(path: Path, err: Exception) -> str:
    """What is wrong with a safetensors file that ``safe_open`` refused (``err``), read from
    its header: too short, truncated (the first tensor cut off named), a header that is not JSON
    or not well formed; else safetensors' own reason."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if size < 8:
                return f"{size} bytes, too short for a safetensors header"
            if 8 + length > size:
                return f"truncated: {size} bytes, shorter than its {length}-byte header"
            header = json.loads(file.read(length).decode("utf-8"))
    except OSError as read_err:
        return str(read_err)
    except ValueError as json_err:  # not UTF-8, or not JSON
        return f"its header is not valid JSON ({json_err})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data, ends = size - 8 - length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(offset) for offset in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            return f"tensor {name!r}: its header entry has no valid data_offsets"
        ends[name] = (start, stop)
    cut = sorted((start, name) for name, (start, stop) in ends.items() if stop > data)
    if cut:
        described = 8 + length + max(stop for _, stop in ends.values())
        more = f" (and {len(cut) - 1} more)" if len(cut) > 1 else ""
        return f"truncated: {size} bytes of the {described} its header describes; tensor {cut[0][1]!r}{more} is cut off"
    return _reason(err)


def _reason(err: Exception) -> str:
    """One line of an error's message."""
    return " ".join(str(err).split()) or type(err).__name__


def _rank_rows(total: int, rank: int, size: int) -> Tuple[int, int]:
    per = total // size
    return rank * per, (rank + 1) * per


def linear_rules(own: str, sources, split: str = REPLICATED, head_dim: int = 0) -> List[WeightRule]:
    """Weight and bias of one linear layer built from ``sources`` (a name, or several to fuse
    per head); the bias of a row-parallel layer is replicated."""
    sources = (sources,) if isinstance(sources, str) else tuple(sources)
    bias_split = REPLICATED if split == ROW else split
    return [
        WeightRule(f"{own}.weight", tuple(f"{s}.weight" for s in sources), split, head_dim),
        WeightRule(f"{own}.bias", tuple(f"{s}.bias" for s in sources), bias_split, head_dim),
    ]


def tensor_rules(own: str, source: str, split: str = REPLICATED, head_dim: int = 0) -> List[WeightRule]:
    """One tensor taken as it is (or split over tensor-parallel ranks)."""
    return [WeightRule(own, (source,), split, head_dim)]


def build_local_tensor(rule: WeightRule, reader, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of ``rule.own`` read from ``reader`` (a TensorReader or a dict)."""
    read = _reader_function(reader)
    if rule.split == REPLICATED:
        (source,) = rule.sources
        return read(source, None, 0, None)
    if rule.split == ROW:
        (source,) = rule.sources
        start, stop = _rank_rows(_shape(reader, source)[1], rank, size)
        return read(source, 1, start, stop)
    start, stop = _rank_rows(_shape(reader, rule.sources[0])[0], rank, size)
    pieces = [read(source, 0, start, stop) for source in rule.sources]
    if len(pieces) == 1:
        return pieces[0]
    return interleave_heads(pieces, rule.head_dim)


def interleave_heads(pieces: List[torch.Tensor], head_dim: int) -> torch.Tensor:
    """[q, k, v] row blocks -> [q_h0, k_h0, v_h0, q_h1, ...] (megatron's fused layout)."""
    heads = pieces[0].shape[0] // head_dim
    stacked = torch.stack([p.reshape(heads, head_dim, *p.shape[1:]) for p in pieces], dim=1)
    return stacked.reshape(len(pieces) * pieces[0].shape[0], *pieces[0].shape[1:])


def split_interleaved_heads(fused: torch.Tensor, parts: int, head_dim: int) -> List[torch.Tensor]:
    """Inverse of ``interleave_heads``."""
    heads = fused.shape[0] // (parts * head_dim)
    grouped = fused.reshape(heads, parts, head_dim, *fused.shape[1:])
    return [grouped[:, i].reshape(heads * head_dim, *fused.shape[1:]) for i in range(parts)]


class StateDictReader:
    """TensorReader's interface over tensors already in memory (a model's own parameters on
    their way out, e.g. a distilled generator being exported)."""

    def __init__(self, tensors: Dict[str, torch.Tensor], folder="<memory>"):
        self.tensors, self.folder = tensors, Path(folder)
        self.weight_map: Dict[str, str] = dict.fromkeys(tensors, "<memory>")

    def keys(self) -> List[str]:
        return sorted(self.tensors)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        tensor = self._get(name)
        return tensor if dim is None else tensor.narrow(dim, start, (stop or tensor.shape[dim]) - start)

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} is missing")
        return self.tensors[name]


def _reader_function(reader) -> Callable:
    if isinstance(reader, (TensorReader, StateDictReader)):
        return reader.read
    return StateDictReader(reader).read


def _shape(reader, name: str) -> Tuple[int, ...]:
    if isinstance(reader, (TensorReader, StateDictReader)):
        return reader.shape(name)
    return tuple(reader[name].shape)


def key_mismatch_lines(expected: Iterable[str], available: Iterable[str], listed: Callable = ", ".join) -> List[str]:
    """Report lines for missing and unexpected keys; empty when the key sets agree."""
    expected, available = set(expected), set(available)
    missing, unexpected = sorted(expected - available), sorted(available - expected)
    lines = []
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {listed(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {listed(unexpected)}")
    return lines


def check_source_keys(rules: Iterable[WeightRule], available: Iterable[str], where: str) -> None:
    """Missing and unexpected Hugging Face keys, listed, before anything is loaded."""
    lines = key_mismatch_lines({source for rule in rules for source in rule.sources}, available)
    if lines:
        raise KeyError("\n".join([f"weights in {where} do not match the architecture:", *lines]))


def load_rank_state(rules: Iterable[WeightRule], reader, rank: int, size: int) -> Dict[str, torch.Tensor]:
    return {rule.own: build_local_tensor(rule, reader, rank, size) for rule in rules}
