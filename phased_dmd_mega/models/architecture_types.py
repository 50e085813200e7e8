"""What an architecture's adapter is: the ``Architecture`` record through which the checkpoint code
(folders, checks, conversion, loading), written once, handles each DiT, and the helpers the
adapters share. Each architecture fills one in beside its formats (``wan_formats.WAN``,
``qwen_image_formats.QWEN_IMAGE``); ``architectures`` collects them.

What differs per architecture: its numbers (the ``dims_class``, its presets, its diffusers config
in and out), its model class, its weight-rule table, the diffusers tensor shapes it expects, and
which Hugging Face layouts it has. Wan adds its original (Wan-Video) layout and the Wan2.2 A14B
expert pairs; Qwen-Image has the diffusers layout only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from phased_dmd_mega.data import LatentGeometry

Shape = Tuple[int, ...]
Config = Mapping[str, Any]
MEGA_FORMAT = "phased-dmd-mega"  # config.json "format" of the trainer's own checkpoints


class CheckpointError(ValueError):
    """A checkpoint (folder, config or weights) that cannot be loaded or converted as asked."""


@dataclass(frozen=True)
class OriginalLayout:
    """An architecture's own, non-diffusers Hugging Face layout (Wan-Video's names and config).
    The weight rules speak diffusers names; ``names`` maps them to this layout's keys."""

    description: str  # how messages call its config, e.g. "an original Wan config (dim, num_heads, ...)"
    is_config: Callable[[Config], bool]
    # (config, {key: shape} of the folder's weights, where) -> dims; some configs leave the weights to decide
    dims_from_config: Callable[[Config, Mapping[str, Shape], str], Any]
    names: Callable[[Iterable[str]], Dict[str, str]]  # {diffusers key: key in this layout}
    config: Callable[[Any, Optional[Config]], Dict[str, Any]]  # (dims, source config) -> config.json to write


@dataclass(frozen=True)
class ExpertPairs:
    """Checkpoints holding a high-noise and a low-noise expert (Wan2.2 A14B)."""

    default_boundary_ratio: Callable[[Any], Optional[float]]  # when the checkpoint stores none
    pipeline_class: Callable[[Any], str]  # model_index.json's _class_name when none is kept
    # dims -> model_index.json settings the pipeline needs for these experts (Wan2.2-TI2V-5B: expand_timesteps)
    pipeline_settings: Callable[[Any], Dict[str, Any]] = lambda dims: {}


FP32_BYTES = 4  # norms and adaLN modulation run in fp32 whatever the model's dtype


@dataclass(frozen=True)
class BlockActivations:
    """Bytes one DiT block keeps for its backward, per token, by how tensor parallelism divides
    them (every kind is divided by the Ulysses size: each rank holds its share of the tokens)."""

    stream: float  # hidden-sized tensors of the residual stream: divided by TP under sequence parallelism
    sharded: float  # per-head and MLP-hidden tensors: divided by TP
    gathered: float  # RoPE cos/sin of the gathered sequence: never divided by TP
    block_input: float  # what a recomputed block keeps: its input tokens
    text_fixed: float = 0.0  # bytes per prompt token that do not scale with the latent tokens (divided by TP)

    def per_token(self, tensor_parallel: int, sequence_parallel: bool) -> float:
        stream_split = tensor_parallel if sequence_parallel else 1
        return self.stream / stream_split + self.sharded / tensor_parallel + self.gathered


def rope_bytes(head_dim: int) -> int:
    """The RoPE cos and sin of one token, for q and for k, in fp32."""
    return 2 * 2 * (head_dim // 2) * FP32_BYTES


@dataclass(frozen=True)
class Architecture:
    """Everything the checkpoint code needs to know about one DiT architecture."""

    name: str  # the family: model.family, the mega format's config "family", an --expect value
    title: str  # in messages
    dims_class: type
    model_class: type
    presets: Mapping[str, Any]
    diffusers_class: str  # the diffusers config's _class_name
    weight_rules: Callable[[Any], List[Any]]  # dims -> [WeightRule] (diffusers names -> the model's)
    diffusers_shapes: Callable[[Any], Dict[str, Shape]]  # dims -> every diffusers tensor's shape
    # (config, where) -> dims, refusing what the model does not implement (CheckpointError)
    dims_from_diffusers_config: Callable[[Config, str], Any]
    dims_to_diffusers_config: Callable[[Any], Dict[str, Any]]  # dims -> its diffusers config.json
    diffusers_fields: Tuple[str, ...]  # fields that tell its diffusers config when _class_name is absent
    diffusers_non_dims_fields: Tuple[str, ...]  # kept from the source config on export
    summary: Callable[[Any], str]  # dims -> "dim 64, 4 heads, ..." for messages
    vae_class: str  # diffusers' VAE class of the family's pipelines
    text_encoder_class: str  # transformers' text encoder class of the family's pipelines
    # (dims, activation dtype bytes) -> what one block keeps for its backward (the memory estimate)
    block_activations: Callable[[Any, int], BlockActivations]
    prompt_tokens: int  # the tokens a prompt is padded to (or at most has) in the family's pipelines
    joint_text: bool  # the prompt runs through the blocks as a second token stream (joint attention)
    original: Optional[OriginalLayout] = None
    experts: Optional[ExpertPairs] = None

    synthetic_prompt_tokens: int = 16  # length of the random prompt embeddings of smoke tests
    # dims -> (temporal, spatial) compression of the family's VAE for a DiT of these latent channels
    vae_compression: Callable[[Any], Tuple[int, int]] = lambda dims: (4, 8)
    max_frames: Optional[int] = None  # frames one sample may have (None: any video; 1: images only)

    # ------------------------------------------------------------------ tokens

    def dit_tokens(self, dims, latent_grid: Tuple[int, int, int]) -> int:
        """The latent tokens of a (frames, height, width) latent: one per ``dims.token_patch``."""
        count = 1
        for size, patch in zip(latent_grid, dims.token_patch):
            count *= size // patch
        return count

    def text_tokens_in_blocks(self) -> int:
        """The prompt tokens that run through every block beside the latent tokens."""
        return self.prompt_tokens if self.joint_text else 0

    def latent_geometry(self, dims) -> LatentGeometry:
        """The latents of a DiT of ``dims``: its output channels, its family's VAE compression."""
        temporal, spatial = self.vae_compression(dims)
        return LatentGeometry(channels=dims.out_channels, temporal=temporal, spatial=spatial)

    # ------------------------------------------------------------------ layouts and configs

    @property
    def hf_layouts(self) -> Tuple[str, ...]:
        return ("diffusers", "original") if self.original is not None else ("diffusers",)

    def is_diffusers_config(self, config: Config) -> bool:
        name = config.get("_class_name")
        if name is not None:
            return name == self.diffusers_class
        return all(field in config for field in self.diffusers_fields)

    def hf_layout_of(self, config: Config) -> Optional[str]:
        """ "diffusers" or "original" when ``config`` is one of this architecture's, else None."""
        if self.is_diffusers_config(config):
            return "diffusers"
        if self.original is not None and self.original.is_config(config):
            return "original"
        return None

    def config_descriptions(self) -> List[str]:
        described = [f"a diffusers {self.diffusers_class} config"]
        if self.original is not None:
            described.append(self.original.description)
        return described

    def diffusers_config(self, dims, source: Optional[Config] = None) -> Dict[str, Any]:
        """A diffusers config.json for ``dims``, keeping ``source``'s non-architecture fields."""
        return keep_fields(self.dims_to_diffusers_config(dims), source, self.diffusers_non_dims_fields)

    # ------------------------------------------------------------------ the mega format's record

    def dims_to_json(self, dims) -> Dict[str, Any]:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(dims).items()}

    def dims_from_json(self, data: Config, where: str):
        known = {f.name for f in fields(self.dims_class)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(
                f"{where}: unknown {self.title} architecture fields {unknown} (known: {sorted(known)})"
            )
        # JSON has no tuples: every list-valued field of a dims is a tuple.
        values = {name: tuple(value) if isinstance(value, list) else value for name, value in data.items()}
        try:
            return self.dims_class(**values)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: bad {self.title} architecture: {err}") from err

    # ------------------------------------------------------------------ presets

    def check_preset(self, found, requested: Optional[str], where: str):
        """``requested`` None or this architecture's name: ``found`` as it is; one of its preset
        names: ``found`` must be that preset."""
        if requested in (None, self.name):
            return found
        preset = self.presets[requested]
        if found != preset:
            raise CheckpointError(f"{where} is not preset {requested!r}: {dims_differences(found, preset)}")
        return found


# ----------------------------------------------------------------------------- shared helpers


def dims_differences(found, wanted) -> str:
    """'field found (preset wanted)' for every field that differs."""
    return ", ".join(
        f"{f.name} {getattr(found, f.name)!r} (preset {getattr(wanted, f.name)!r})"
        for f in fields(found)
        if getattr(found, f.name) != getattr(wanted, f.name)
    )


def keep_fields(config: Dict[str, Any], source: Optional[Config], names: Iterable[str]) -> Dict[str, Any]:
    """``config`` with ``names`` copied from ``source`` where it has them."""
    for name in names:
        if source is not None and name in source:
            config[name] = source[name]
    return config


def require_fields(config: Config, names: Iterable[str], where: str) -> None:
    missing = [name for name in names if name not in config]
    if missing:
        raise CheckpointError(f"{where}: missing config fields {missing}")


def add_linear(shapes: Dict[str, Shape], name: str, out_features: int, in_features: int) -> None:
    """A diffusers Linear's weight and bias shapes."""
    shapes[f"{name}.weight"] = (out_features, in_features)
    shapes[f"{name}.bias"] = (out_features,)
