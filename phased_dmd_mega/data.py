"""What a training step is conditioned on: prompt embeddings and the latent shape.

Every rank of a model-parallel group must see the same batch, and data-parallel groups
different ones. Nothing here communicates: the randomness of step ``i`` comes from generators
seeded by (seed, i, data-parallel rank), so a resumed run draws exactly what the uninterrupted
run would have drawn.

Prompt-embedding cache (written by ``phased-dmd encode-prompts``): a folder with
``prompts.json`` = {"shards": [{"file": ..., "count": n}, ...], "negative": file} and
safetensors shards holding ``context`` [n, L, D] (and ``context_mask`` [n, L] for Qwen-Image);
the negative-prompt file holds ``context`` [1, L, D]. Rows are read one at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

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
        return self.rows(indices), self.negative(batch)


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


class PromptCache(PromptSource):
    """The cache format described in the module docstring."""

    def __init__(self, folder):
        from phased_dmd_mega.models.weights import TensorReader

        self.folder = Path(folder)
        index_file = self.folder / "prompts.json"
        if not index_file.exists():
            raise FileNotFoundError(f"{self.folder} is not a prompt cache: {index_file.name} is missing")
        index = json.loads(index_file.read_text())
        self.shards = [(self.folder / s["file"], int(s["count"])) for s in index["shards"]]
        self.starts = [0]
        for _, count in self.shards:
            self.starts.append(self.starts[-1] + count)
        self._reader = {path: TensorReader.for_file(path) for path, _ in self.shards}
        negative = index.get("negative")
        self._negative = TensorReader.for_file(self.folder / negative) if negative else None

    def __len__(self) -> int:
        return self.starts[-1]

    def _row(self, index: int, name: str) -> Optional[torch.Tensor]:
        shard = max(i for i, start in enumerate(self.starts[:-1]) if start <= index)
        path, _ = self.shards[shard]
        reader = self._reader[path]
        if name not in reader.weight_map:
            return None
        row = index - self.starts[shard]
        return reader.read(name, 0, row, row + 1)

    def rows(self, indices):
        context = torch.cat([self._row(i, "context") for i in indices])
        masks = [self._row(i, "context_mask") for i in indices]
        return Condition(context, torch.cat(masks) if masks[0] is not None else None)

    def negative(self, batch):
        if self._negative is None:
            raise ValueError(f"{self.folder} has no negative-prompt embeddings (needed for guidance > 1)")
        context = self._negative.read("context").expand(batch, -1, -1)
        mask = self._negative.read("context_mask").expand(batch, -1) if "context_mask" in self._negative.weight_map else None
        return Condition(context, mask)
