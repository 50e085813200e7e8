"""megatron-core's two families of tensor-parallel linears (local and Transformer Engine) and how
to tell them apart: the models build from them, the parallel plan tags them, LoRA wraps them."""

from __future__ import annotations

import importlib.util
from typing import Optional, Tuple

import torch
from torch import nn


def has_transformer_engine() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def local_linear_classes() -> Tuple[type, type]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear


def te_linear_classes() -> Optional[Tuple[type, type]]:
    """megatron's TE wrappers, or None where TE cannot be imported (megatron then defines them
    over a MagicMock, which no module is an instance of)."""
    from megatron.core.extensions import transformer_engine as mcore_te

    if not mcore_te.HAVE_TE:
        return None
    return mcore_te.TEColumnParallelLinear, mcore_te.TERowParallelLinear


def parallel_linear_kind(module: nn.Module) -> Optional[str]:
    """ "column" or "row" for a tensor-parallel linear of either family, else None."""
    families = [local_linear_classes()]
    te = te_linear_classes() if has_transformer_engine() else None
    if te is not None:
        families.append(te)
    for column, row in families:
        if isinstance(module, column):
            return "column"
        if isinstance(module, row):
            return "row"
    return None
