"""The DiT architectures that checkpoints, conversion and ``load_pretrained`` know: one adapter
each (an ``architecture_types.Architecture``), declared beside its formats (``wan_formats.WAN``,
``qwen_image_formats.QWEN_IMAGE``) and collected here.
"""

from __future__ import annotations

from typing import Dict, Optional

from phased_dmd_mega.models.architecture_types import MEGA_FORMAT, Architecture, CheckpointError
from phased_dmd_mega.models.qwen_image_formats import QWEN_IMAGE
from phased_dmd_mega.models.wan_formats import WAN

_REGISTRY: Dict[str, Architecture] = {adapter.name: adapter for adapter in (WAN, QWEN_IMAGE)}


def registry() -> Dict[str, Architecture]:
    """name -> adapter."""
    return _REGISTRY


def get_architecture(name: str, where: str) -> Architecture:
    """The adapter of the family ``name`` (a mega config's "family")."""
    if name not in registry():
        raise CheckpointError(f"{where}: family {name!r} is not supported (known: {', '.join(map(repr, registry()))})")
    return registry()[name]


def architecture_of(dims) -> Architecture:
    """The adapter whose dims class ``dims`` is an instance of."""
    for adapter in registry().values():
        if isinstance(dims, adapter.dims_class):
            return adapter
    raise TypeError(f"{type(dims).__name__} is not the dims class of any registered architecture")


def check_requested_name(requested: Optional[str]) -> None:
    """``requested`` (what a checkpoint folder is expected to hold) must be None, a family (an
    architecture's name) or one of their presets' names."""
    if requested is None or requested in registry():
        return
    if any(requested in adapter.presets for adapter in registry().values()):
        return
    presets = "; ".join(f"{name}: {', '.join(a.presets)}" for name, a in registry().items())
    raise CheckpointError(
        f"unknown family or preset {requested!r}: expected {' or '.join(map(repr, registry()))} or a preset ({presets})"
    )


def check_requested_family(found: Architecture, what: str, requested: Optional[str]) -> None:
    """``requested`` (a family or a preset name) must be of ``found``'s family;
    ``what`` says what the folder holds ("/x/config.json is a diffusers ... config")."""
    check_requested_name(requested)
    if requested is None or requested == found.name or requested in found.presets:
        return
    wanted = (
        registry()[requested]
        if requested in registry()
        else next(a for a in registry().values() if requested in a.presets)
    )
    accepted = wanted.config_descriptions() + [f"a {MEGA_FORMAT} {wanted.name!r} config"]
    asked = repr(requested) + ("" if requested == wanted.name else f", a {wanted.title} preset")
    raise CheckpointError(
        f"{what} ({found.title}), neither {', '.join(accepted[:-1])} nor {accepted[-1]} as expected ({asked}); "
        f"expect {found.name!r} or a {found.title} preset ({', '.join(found.presets)})"
    )
