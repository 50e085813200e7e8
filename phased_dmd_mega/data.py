"""What a training step is conditioned on: prompt embeddings and the latent shape.

Every rank of a model-parallel group must see the same batch, and data-parallel groups
different ones. Nothing here communicates: the randomness of step ``i`` comes from generators
seeded by (seed, i, data-parallel rank), so a resumed run draws exactly what the uninterrupted
run would have drawn.

Prompt-embedding cache (written by ``phased-dmd encode-prompts``, phased_dmd_mega/prompt_encoding.py):
a folder with the index ``prompts.json`` and safetensors shards. Each prompt is stored trimmed to
its true token count (a Wan prompt padded to 512 x 4096 would take 4 MiB in bf16): a shard holds
``context`` [sum of lengths, D], the rows one after the other, and ``offsets`` [n + 1] (row i is
``context[offsets[i]:offsets[i + 1]]``); ``negative.safetensors`` holds the negative prompt alike.
The index says how rows are padded back on load: ``pad_to`` = 512 for Wan (zeros, no mask: the
DiT sees exactly what the diffusers pipeline feeds it), or null for Qwen-Image (the longest row of
the batch, with a 0/1 ``context_mask``). Rows are read one at a time.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from phased_dmd_mega.distill.roles import Condition


def step_generator(seed: int, iteration: int, data_parallel_rank: int, purpose: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + iteration) * 1009 + data_parallel_rank) * 31 + purpose)


# ----------------------------------------------------------------------------- resolutions


@dataclass(frozen=True)
class LatentGeometry:
    """The autoencoder's compression: pixels -> latents."""

    channels: int = 16
    temporal: int = 4  # Wan: 81 frames -> 21 latent frames
    spatial: int = 8

    def latent_shape(self, frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
        for size, name in ((height, "height"), (width, "width")):
            if size % self.spatial:
                raise ValueError(f"{name} {size} is not divisible by the spatial compression {self.spatial}")
        latent_frames = 1 if frames == 1 else (frames - 1) // self.temporal + 1
        return self.channels, latent_frames, height // self.spatial, width // self.spatial


def pick_resolution(resolutions: Sequence, seed: int, iteration: int):
    """One resolution of the mixture per step, the same on every rank (no data-parallel offset:
    ranks of one step must agree on shapes for collective communication)."""
    weights = torch.tensor([r.probability for r in resolutions], dtype=torch.float64)
    index = torch.multinomial(weights, 1, generator=step_generator(seed, iteration, 0, purpose=7)).item()
    return resolutions[index]


# ----------------------------------------------------------------------------- prompts


class PromptSource:
    """Draws prompt embeddings for a step: ``sample(batch, generator) -> (condition, negative)``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def rows(self, indices: List[int]) -> Condition:
        raise NotImplementedError

    def negative(self, batch: int) -> Condition:
        raise NotImplementedError

    def sample(self, batch: int, generator: torch.Generator) -> Tuple[Condition, Condition]:
        indices = torch.randint(0, len(self), (batch,), generator=generator).tolist()
        return self.conditions(indices)

    def conditions(self, indices: List[int]) -> Tuple[Condition, Condition]:
        """The prompts at ``indices`` and as many negative prompts."""
        return self.rows(indices), self.negative(len(indices))


class SyntheticPrompts(PromptSource):
    """Random fixed prompt embeddings (smoke tests and toy runs); the empty prompt is zeros."""

    def __init__(self, count: int, length: int, dim: int, seed: int = 0):
        self.context = torch.randn(count, length, dim, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.context.shape[0]

    def rows(self, indices):
        return Condition(self.context[indices])

    def negative(self, batch):
        return Condition(torch.zeros_like(self.context[:1]).expand(batch, -1, -1))


PROMPT_CACHE_INDEX = "prompts.json"
PROMPT_CACHE_FORMAT = "phased-dmd-prompt-cache"
PROMPT_CACHE_VERSION = 1


def read_prompt_cache_index(folder) -> dict:
    """The index of a finished prompt cache, with a clear error for anything else."""
    folder = Path(folder)
    index_file = folder / PROMPT_CACHE_INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder} is not a prompt cache: {PROMPT_CACHE_INDEX} is missing "
                                "(write one with `phased-dmd encode-prompts`)")
    index = json.loads(index_file.read_text())
    if index.get("format") != PROMPT_CACHE_FORMAT or index.get("version") != PROMPT_CACHE_VERSION:
        raise ValueError(f"{index_file} is not a version-{PROMPT_CACHE_VERSION} prompt cache index "
                         f"(format {index.get('format')!r}, version {index.get('version')!r})")
    if not index.get("complete"):
        raise ValueError(f"{folder} is an unfinished prompt cache: re-run the same `phased-dmd encode-prompts` "
                         "command to finish it")
    return index


class PromptCache(PromptSource):
    """The cache format described in the module docstring. ``negative_from``: another cache
    whose negative prompt is used instead of this one's (data.negative_prompt_cache)."""

    def __init__(self, folder, negative_from=None):
        self.folder = Path(folder)
        index = read_prompt_cache_index(self.folder)
        self.family: str = index["family"]
        self.dim: int = int(index["dim"])
        self.pad_to: Optional[int] = index["pad_to"]
        self.masked: bool = bool(index["masked"])
        self.shards = [(self.folder / s["file"], int(s["count"])) for s in index["shards"]]
        self.starts = [0]
        for _, count in self.shards:
            self.starts.append(self.starts[-1] + count)
        self._negative = self._negative_file(index, negative_from)
        self._readers: Dict[Path, object] = {}
        self._offsets: Dict[Path, List[int]] = {}

    def _negative_file(self, index: dict, negative_from) -> Optional[Path]:
        if negative_from is None:
            return self.folder / index["negative"]["file"] if index.get("negative") else None
        other = PromptCache(negative_from)
        mine = (self.family, self.dim, self.pad_to, self.masked)
        if (other.family, other.dim, other.pad_to, other.masked) != mine:
            raise ValueError(f"negative prompt cache {other.folder} ({other.family}, width {other.dim}) does not "
                             f"match prompt cache {self.folder} ({self.family}, width {self.dim})")
        if other._negative is None:
            raise ValueError(f"negative prompt cache {other.folder} has no negative-prompt embeddings")
        return other._negative

    def __len__(self) -> int:
        return self.starts[-1]

    def check_model(self, arch: str, text_dim: int) -> None:
        """Refuse a cache written for another model family or text width."""
        if self.family != arch or self.dim != text_dim:
            raise ValueError(f"prompt cache {self.folder} holds {self.family} embeddings of width {self.dim}; "
                             f"the model ({arch}) takes text of width {text_dim}")

    # -- one trimmed row [L, D] at a time

    def _read(self, path: Path, start: int, stop: int) -> torch.Tensor:
        from phased_dmd_mega.models.weights import TensorReader

        if path not in self._readers:
            self._readers[path] = reader = TensorReader.for_file(path)
            self._offsets[path] = reader.read("offsets").tolist()
        offsets = self._offsets[path]
        return self._readers[path].read("context", 0, offsets[start], offsets[stop])

    def row(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"prompt {index} is outside the cache {self.folder} ({len(self)} prompts)")
        shard = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[shard]
        return self._read(self.shards[shard][0], row, row + 1)

    def negative_row(self) -> torch.Tensor:
        if self._negative is None:
            raise ValueError(f"{self.folder} has no negative-prompt embeddings (needed for guidance > 1)")
        return self._read(self._negative, 0, 1)

    # -- batches padded as the family's pipeline pads them

    def _padded(self, rows: List[torch.Tensor], length: Optional[int]) -> Condition:
        length = self.pad_to or length or max(r.shape[0] for r in rows)
        context = rows[0].new_zeros(len(rows), length, self.dim)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            if r.shape[0] > length:
                raise ValueError(f"a prompt of {r.shape[0]} tokens does not fit a batch padded to {length}")
            context[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        return Condition(context, mask if self.masked else None)

    def rows(self, indices, length: Optional[int] = None):
        return self._padded([self.row(i) for i in indices], length)

    def negative(self, batch, length: Optional[int] = None):
        return self._repeated(self._padded([self.negative_row()], length), batch)

    @staticmethod
    def _repeated(one: Condition, batch: int) -> Condition:
        # One padded copy, expanded over the batch (read-only, like SyntheticPrompts' negative).
        expand = lambda x: None if x is None else x.expand(batch, *x.shape[1:])  # noqa: E731
        return Condition(expand(one.context), expand(one.context_mask))

    def conditions(self, indices):
        # Both CFG branches run in one batch (Condition.cat): they share one padded length.
        rows, negative = [self.row(i) for i in indices], self.negative_row()
        length = max(r.shape[0] for r in rows + [negative])
        return self._padded(rows, length), self.negative(len(indices), length)
