"""The DiT architectures that checkpoints, conversion and ``load_pretrained`` know: one adapter each.

The checkpoint code (folders, checks, conversion, loading) is written once. What differs per
architecture is gathered in one ``Architecture`` object: its numbers (the ``arch_class``, its
presets, its diffusers config in and out), its model class, its weight-rule table, the diffusers
tensor shapes it expects, and which Hugging Face layouts it has. Wan adds its original
(Wan-Video) layout and the Wan2.2 A14B expert pairs; Qwen-Image has the diffusers layout only.

The adapters are declared beside their formats (``wan_formats.WAN``,
``qwen_image_formats.QWEN_IMAGE``), which use this module's types; ``registry()`` collects them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

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
    # (config, {key: shape} of the folder's weights, where) -> arch; some configs leave the weights to decide
    arch_from_config: Callable[[Config, Mapping[str, Shape], str], Any]
    names: Callable[[Iterable[str]], Dict[str, str]]  # {diffusers key: key in this layout}
    config: Callable[[Any, Optional[Config]], Dict[str, Any]]  # (arch, source config) -> config.json to write


@dataclass(frozen=True)
class ExpertPairs:
    """Checkpoints holding a high-noise and a low-noise expert (Wan2.2 A14B)."""

    default_boundary_ratio: Callable[[Any], Optional[float]]  # when the checkpoint stores none
    pipeline_class: Callable[[Any], str]  # model_index.json's _class_name when none is kept


@dataclass(frozen=True)
class Architecture:
    """Everything the checkpoint code needs to know about one DiT architecture."""

    name: str  # the mega format's config "arch" and the --arch value
    title: str  # in messages
    arch_class: type
    model_class: type
    presets: Mapping[str, Any]
    diffusers_class: str  # the diffusers config's _class_name
    weight_rules: Callable[[Any], List[Any]]  # arch -> [WeightRule] (diffusers names -> the model's)
    diffusers_shapes: Callable[[Any], Dict[str, Shape]]  # arch -> every diffusers tensor's shape
    # (config, where) -> arch, refusing what the model does not implement (CheckpointError)
    arch_from_diffusers_config: Callable[[Config, str], Any]
    diffusers_fields: Tuple[str, ...]  # fields that tell its diffusers config when _class_name is absent
    diffusers_non_arch_fields: Tuple[str, ...]  # kept from the source config on export
    summary: Callable[[Any], str]  # arch -> "dim 64, 4 heads, ..." for messages
    original: Optional[OriginalLayout] = None
    experts: Optional[ExpertPairs] = None

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
        """"diffusers" or "original" when ``config`` is one of this architecture's, else None."""
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

    def diffusers_config(self, arch, source: Optional[Config] = None) -> Dict[str, Any]:
        """A diffusers config.json for ``arch``, keeping ``source``'s non-architecture fields."""
        return keep_fields(arch.to_diffusers_config(), source, self.diffusers_non_arch_fields)

    # ------------------------------------------------------------------ the mega format's record

    def arch_to_json(self, arch) -> Dict[str, Any]:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(arch).items()}

    def arch_from_json(self, data: Config, where: str):
        known = {f.name for f in fields(self.arch_class)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(
                f"{where}: unknown {self.title} architecture fields {unknown} (known: {sorted(known)})"
            )
        # JSON has no tuples: every list-valued field of an arch is a tuple.
        values = {name: tuple(value) if isinstance(value, list) else value for name, value in data.items()}
        try:
            return self.arch_class(**values)
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
            raise CheckpointError(f"{where} is not preset {requested!r}: {arch_differences(found, preset)}")
        return found


# ----------------------------------------------------------------------------- the registry


@lru_cache(maxsize=None)
def registry() -> Dict[str, Architecture]:
    """name -> adapter. Imported here, not at the top: the adapters' modules use this module."""
    from phased_dmd_mega.models.qwen_image_formats import QWEN_IMAGE
    from phased_dmd_mega.models.wan_formats import WAN

    return {adapter.name: adapter for adapter in (WAN, QWEN_IMAGE)}


def get_architecture(name: str, where: str) -> Architecture:
    """The adapter called ``name`` (a mega config's "arch")."""
    if name not in registry():
        raise CheckpointError(f"{where}: arch {name!r} is not supported (known: {', '.join(map(repr, registry()))})")
    return registry()[name]


def architecture_of(arch) -> Architecture:
    """The adapter whose arch class ``arch`` is an instance of."""
    for adapter in registry().values():
        if isinstance(arch, adapter.arch_class):
            return adapter
    raise TypeError(f"{type(arch).__name__} is not the arch class of any registered architecture")


def check_requested_name(requested: Optional[str]) -> None:
    """``requested`` must be None, an architecture's name or one of their presets' names."""
    if requested is None or requested in registry():
        return
    if any(requested in adapter.presets for adapter in registry().values()):
        return
    presets = "; ".join(f"{name}: {', '.join(a.presets)}" for name, a in registry().items())
    raise CheckpointError(
        f"unknown arch {requested!r}: expected {' or '.join(map(repr, registry()))} or a preset ({presets})"
    )


def check_requested_family(found: Architecture, what: str, requested: Optional[str]) -> None:
    """``requested`` (an architecture or a preset name) must be of ``found``'s architecture;
    ``what`` says what the folder holds ("/x/config.json is a diffusers ... config")."""
    check_requested_name(requested)
    if requested is None or requested == found.name or requested in found.presets:
        return
    wanted = registry()[requested] if requested in registry() else next(
        a for a in registry().values() if requested in a.presets
    )
    accepted = wanted.config_descriptions() + [f"a {MEGA_FORMAT} {wanted.name!r} config"]
    asked = f"arch {requested!r}" + ("" if requested == wanted.name else f" (a {wanted.title} preset)")
    raise CheckpointError(
        f"{what} ({found.title}), neither {', '.join(accepted[:-1])} nor {accepted[-1]} as {asked} "
        f"asks; pass arch {found.name!r} or a {found.title} preset ({', '.join(found.presets)})"
    )


# ----------------------------------------------------------------------------- shared helpers


def arch_differences(found, wanted) -> str:
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
