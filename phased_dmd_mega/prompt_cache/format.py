"""The on-disk format of the prompt-embedding cache, defined once for its writer and its reader.

A cache is a folder with the index ``prompts.json`` and safetensors shards. Each prompt is stored
trimmed to its true token count (a Wan prompt padded to 512 x 4096 would take 4 MiB in bf16): a
shard holds ``context`` [sum of lengths, D], the rows one after the other, and ``offsets`` [n + 1]
(row i is ``context[offsets[i]:offsets[i + 1]]``); ``negative.safetensors`` holds the negative
prompt alike. The index says how rows are padded back on load (``RowLayout``): ``pad_to`` = 512
for Wan (zeros, no mask: the DiT sees exactly what the diffusers pipeline feeds it), or null for
Qwen-Image (the longest row of the batch, with a 0/1 ``context_mask``). Rows are read one at a time.

Image-conditioned caches (Wan2.2 I2V, ``encode-prompts --vae``) also hold, per row, the VAE latents
of the first frame followed by black frames at every resolution the index lists under
``image_conditions``: the shard tensor ``image_latents.<F>x<H>x<W>`` [n, C, F, h, w] per resolution
(a cache written before several resolutions existed has one ``image_latents`` tensor and an
``image_condition`` entry; it still reads). Those entries are ``data.ImageConditionSpec``'s. The
mask channels (ones on the first latent frame) depend only on the shape and are rebuilt on load;
every row's condition ``concat_latents = cat(mask, latents)`` [B, mask + C, F, h, w], at the
step's resolution, goes with both CFG branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

INDEX_FILE = "prompts.json"
FORMAT = "phased-dmd-prompt-cache"
VERSION = 1
NEGATIVE_FILE = "negative.safetensors"
CONTEXT = "context"  # shard tensor: the trimmed rows, one after the other
OFFSETS = "offsets"  # shard tensor: where each row starts in CONTEXT, and where the last ends
FINGERPRINT = "fingerprint"  # the metadata stamp of a written file: the inputs it was encoded from

# --dtype names -> the dtype the embeddings are stored in.
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}

# The index's dtype names -> safetensors' names of the stored tensors' dtypes.
SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

_SHARD_PREFIX, _SHARD_SUFFIX = "shard-", ".safetensors"


def shard_file(number: int) -> str:
    return f"{_SHARD_PREFIX}{number:05d}{_SHARD_SUFFIX}"


def is_shard_file(path: Path) -> bool:
    return path.name.startswith(_SHARD_PREFIX) and path.suffix == _SHARD_SUFFIX


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", as the index records it."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class RowLayout:
    """How the rows are padded back on load: the part of the index the reader relies on."""

    family: str
    dim: int
    pad_to: Optional[int]  # Wan: zeros to 512, no mask; None: the batch's longest row, with a mask
    masked: bool

    def to_index(self) -> Dict[str, object]:
        return {"family": self.family, "dim": self.dim, "pad_to": self.pad_to, "masked": self.masked}

    @classmethod
    def from_index(cls, index: dict) -> "RowLayout":
        return cls(index["family"], int(index["dim"]), index["pad_to"], bool(index["masked"]))


def make_index(
    layout: RowLayout,
    *,
    dtype: str,
    count: int,
    fingerprint: str,
    settings: Dict[str, object],
    source: Dict[str, object],
    negative_prompt: Optional[str],
    shards: Sequence[Dict[str, object]] = (),
    complete: bool = False,
) -> Dict[str, object]:
    """An index; ``complete`` once every shard of ``shards`` is written."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "complete": complete,
        **layout.to_index(),
        "dtype": dtype,
        "count": count,
        "fingerprint": fingerprint,
        "settings": settings,
        "source": source,
        "negative": {"file": NEGATIVE_FILE, "prompt": negative_prompt},
        "shards": list(shards),
    }


def completed(index: dict, shards: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """The index once ``shards`` are all written."""
    return {**index, "complete": True, "shards": list(shards)}


def index_fingerprint(index: dict) -> Optional[str]:
    """The fingerprint of the inputs the cache is encoded from."""
    return index.get("fingerprint")


def is_complete(index: dict) -> bool:
    return bool(index.get("complete"))


def shard_entry(file: str, count: int, tokens: Optional[int] = None) -> Dict[str, object]:
    """The index's entry of a shard: its file, its rows and (written by encode-prompts) the
    length of its ``context``."""
    entry: Dict[str, object] = {"file": file, "count": count}
    if tokens is not None:
        entry["tokens"] = tokens
    return entry


def shard_files(index: dict) -> List[Tuple[str, int]]:
    """(file, rows) of every shard, in row order."""
    return [(entry["file"], int(entry["count"])) for entry in index["shards"]]


def negative_file(index: dict) -> Optional[str]:
    negative = index.get("negative")
    return negative["file"] if negative else None


def negative_prompt(index: dict) -> Optional[str]:
    """The negative prompt's text (None for embeddings computed elsewhere)."""
    return index["negative"]["prompt"]


def format_mismatch(index: dict) -> Optional[str]:
    """What makes ``index`` not an index of this format version, or None."""
    if index.get("format") == FORMAT and index.get("version") == VERSION:
        return None
    return (
        f"is not a version-{VERSION} prompt cache index "
        f"(format {index.get('format')!r}, version {index.get('version')!r})"
    )
