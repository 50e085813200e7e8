"""Writing the prompt-embedding cache (format.py): one safetensors shard per ``shard_size``
prompts, each published by an atomic rename and stamped with the fingerprint of its inputs; the
index says ``complete: false`` until every shard is there. A folder holding the cache of the same
inputs is resumed, one of other inputs is refused, or with ``overwrite`` replaced: the new cache is
built beside it in ``.NAME.partial-<fingerprint>`` (the same folder on every rank and for a re-run
of the same command, which resumes it) and takes the old one's place only once it is complete, so
a failure or an interruption leaves the old cache whole and readable."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from phased_dmd_mega.files import replace_folder, write_atomically
from phased_dmd_mega.log import get_logger
from phased_dmd_mega.prompt_cache.errors import PromptEncodingError
from phased_dmd_mega.prompt_cache.format import (
    CONTEXT,
    FINGERPRINT,
    INDEX_FILE,
    NEGATIVE_FILE,
    OFFSETS,
    RowLayout,
    completed,
    dtype_name,
    is_complete,
    is_shard_file,
    make_index,
    shard_entry,
    shard_file,
)

log = get_logger(__name__)


@dataclass(frozen=True)
class Shard:
    number: int
    start: int
    stop: int

    @property
    def file(self) -> str:
        return shard_file(self.number)

    @property
    def count(self) -> int:
        return self.stop - self.start


def plan_shards(count: int, shard_size: int) -> List[Shard]:
    return [Shard(n, start, min(start + shard_size, count)) for n, start in enumerate(range(0, count, shard_size))]


def write_rows(
    path: Path,
    rows: Sequence[torch.Tensor],
    fingerprint: str,
    metadata: Optional[Dict[str, str]] = None,
    extra: Optional[Dict[str, torch.Tensor]] = None,
) -> None:
    """Trimmed rows -> one safetensors file (``context`` + ``offsets``, and ``extra`` tensors such
    as the rows' first-frame latents), stamped with ``fingerprint`` and published atomically."""
    from safetensors.torch import save_file

    lengths = torch.tensor([0] + [r.shape[0] for r in rows], dtype=torch.int64)
    tensors = {CONTEXT: torch.cat(list(rows)).contiguous(), OFFSETS: lengths.cumsum(0)}
    tensors.update({name: tensor.contiguous() for name, tensor in (extra or {}).items()})
    stamp = {FINGERPRINT: fingerprint, **(metadata or {})}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=stamp))


def write_embeddings_cache(
    folder,
    rows: Sequence[torch.Tensor],
    negative: torch.Tensor,
    family: str = "wan",
    pad_to: Optional[int] = None,
    masked: bool = False,
    source: str = "precomputed",
) -> Path:
    """A prompt cache from embeddings computed elsewhere (rows [L_i, D], negative [L, D]): one
    shard, the same index as ``encode-prompts`` writes. Refuses an existing folder."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise PromptEncodingError(f"{folder} exists and is not empty")
    dims = {r.shape[-1] for r in rows} | {negative.shape[-1]}
    if len(dims) != 1 or any(r.dim() != 2 for r in [*rows, negative]):
        raise PromptEncodingError(f"embeddings must all be [tokens, D] with one D, got {sorted(dims)}")
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(b"".join(r.float().numpy().tobytes() for r in [*rows, negative])).hexdigest()
    write_rows(folder / NEGATIVE_FILE, [negative], digest)
    shard = shard_file(0)
    write_rows(folder / shard, list(rows), digest)
    index = make_index(
        RowLayout(family, dims.pop(), pad_to, masked),
        dtype=dtype_name(rows[0].dtype),
        count=len(rows),
        fingerprint=digest,
        settings={"source": source},
        source={"embeddings": source},
        negative_prompt=None,
    )
    write_index(folder, completed(index, [shard_entry(shard, len(rows))]))
    return folder


def file_fingerprint(path: Path) -> Optional[str]:
    """The stamp of a written file; None for a missing or torn one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(FINGERPRINT)
    except Exception:  # a file that is not safetensors (or a torn one) counts as not written
        return None


def write_index(folder: Path, index: Dict[str, object]) -> None:
    write_atomically(folder / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=1) + "\n"))


def _cache_files(folder: Path) -> List[Path]:
    return [
        p
        for p in folder.iterdir()
        if p.name == INDEX_FILE or p.name == NEGATIVE_FILE or is_shard_file(p) or ".tmp" in p.name
    ]


def prepare_folder(folder: Path, index: Dict[str, object], overwrite: bool) -> Path:
    """Create the cache folder, or check that the one there holds these inputs (resume). Returns
    the folder to write the shards into: ``folder``, or, to replace a cache of other inputs
    (``overwrite``), its ``replacement_folder``, which ``replace_cache`` publishes when complete."""
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        old = json.loads(index_file.read_text())
        if old.get("fingerprint") == index["fingerprint"]:
            if not is_complete(old):
                write_index(folder, index)  # resume: the finished shards are found by their stamp
            return folder
        if not overwrite:
            changed = sorted(k for k, v in index["settings"].items() if old.get("settings", {}).get(k) != v)
            raise PromptEncodingError(
                f"--out {folder} holds a prompt cache of other inputs (differing: "
                f"{', '.join(changed) or 'format'}); pass --overwrite to replace it, "
                "or choose another --out"
            )
        staging = replacement_folder(folder, index)
        for stale in folder.parent.glob(f".{folder.name}.partial-*"):  # replacements of other inputs
            if stale != staging:
                shutil.rmtree(stale)
        return prepare_folder(staging, index, overwrite=False)
    if folder.exists() and any(folder.iterdir()):
        raise PromptEncodingError(
            f"--out {folder} exists, is not empty and is not a prompt cache; choose another --out"
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_index(folder, index)
    return folder


def replacement_folder(folder: Path, index: Dict[str, object]) -> Path:
    """Where a cache that replaces ``folder``'s is built: named by its inputs' fingerprint, so
    every rank, and a re-run of the same command, finds it."""
    return folder.parent / f".{folder.name}.partial-{str(index['fingerprint'])[:16]}"


def replace_cache(staging: Path, folder: Path) -> None:
    """The finished cache in ``staging`` takes the place of ``folder``'s (``replace_folder``: the
    old folder renamed aside, the new one renamed in); files of ``folder`` that are not part of
    its cache go along."""
    cache = set(_cache_files(folder))
    for path in sorted(folder.iterdir()):
        if path not in cache:
            path.rename(staging / path.name)
    replace_folder(staging, folder)


def publish_index(folder: Path, index: Dict[str, object], shards: List[Shard]) -> None:
    """The final index, once every shard carries this run's fingerprint."""
    from safetensors import safe_open

    entries = []
    for shard in shards:
        path = folder / shard.file
        if file_fingerprint(path) != index["fingerprint"]:
            raise RuntimeError(f"{path} is missing or stale after encoding; re-run the command to finish the cache")
        with safe_open(str(path), framework="pt") as handle:
            tokens = int(handle.get_slice(CONTEXT).get_shape()[0])
        entries.append(shard_entry(shard.file, shard.count, tokens))
    write_index(folder, completed(index, entries))
    size = sum((folder / shard.file).stat().st_size for shard in shards) / 1e9
    log.info("prompt cache %s: %d prompts, %d shards, %.2f GB", folder, index["count"], len(entries), size)
