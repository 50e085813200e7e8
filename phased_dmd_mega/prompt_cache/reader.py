"""Reading the prompt-embedding cache (format.py) as the trainer's and the sampler's prompt source."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from phased_dmd_mega.condition import Condition
from phased_dmd_mega.data import ImageConditions, ImageConditionSpec, PromptSource
from phased_dmd_mega.errors import DamagedFileError
from phased_dmd_mega.files import read_json
from phased_dmd_mega.prompt_cache.format import (
    CONTEXT,
    FINGERPRINT,
    INDEX_FILE,
    OFFSETS,
    SAFETENSORS_DTYPES,
    RowLayout,
    format_mismatch,
    index_fingerprint,
    is_complete,
    negative_file,
    shard_files,
)


def read_prompt_cache_index(folder) -> dict:
    """The index of a finished prompt cache, with a clear error for anything else."""
    folder = Path(folder)
    index_file = folder / INDEX_FILE
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{folder} is not a prompt cache: {INDEX_FILE} is missing (write one with `phased-dmd encode-prompts`)"
        )
    index = read_json(index_file)
    mismatch = format_mismatch(index)
    if mismatch is not None:
        raise ValueError(f"{index_file} {mismatch}")
    if not is_complete(index):
        raise ValueError(
            f"{folder} is an unfinished prompt cache: re-run the same `phased-dmd encode-prompts` command to finish it"
        )
    return index


@dataclass(frozen=True)
class ExpectedShard:
    """What the index says one safetensors file of the cache holds."""

    path: Path
    count: int  # rows
    fingerprint: Optional[str]  # the stamp of the encoding it belongs to
    tokens: Optional[int] = None  # the length of its context (recorded by encode-prompts)
    images: Tuple[ImageConditionSpec, ...] = ()  # the first-frame latents of its rows


def check_shards(index_file: Path, shards: Sequence[ExpectedShard], layout: RowLayout, dtype: Optional[str]) -> None:
    """Every file the index names is there, readable, and holds what the index says: its stamp,
    its row count, offsets that cut its context into those rows, the text width and dtype, the
    first-frame latents. A damaged cache, or one mixed with another encoding's files, is refused
    when it is opened, naming the file, not when a row of it is first read hours into a run."""
    absent = sorted(shard.path.name for shard in shards if not shard.path.is_file())
    if absent:
        raise DamagedFileError(f"{index_file} names shards that are not in {index_file.parent}: {absent}")
    for shard in shards:
        problem = _shard_problem(shard, layout, dtype)
        if problem is not None:
            raise DamagedFileError(
                f"{shard.path} {problem}, which {index_file} does not describe: the cache is damaged or mixed with "
                "another one's files; encode it again (`phased-dmd encode-prompts ... --overwrite`)"
            )


def _shard_problem(shard: ExpectedShard, layout: RowLayout, dtype: Optional[str]) -> Optional[str]:
    from phased_dmd_mega.models.weights import open_safetensors

    with open_safetensors(shard.path) as handle:
        stamp = (handle.metadata() or {}).get(FINGERPRINT)
        if shard.fingerprint is not None and stamp != shard.fingerprint:
            return f"was encoded from other inputs (stamp {str(stamp)[:12]}, the index's {shard.fingerprint[:12]})"
        names = set(handle.keys())
        missing = [name for name in (CONTEXT, OFFSETS, *(spec.tensor for spec in shard.images)) if name not in names]
        if missing:
            return f"lacks the tensors {missing}"
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
        offsets_shape, context_shape = shapes[OFFSETS], shapes[CONTEXT]
        if offsets_shape != (shard.count + 1,):
            return f"holds offsets {offsets_shape} (the index says {shard.count} rows: ({shard.count + 1},))"
        if len(context_shape) != 2 or context_shape[1] != layout.dim:
            return f"holds context {context_shape} (the index says [tokens, {layout.dim}])"
        stored = handle.get_slice(CONTEXT).get_dtype()
        if dtype in SAFETENSORS_DTYPES and stored != SAFETENSORS_DTYPES[dtype]:
            return f"holds {stored} embeddings (the index says {dtype})"
        if shard.tokens is not None and context_shape[0] != shard.tokens:
            return f"holds {context_shape[0]} context tokens (the index says {shard.tokens})"
        offsets = handle.get_tensor(OFFSETS)
        if offsets[0] != 0 or offsets[-1] != context_shape[0] or bool((offsets.diff() < 0).any()):
            return f"holds offsets that do not cut its {context_shape[0]} context tokens into rows"
        for spec in shard.images:
            if shapes[spec.tensor] != (shard.count, *spec.latent_shape):
                return f"holds {spec.tensor} {shapes[spec.tensor]} (the index says {(shard.count, *spec.latent_shape)})"
    return None


class PromptCache(PromptSource):
    """The cache format of prompt_cache/format.py. ``negative_from``: another cache whose
    negative prompt is used instead of this one's (data.negative_prompt_cache)."""

    def __init__(self, folder, negative_from=None):
        self.folder = Path(folder)
        index = read_prompt_cache_index(self.folder)
        self.layout = RowLayout.from_index(index)
        self.family: str = self.layout.family
        self.dim: int = self.layout.dim
        self.pad_to: Optional[int] = self.layout.pad_to
        self.masked: bool = self.layout.masked
        specs = ImageConditionSpec.all_from_index(index)
        self.image_conditions = ImageConditions(specs, f"the prompt cache {self.folder}") if specs else None
        self.shards = [(self.folder / file, count) for file, count in shard_files(index)]
        self.starts = [0]
        for _, count in self.shards:
            self.starts.append(self.starts[-1] + count)
        self._check_count(index)
        self._negative = self._negative_file(index, negative_from)
        self._check_shards(index, own_negative=negative_from is None)
        self._readers: Dict[Path, object] = {}
        self._offsets: Dict[Path, List[int]] = {}

    def _check_count(self, index: dict) -> None:
        if "count" in index and int(index["count"]) != len(self):
            raise DamagedFileError(
                f"{self.folder / INDEX_FILE} says {index['count']} prompts, and its shards hold {len(self)}"
            )

    def _check_shards(self, index: dict, own_negative: bool) -> None:
        fingerprint = index_fingerprint(index)
        tokens = [entry.get("tokens") for entry in index["shards"]]
        images = self.image_conditions.specs.values() if self.image_conditions is not None else ()
        shards = [
            ExpectedShard(path, count, fingerprint, length, tuple(images))
            for (path, count), length in zip(self.shards, tokens)
        ]
        if own_negative and self._negative is not None:  # another cache's was checked when it opened
            shards.append(ExpectedShard(self._negative, 1, fingerprint))
        check_shards(self.folder / INDEX_FILE, shards, self.layout, index.get("dtype"))

    def _negative_file(self, index: dict, negative_from) -> Optional[Path]:
        if negative_from is None:
            name = negative_file(index)
            return None if name is None else self.folder / name
        other = PromptCache(negative_from)
        if other.layout != self.layout:
            raise ValueError(
                f"negative prompt cache {other.folder} ({other.family}, width {other.dim}) does not "
                f"match prompt cache {self.folder} ({self.family}, width {self.dim})"
            )
        if other._negative is None:
            raise ValueError(f"negative prompt cache {other.folder} has no negative-prompt embeddings")
        return other._negative

    def __len__(self) -> int:
        return self.starts[-1]

    def check_model(self, family: str, text_dim: int) -> None:
        """Refuse a cache written for another model family or text width."""
        if self.family != family or self.dim != text_dim:
            raise ValueError(
                f"prompt cache {self.folder} holds {self.family} embeddings of width {self.dim}; "
                f"the model ({family}) takes text of width {text_dim}"
            )

    # -- one trimmed row [L, D] at a time

    def _reader(self, path: Path):
        from phased_dmd_mega.models.weights import TensorReader

        if path not in self._readers:
            self._readers[path] = reader = TensorReader.for_file(path)
            self._offsets[path] = reader.read(OFFSETS).tolist()
        return self._readers[path]

    def _read(self, path: Path, start: int, stop: int) -> torch.Tensor:
        reader = self._reader(path)
        offsets = self._offsets[path]
        return reader.read(CONTEXT, 0, offsets[start], offsets[stop])

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
        return spec.condition(condition, latents)

    def conditions(self, indices, resolution=None):
        # Both CFG branches run in one batch (Condition.cat): they share one padded length.
        # WanImageToVideoPipeline feeds the unconditional branch the same image condition (either kind).
        rows, negative = [self.row(i) for i in indices], self.negative_row()
        length = max(r.shape[0] for r in rows + [negative])
        positive = self._with_images(self._padded(rows, length), indices, resolution)
        negative = self.negative(len(indices), length)
        return positive, replace(negative, concat_latents=positive.concat_latents, first_frame=positive.first_frame)
