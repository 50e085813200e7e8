"""How a DiT is split and run (``ModelParallelOptions``, not part of its architecture) and the
FP8 rules that go with it: which recipes a GPU can run and Transformer Engine's autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from phased_dmd_mega.models.recompute import RECOMPUTE_MODES
from phased_dmd_mega.parallel.state import amax_reduction_group


@dataclass(frozen=True)
class ModelParallelOptions:
    """How a DiT is split and run (not part of its architecture); the same for every model."""

    sequence_parallel: bool = False
    attention_backend: str = "auto"
    transformer_impl: str = "local"
    dtype: torch.dtype = torch.float32
    initialize: bool = True  # False when weights are loaded right after construction
    fp8_recipe: Optional[str] = None  # delayed | current | mxfp8, with transformer_engine only
    recompute: str = "none"  # none | full | blocks (the first recompute_num_blocks blocks)
    recompute_num_blocks: int = 0

    def validate(self) -> None:
        if self.fp8_recipe is not None and self.transformer_impl != "transformer_engine":
            raise ValueError(f"fp8_recipe={self.fp8_recipe!r} needs transformer_impl='transformer_engine'")
        if self.fp8_recipe is not None and torch.cuda.is_available():
            check_fp8_recipe(self.fp8_recipe, torch.cuda.get_device_capability(), torch.cuda.get_device_name())
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute {self.recompute!r} is not one of {', '.join(RECOMPUTE_MODES)}")
        if self.recompute == "blocks" and self.recompute_num_blocks < 1:
            raise ValueError("recompute='blocks' needs recompute_num_blocks >= 1")

    @property
    def token_multiple(self) -> int:
        """Each rank's token count is padded to a multiple of this (FP8 GEMMs need it)."""
        return FP8_TOKEN_MULTIPLE[self.fp8_recipe] if self.fp8_recipe is not None else 1


# ----------------------------------------------------------------------------- FP8

FP8_RECIPES = ("delayed", "current", "mxfp8")
# Compute capability each recipe needs (TE's check_fp8_support / check_mxfp8_support).
FP8_MIN_CAPABILITY = {"delayed": (8, 9), "current": (8, 9), "mxfp8": (10, 0)}
# TE's FP8 GEMMs need the product of an input's leading dims to be a multiple of 8 (per-tensor
# scaling) or of the 32-element MXFP8 block (utils.assert_dim_for_fp8_exec, MXFP8Quantizer).
FP8_TOKEN_MULTIPLE = {"delayed": 8, "current": 8, "mxfp8": 32}


def check_fp8_recipe(recipe_name: Optional[str], capability: Optional[Tuple[int, int]], device_name: str = "") -> None:
    """Refuse a recipe the GPU cannot run (``capability`` None: no GPU to check against)."""
    if recipe_name is None:
        return
    if recipe_name not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe {recipe_name!r} is not one of {', '.join(FP8_RECIPES)}")
    needed = FP8_MIN_CAPABILITY[recipe_name]
    if capability is not None and tuple(capability) < needed:
        usable = [name for name, need in FP8_MIN_CAPABILITY.items() if tuple(capability) >= need]
        raise ValueError(
            f"fp8_recipe={recipe_name} needs compute capability {needed[0]}.{needed[1]} or higher; this GPU "
            f"{device_name + ' ' if device_name else ''}has {capability[0]}.{capability[1]}"
            + (f": use {' or '.join(usable)}" if usable else ": it has no FP8 tensor cores")
        )


def _te_recipe(recipe_name: str):
    from transformer_engine.common import recipe

    return {
        "delayed": recipe.DelayedScaling,
        "current": recipe.Float8CurrentScaling,
        "mxfp8": recipe.MXFP8BlockScaling,
    }[recipe_name]()


def _te_autocast(enabled: bool, recipe_name: Optional[str] = None):
    """TE's quantization autocast: ``te.autocast`` since TE 2.9, ``te.fp8_autocast`` (now
    deprecated) before. Delayed scaling all-reduces its amax history on exit over the group
    given; the tensor- and Ulysses-parallel ranks run the same samples through the same modules
    (data-parallel ranks may route samples to different experts, so they are left out)."""
    import transformer_engine.pytorch as te

    kwargs = {}
    if enabled:
        kwargs = {"recipe": _te_recipe(recipe_name), "amax_reduction_group": amax_reduction_group()}
    if hasattr(te, "autocast"):
        return te.autocast(enabled=enabled, **kwargs)
    renamed = {"fp8_recipe": kwargs["recipe"], "fp8_group": kwargs["amax_reduction_group"]} if enabled else {}
    return te.fp8_autocast(enabled=enabled, **renamed)


def fp8_autocast(recipe_name: Optional[str]):
    """Transformer Engine's FP8 autocast for the TE layers inside it (modulation, embeddings
    and head are plain torch layers and stay in bf16); a no-op context without a recipe."""
    if recipe_name is None:
        return contextlib.nullcontext()
    check_fp8_recipe(recipe_name, None)
    return _te_autocast(True, recipe_name)


def without_fp8(recipe_name: Optional[str]):
    """TE layers inside run in their high-precision dtype: for short side inputs (text and image
    context) whose token count FP8 GEMMs may not take."""
    if recipe_name is None:
        return contextlib.nullcontext()
    return _te_autocast(False)
