"""Ulysses sequence parallelism: all-to-all between sequence shards and head shards.

The exchange itself is DeepSpeed's (``deepspeed.sequence.layer``), the same one its
``DistributedAttention`` uses, run on this project's Ulysses group.
"""

from __future__ import annotations

import torch

from phased_dmd_mega.parallel import state


def _ensure_deepspeed_comm() -> None:
    # deepspeed.comm wraps an already running torch.distributed; it must be told once.
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend=state.layout().backend, verbose=False)


def seq_all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, batch_dim: int = 0) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` across the Ulysses group and concatenate the pieces
    received along ``gather_dim``. Differentiable (the backward is the reverse exchange).

    With ``x`` of shape [B, S/P, H, D] on each rank, ``seq_all_to_all(x, 2, 1)`` gives
    [B, S, H/P, D]; ``seq_all_to_all(y, 1, 2)`` undoes it.
    """
    group = state.ulysses_group()
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return x
    if x.shape[scatter_dim] % size != 0:
        raise ValueError(
            f"dimension {scatter_dim} of size {x.shape[scatter_dim]} does not divide by the Ulysses group size {size}"
        )
    _ensure_deepspeed_comm()
    from deepspeed.sequence.layer import _SeqAllToAll

    return _SeqAllToAll.apply(group, x.contiguous(), scatter_dim, gather_dim, batch_dim)
