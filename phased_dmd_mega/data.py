"""What a training step is conditioned on: prompt embeddings and the latent shape.

Every rank of a model-parallel group must see the same batch, and data-parallel groups
different ones. Nothing here communicates: the randomness of step ``i`` comes from generators
seeded by (seed, i, data-parallel rank), so a resumed run draws exactly what the uninterrupted
run would have drawn.

Prompt sources: random ones here (``SyntheticPrompts``), and the prompt-embedding cache written by
``phased-dmd encode-prompts`` (phased_dmd_mega/prompt_cache/, its format in prompt_cache/format.py).
Image-to-video rows also bring their first frame's latents (``ImageConditionSpec``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch

from phased_dmd_mega.condition import Condition


def step_generator(seed: int, iteration: int, data_parallel_rank: int, purpose: int = 0) -> torch.Generator:
    # Reduced into torch's seed range: a large seed no longer overflows it (smaller keys keep
    # their draws, so runs and checkpoints of earlier versions resume the same).
    key = ((seed * 1_000_003 + iteration) * 1009 + data_parallel_rank) * 31 + purpose
    return torch.Generator().manual_seed(key % 2**63)


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
        return self.channels, self.latent_frames(frames), height // self.spatial, width // self.spatial

    def latent_frames(self, frames: int) -> int:
        """Wan's VAE: the first frame alone, then ``temporal`` frames per latent frame."""
        return 1 if frames == 1 else (frames - 1) // self.temporal + 1

    def unfit(self, resolution: Sequence[int], token_patch: Sequence[int], max_frames: Optional[int] = None):
        """Why a (frames, height, width) video does not make latents of whole tokens
        (``token_patch``: latent frames, height, width per token), or None when it does."""
        frames, height, width = resolution
        if max_frames is not None and frames > max_frames:
            return f"frames {frames}: the model takes at most {max_frames}"
        if frames > 1 and (frames - 1) % self.temporal:
            step = self.temporal
            return (
                f"frames {frames} is not 1 or {step}k+1 (the VAE compresses {step} frames into one latent frame "
                f"after the first): {_nearest(frames - 1, step, 1)}"
            )
        latent_frames = self.latent_frames(frames)
        if latent_frames % token_patch[0]:
            return f"frames {frames} make {latent_frames} latent frames: not whole tokens of {token_patch[0]} frames"
        for size, name, patch in ((height, "height", token_patch[1]), (width, "width", token_patch[2])):
            step = self.spatial * patch
            if size % step:
                return (
                    f"{name} {size} is not a multiple of {step} (the VAE's {self.spatial}x compression times the "
                    f"{patch}-latent token patch): {_nearest(size, step)}"
                )
        return None


def _nearest(size: int, step: int, offset: int = 0) -> str:
    """ "480 or 496": the multiples of ``step`` (plus ``offset``) on either side of ``size``."""
    below = size // step * step
    return " or ".join(str(v + offset) for v in (below, below + step) if v > 0)


IMAGE_LATENTS = "image_latents"  # the first-frame latents of a cache of one resolution (older caches)


def resolution_text(resolution: Sequence[int]) -> str:
    """(81, 480, 832) -> "81x480x832", as --resolution writes it."""
    return "x".join(map(str, resolution))


def parse_resolution(text: str, frames_optional: bool = False) -> Optional[Tuple[int, int, int]]:
    """ "81x480x832" -> (frames, height, width), or None when ``text`` is not positive integers
    joined by x; with ``frames_optional``, "480x832" is one frame: (1, 480, 832)."""
    parts = str(text).lower().split("x")
    numbers = [int(part) for part in parts if part.strip().isdecimal()]
    lengths = (2, 3) if frames_optional else (3,)
    if len(numbers) != len(parts) or len(numbers) not in lengths or min(numbers) < 1:
        return None
    return tuple(numbers) if len(numbers) == 3 else (1, *numbers)


CHANNELS, FIRST_FRAME = "channels", "first_frame"  # the kinds of image condition (vae.WanVAE)


@dataclass(frozen=True)
class ImageConditionSpec:
    """The image condition of an I2V prompt cache, as WanImageToVideoPipeline.prepare_latents
    builds it (no last frame). ``kind`` "channels" (``expand_timesteps`` off, Wan2.2-I2V-A14B): a
    mask of ``mask_channels`` (the VAE's temporal compression) that is one on the first latent
    frame, then the VAE latents of [first frame, black frames...], concatenated to the noisy
    latents. ``kind`` "first_frame" (``expand_timesteps`` on, Wan2.2-TI2V-5B): the VAE latents of
    the image alone [C, 1, h, w], which replace the first latent frame (``Condition.first_frame``).
    Both normalised with the VAE's latents_mean/latents_std."""

    resolution: Tuple[int, int, int]  # pixels: frames, height, width
    latent_shape: Tuple[int, int, int, int]  # the stored latents: channels, frames, height, width
    mask_channels: int = 4  # "first_frame": 0
    spatial: int = 8  # the VAE's spatial compression
    tensor: str = IMAGE_LATENTS  # the shard tensor holding these latents
    kind: str = CHANNELS
    temporal: int = 4  # the VAE's temporal compression

    @staticmethod
    def tensor_name(resolution: Sequence[int]) -> str:
        return f"{IMAGE_LATENTS}.{resolution_text(resolution)}"

    @property
    def channels(self) -> int:
        """Input channels the condition adds to the DiT's noisy latents (Wan2.2 I2V: 4 + 16; TI2V: none)."""
        return 0 if self.kind == FIRST_FRAME else self.mask_channels + self.latent_shape[0]

    @property
    def geometry(self) -> LatentGeometry:
        return LatentGeometry(self.latent_shape[0], self.temporal, self.spatial)

    def describe(self) -> str:
        return resolution_text(self.resolution) + " (frames x height x width)"

    def to_index(self) -> dict:
        return {
            "resolution": list(self.resolution),
            "latent_shape": list(self.latent_shape),
            "mask_channels": self.mask_channels,
            "spatial": self.spatial,
            "tensor": self.tensor,
            "kind": self.kind,
            "temporal": self.temporal,
        }

    @classmethod
    def from_index(cls, entry: dict) -> "ImageConditionSpec":
        return cls(
            tuple(entry["resolution"]),
            tuple(entry["latent_shape"]),
            int(entry["mask_channels"]),
            int(entry["spatial"]),
            entry.get("tensor", IMAGE_LATENTS),
            entry.get("kind", CHANNELS),  # caches before TI2V: channels, the mask as long as the compression
            int(entry.get("temporal", entry["mask_channels"])),
        )

    @staticmethod
    def index_entries(specs: Sequence["ImageConditionSpec"]) -> dict:
        """The prompt cache index's entries of its image conditions (read by ``all_from_index``)."""
        return {"image_conditions": [spec.to_index() for spec in specs]}

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

    def condition(self, condition: Condition, latents: torch.Tensor) -> Condition:
        """``condition`` given the first-frame latents [B, C, F, h, w] as this kind conditions on them."""
        if self.kind == FIRST_FRAME:
            if tuple(latents.shape[1:]) != self.latent_shape:
                raise ValueError(
                    f"first-frame latents of shape {tuple(latents.shape[1:])}, expected {self.latent_shape}"
                )
            return replace(condition, first_frame=latents)
        return replace(condition, concat_latents=self.concat_latents(latents))

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
        layouts = {(spec.kind, spec.mask_channels, spec.latent_shape[0], spec.spatial) for spec in specs}
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
