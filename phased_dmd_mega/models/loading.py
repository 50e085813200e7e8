"""``load_pretrained``: a checkpoint of any registered architecture (Wan, Qwen-Image), in any of
its layouts -> that architecture's model for this parallel state.

Each tensor-parallel rank reads only its own slices of the weights (safetensors slicing through
the checkpoint's view), one parameter at a time, straight into the model's parameters.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from phased_dmd_mega.log import get_logger
from phased_dmd_mega.models.architecture_types import CheckpointError
from phased_dmd_mega.models.checkpoints import (
    CheckpointView,
    check_tensor_parallel,
    inspect_checkpoint,
    open_model,
)
from phased_dmd_mega.models.options import ModelParallelOptions

log = get_logger(__name__)

# ModelParallelOptions fields set by load_pretrained itself rather than passed through.
_SET_HERE = ("dtype", "initialize")


def load_pretrained(
    path: Union[str, Path],
    *,
    expect: Optional[str] = None,
    expert: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    weights: bool = True,
    **model_options: Any,
) -> nn.Module:
    """Build the model of ``path``'s architecture (a WanModel or a QwenImageModel) for the
    current parallel state (``parallel.initialize`` first): a diffusers folder or pipeline root,
    an original Wan folder, or the converter's own format; sharded or not. ``expect`` is None (the
    folder's config decides), a family ("wan", "qwen_image") or a preset name, which the folder
    must hold. ``expert`` ("high" / "low") picks a Wan2.2 A14B expert and is required for
    such a checkpoint. ``weights=False`` builds the model without reading its weights (its
    parameters are left uninitialised: for weights that come from elsewhere, such as a training
    checkpoint's generators). ``model_options`` go to ModelParallelOptions (sequence_parallel,
    attention_backend, transformer_impl, fp8_recipe, recompute, ...); sequence_parallel defaults
    to the parallel layout's. The model is built on the CPU (megatron's CPU initialisation);
    move it with ``.to(parallel.layout().device)``."""
    from phased_dmd_mega import parallel

    layout = parallel.layout("load_pretrained needs the parallel state")
    checkpoint = inspect_checkpoint(path, expect)
    files = open_model(checkpoint.model_folder(expert), checkpoint.layout, expect, checkpoint.architecture)
    check_tensor_parallel(files.dims, layout.tensor_parallel, layout.ulysses_parallel)
    options = {"sequence_parallel": layout.sequence_parallel, **model_options}
    par = ModelParallelOptions(dtype=dtype, initialize=False, **_checked_options(options))
    model = files.architecture.model_class(files.dims, par)
    if not weights:
        return model
    _load_rank_weights(model, files.view, layout.tensor_parallel_rank, layout.tensor_parallel)
    log.info(
        "loaded %s (%s %s layout%s) at tensor parallel %d",
        files.folder,
        files.architecture.title,
        files.layout,
        f", {expert} noise expert" if expert else "",
        layout.tensor_parallel,
    )
    return model


def _checked_options(options: dict) -> dict:
    allowed = sorted(f.name for f in fields(ModelParallelOptions) if f.name not in _SET_HERE)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"load_pretrained: unknown model options {unknown}; allowed: {allowed} (and dtype)")
    return options


@torch.no_grad()
def _load_rank_weights(model: nn.Module, view: CheckpointView, rank: int, size: int) -> None:
    params = dict(model.named_parameters())
    wanted = {rule.own for rule in view.rules}
    if wanted != set(params):  # the rule table and the model must describe the same parameters
        raise AssertionError(
            f"rule table vs model: not in the model {sorted(wanted - set(params))}, "
            f"not in the table {sorted(set(params) - wanted)}"
        )
    for rule in view.rules:
        local = view.read_local(rule, rank, size)
        param = params[rule.own]
        if tuple(local.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{rule.own}: {tuple(local.shape)} read from {view.folder} at rank {rank} of {size}, "
                f"the model expects {tuple(param.shape)}"
            )
        param.copy_(local)
