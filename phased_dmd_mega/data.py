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

Image-conditioned caches (Wan2.2 I2V, ``encode-prompts --vae``) also hold, per row, the VAE latents
of the first frame followed by black frames at every resolution the index lists under
``image_conditions``: the shard tensor ``image_latents.<F>x<H>x<W>`` [n, C, F, h, w] per resolution
(a cache written before several resolutions existed has one ``image_latents`` tensor and an
``image_condition`` entry; it still reads). The mask channels (ones on the first latent frame)
depend only on the shape and are rebuilt on load; every row's condition
``concat_latents = cat(mask, latents)`` [B, mask + C, F, h, w], at the step's resolution, goes with
both CFG branches.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from phased_dmd_mega.condition import Condition


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


IMAGE_LATENTS = "image_latents"  # the first-frame latents of a cache of one resolution (older caches)


def resolution_text(resolution: Sequence[int]) -> str:
    """(81, 480, 832) -> "81x480x832", as --resolution writes it."""
    return "x".join(map(str, resolution))


@dataclass(frozen=True)
class ImageConditionSpec:
    """The image condition of an I2V prompt cache, as WanImageToVideoPipeline.prepare_latents
    builds it (no last frame, ``expand_timesteps`` off): a mask of ``mask_channels`` (the VAE's
    temporal compression) that is one on the first latent frame, then the VAE latents of
    [first frame, black frames...], normalised with the VAE's latents_mean/latents_std."""

    resolution: Tuple[int, int, int]  # pixels: frames, height, width
    latent_shape: Tuple[int, int, int, int]  # the stored latents: channels, frames, height, width
    mask_channels: int = 4
    spatial: int = 8  # the VAE's spatial compression
    tensor: str = IMAGE_LATENTS  # the shard tensor holding these latents

    @staticmethod
    def tensor_name(resolution: Sequence[int]) -> str:
        return f"{IMAGE_LATENTS}.{resolution_text(resolution)}"

    @property
    def channels(self) -> int:
        """Input channels the condition adds to the DiT's noisy latents (Wan2.2 I2V: 4 + 16)."""
        return self.mask_channels + self.latent_shape[0]

    @property
    def geometry(self) -> LatentGeometry:
        return LatentGeometry(self.latent_shape[0], self.mask_channels, self.spatial)

    def describe(self) -> str:
        return resolution_text(self.resolution) + " (frames x height x width)"

    def to_index(self) -> dict:
        return {
            "resolution": list(self.resolution),
            "latent_shape": list(self.latent_shape),
            "mask_channels": self.mask_channels,
            "spatial": self.spatial,
            "tensor": self.tensor,
        }

    @classmethod
    def from_index(cls, entry: dict) -> "ImageConditionSpec":
        return cls(
            tuple(entry["resolution"]),
            tuple(entry["latent_shape"]),
            int(entry["mask_channels"]),
            int(entry["spatial"]),
            entry.get("tensor", IMAGE_LATENTS),
        )

    @classmethod
    def all_from_index(cls, index: dict) -> Tuple["ImageConditionSpec", ...]:
        """The index's image conditions, one per resolution (none for a text-only cache)."""
        if "image_conditions" in index:
            return tuple(cls.from_index(entry) for entry in index["image_conditions"])
        legacy = index.get("image_condition")  # one resolution, tensor image_latents
        return () if legacy is None else (cls.from_index(legacy),)

    def mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[mask_channels, F, h, w]: the first frame's mask repeated over the temporal
        compression fills latent frame 0; the frames to generate are zeros."""
        mask = torch.zeros(self.mask_channels, *self.latent_shape[1:], dtype=dtype)
        mask[:, 0] = 1
        return mask

    def concat_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, F, h, w] first-frame latents -> the DiT's extra input channels [B, mask + C, F, h, w]."""
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"first-frame latents of shape {tuple(latents.shape[1:])}, expected {self.latent_shape}")
        mask = self.mask(latents.dtype).to(latents.device).expand(latents.shape[0], -1, -1, -1, -1)
        return torch.cat([mask, latents], dim=1)


class ImageConditions:
    """The first-frame conditions of an I2V prompt source, one per encoded resolution; they share
    the channel layout (mask + latent channels), so one teacher takes any of them."""

    def __init__(self, specs: Sequence[ImageConditionSpec], where: str):
        self.specs = {tuple(spec.resolution): spec for spec in specs}
        self.where = where
        layouts = {(spec.mask_channels, spec.latent_shape[0], spec.spatial) for spec in specs}
        if len(layouts) > 1:
            raise ValueError(f"{where} mixes image conditions of different channel layouts: {sorted(layouts)}")
        if len(self.specs) != len(specs):
            raise ValueError(f"{where} lists a resolution twice among its image conditions")

    @property
    def first(self) -> ImageConditionSpec:
        return next(iter(self.specs.values()))

    def describe(self) -> str:
        return ", ".join(map(resolution_text, self.specs))

    def at(self, resolution: Optional[Sequence[int]]) -> ImageConditionSpec:
        """The condition at ``resolution`` (frames, height, width in pixels); None: the only one."""
        if resolution is None:
            if len(self.specs) > 1:
                raise ValueError(
                    f"{self.where} holds first frames at several resolutions ({self.describe()}): say which one"
                )
            return self.first
        key = tuple(int(v) for v in resolution)
        if key not in self.specs:
            raise ValueError(
                f"{self.where} holds no first-frame latents at {resolution_text(key)} (frames x "
                f"height x width); it has {self.describe()}: encode that resolution too "
                "(`phased-dmd encode-prompts --vae ... --resolution FxHxW`, once per resolution)"
            )
        return self.specs[key]

    def check_resolutions(self, resolutions: Sequence) -> None:
        """Every resolution of the run's data.resolutions needs its encoded first frames."""
        missing = [r.pixels for r in resolutions if r.pixels not in self.specs]
        if missing:
            listed = ", ".join(map(resolution_text, missing))
            raise ValueError(
                f"data.resolutions {listed} disagree with {self.where}, whose first-frame latents were encoded at "
                f"{self.describe()} (frames x height x width) only: remove them from data.resolutions or encode "
                f"the cache with --resolution for each"
            )


def pick_resolution(resolutions: Sequence, seed: int, iteration: int):
    """One resolution of the mixture per step, the same on every rank (no data-parallel offset:
    ranks of one step must agree on shapes for collective communication)."""
    weights = torch.tensor([r.probability for r in resolutions], dtype=torch.float64)
    index = torch.multinomial(weights, 1, generator=step_generator(seed, iteration, 0, purpose=7)).item()
    return resolutions[index]


# ----------------------------------------------------------------------------- prompts


class PromptSource:
    """Draws prompt embeddings for a step: ``sample(batch, generator) -> (condition, negative)``."""

    # I2V: every row brings its first frame, encoded at each of these resolutions.
    image_conditions: Optional[ImageConditions] = None

    def __len__(self) -> int:
        raise NotImplementedError

    def rows(self, indices: List[int], resolution: Optional[Sequence[int]] = None) -> Condition:
        """The prompts at ``indices``; ``resolution`` (frames, height, width) picks the first-frame
        latents of an image-conditioned source (text-only sources ignore it)."""
        raise NotImplementedError

    def negative(self, batch: int) -> Condition:
        raise NotImplementedError

    def sample(
        self, batch: int, generator: torch.Generator, resolution: Optional[Sequence[int]] = None
    ) -> Tuple[Condition, Condition]:
        indices = torch.randint(0, len(self), (batch,), generator=generator).tolist()
        return self.conditions(indices, resolution)

    def conditions(self, indices: List[int], resolution: Optional[Sequence[int]] = None) -> Tuple[Condition, Condition]:
        """The prompts at ``indices`` and as many negative prompts."""
        return self.rows(indices, resolution), self.negative(len(indices))


class SyntheticPrompts(PromptSource):
    """Random fixed prompt embeddings (smoke tests and toy runs); the empty prompt is zeros."""

    def __init__(self, count: int, length: int, dim: int, seed: int = 0):
        self.context = torch.randn(count, length, dim, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.context.shape[0]

    def rows(self, indices, resolution=None):
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
        raise FileNotFoundError(
            f"{folder} is not a prompt cache: {PROMPT_CACHE_INDEX} is missing "
            "(write one with `phased-dmd encode-prompts`)"
        )
    index = json.loads(index_file.read_text())
    if index.get("format") != PROMPT_CACHE_FORMAT or index.get("version") != PROMPT_CACHE_VERSION:
        raise ValueError(
            f"{index_file} is not a version-{PROMPT_CACHE_VERSION} prompt cache index "
            f"(format {index.get('format')!r}, version {index.get('version')!r})"
        )
    if not index.get("complete"):
        raise ValueError(
            f"{folder} is an unfinished prompt cache: re-run the same `phased-dmd encode-prompts` command to finish it"
        )
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
        specs = ImageConditionSpec.all_from_index(index)
        self.image_conditions = ImageConditions(specs, f"the prompt cache {self.folder}") if specs else None
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
            raise ValueError(
                f"negative prompt cache {other.folder} ({other.family}, width {other.dim}) does not "
                f"match prompt cache {self.folder} ({self.family}, width {self.dim})"
            )
        if other._negative is None:
            raise ValueError(f"negative prompt cache {other.folder} has no negative-prompt embeddings")
        return other._negative

    def __len__(self) -> int:
        return self.starts[-1]

    def check_model(self, arch: str, text_dim: int) -> None:
        """Refuse a cache written for another model family or text width."""
        if self.family != arch or self.dim != text_dim:
            raise ValueError(
                f"prompt cache {self.folder} holds {self.family} embeddings of width {self.dim}; "
                f"the model ({arch}) takes text of width {text_dim}"
            )

    # -- one trimmed row [L, D] at a time

    def _reader(self, path: Path):
        from phased_dmd_mega.models.weights import TensorReader

        if path not in self._readers:
            self._readers[path] = reader = TensorReader.for_file(path)
            self._offsets[path] = reader.read("offsets").tolist()
        return self._readers[path]

    def _read(self, path: Path, start: int, stop: int) -> torch.Tensor:
        reader = self._reader(path)
        offsets = self._offsets[path]
        return reader.read("context", 0, offsets[start], offsets[stop])

    def _locate(self, index: int) -> Tuple[Path, int]:
        """(shard file, row within it) of prompt ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"prompt {index} is outside the cache {self.folder} ({len(self)} prompts)")
        shard = bisect.bisect_right(self.starts, index) - 1
        return self.shards[shard][0], index - self.starts[shard]

    def row(self, index: int) -> torch.Tensor:
        path, row = self._locate(index)
        return self._read(path, row, row + 1)

    def image_latents(self, index: int, resolution: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The first-frame latents [C, F, h, w] of prompt ``index`` at ``resolution`` (frames,
        height, width; None: the cache's only one) of an image-conditioned cache."""
        if self.image_conditions is None:
            raise ValueError(f"{self.folder} holds no first-frame images (encode the prompts with --vae)")
        return self._latents_row(index, self.image_conditions.at(resolution))

    def _latents_row(self, index: int, spec: ImageConditionSpec) -> torch.Tensor:
        path, row = self._locate(index)
        return self._reader(path).read(spec.tensor, 0, row, row + 1)[0]

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

    def rows(self, indices, resolution=None, length: Optional[int] = None):
        return self._with_images(self._padded([self.row(i) for i in indices], length), indices, resolution)

    def negative(self, batch, length: Optional[int] = None):
        return self._repeated(self._padded([self.negative_row()], length), batch)

    @staticmethod
    def _repeated(one: Condition, batch: int) -> Condition:
        # One padded copy, expanded over the batch (read-only, like SyntheticPrompts' negative).
        expand = lambda x: None if x is None else x.expand(batch, *x.shape[1:])  # noqa: E731
        return Condition(expand(one.context), expand(one.context_mask))

    def _with_images(self, condition: Condition, indices, resolution) -> Condition:
        if self.image_conditions is None:
            return condition
        spec = self.image_conditions.at(resolution)
        latents = torch.stack([self._latents_row(i, spec) for i in indices])
        return replace(condition, concat_latents=spec.concat_latents(latents))

    def conditions(self, indices, resolution=None):
        # Both CFG branches run in one batch (Condition.cat): they share one padded length.
        # WanImageToVideoPipeline feeds the unconditional branch the same image condition.
        rows, negative = [self.row(i) for i in indices], self.negative_row()
        length = max(r.shape[0] for r in rows + [negative])
        positive = self._with_images(self._padded(rows, length), indices, resolution)
        return positive, replace(self.negative(len(indices), length), concat_latents=positive.concat_latents)
