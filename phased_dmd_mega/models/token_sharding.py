"""Token sharding: how a token sequence is padded and split over the Ulysses and (under Megatron
sequence parallelism) tensor-parallel ranks, each rank holding a contiguous slice, and the key
mask of attention over several sharded streams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from phased_dmd_mega.parallel.state import (
    tensor_parallel_rank,
    tensor_parallel_size,
    ulysses_group,
    ulysses_rank,
    ulysses_size,
)


@dataclass(frozen=True)
class TokenSharding:
    """How a sequence of ``num_tokens`` is padded and split: first into Ulysses shards, then,
    under Megatron sequence parallelism, each Ulysses shard into tensor-parallel pieces. Each
    rank's piece is a multiple of ``multiple`` tokens (FP8 GEMMs need 8 or 32)."""

    num_tokens: int
    ulysses: int
    ulysses_rank: int
    tp: int  # 1 without sequence parallelism
    tp_rank: int
    multiple: int = 1

    @classmethod
    def current(cls, num_tokens: int, sequence_parallel: bool, multiple: int = 1) -> "TokenSharding":
        sp = sequence_parallel and tensor_parallel_size() > 1
        tp, tp_rank = (tensor_parallel_size(), tensor_parallel_rank()) if sp else (1, 0)
        return cls(num_tokens, ulysses_size(), ulysses_rank(), tp, tp_rank, multiple)

    @property
    def padded_tokens(self) -> int:
        parts = self.ulysses * self.tp * self.multiple
        return -(-self.num_tokens // parts) * parts

    @property
    def ulysses_tokens(self) -> int:
        return self.padded_tokens // self.ulysses

    @property
    def local_tokens(self) -> int:
        return self.ulysses_tokens // self.tp

    @property
    def ulysses_start(self) -> int:
        return self.ulysses_rank * self.ulysses_tokens

    @property
    def local_start(self) -> int:
        return self.ulysses_start + self.tp_rank * self.local_tokens

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the token dimension (0) of a full sequence."""
        extra = self.padded_tokens - x.shape[0]
        if extra == 0:
            return x
        return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))], dim=0)

    def local_slice(self, x_full: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a full (unpadded) sequence [L, ...]."""
        return self.pad(x_full)[self.local_start : self.local_start + self.local_tokens]

    def key_padding_mask(self, device) -> Optional[torch.Tensor]:
        """[padded_tokens] True for real tokens; None when nothing is padded."""
        if self.padded_tokens == self.num_tokens:
            return None
        return torch.arange(self.padded_tokens, device=device) < self.num_tokens

    def ulysses_index(self, device) -> torch.Tensor:
        """Token indices of this Ulysses shard (past ``num_tokens``: padding)."""
        return torch.arange(self.ulysses_start, self.ulysses_start + self.ulysses_tokens, device=device)

    def gather(self, x_local: torch.Tensor) -> torch.Tensor:
        """Full unpadded sequence from every rank's tokens; backward hands each rank its slice."""
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        if self.tp > 1:
            x_local = gather_from_sequence_parallel_region(x_local, tensor_parallel_output_grad=False)
        if self.ulysses > 1:
            x_local = gather_from_sequence_parallel_region(
                x_local, tensor_parallel_output_grad=False, group=ulysses_group()
            )
        return x_local[: self.num_tokens]


def latent_tokens(latents: torch.Tensor, patch: Tuple[int, int, int]) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, L, C * pt * ph * pw], tokens in (f, h, w) raster order: the order
    of the DiTs' token sequences, so token ranges here are the ranges TokenSharding splits."""
    b, c, f, h, w = latents.shape
    pt, ph, pw = patch
    x = latents.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def joint_key_mask(streams, batch: int, device) -> Optional[torch.Tensor]:
    """Key mask for one attention over several token streams (e.g. text and image), each
    sharded by its own TokenSharding (same Ulysses size) and concatenated per rank in the
    order given: [stream0 shard, stream1 shard, ...]. The Ulysses all-to-all gathers rank by
    rank, so the keys come as [rank0: s0, s1, ..., rank1: s0, s1, ...]; attention does not care
    about key order as long as RoPE and this mask follow the tokens.

    ``streams``: (sharding, mask) pairs, mask [B, num_tokens] True for real tokens or None
    (all real). Returns [B, keys] (sharding padding is False), or None if every key is real."""
    if all(mask is None and sharding.padded_tokens == sharding.num_tokens for sharding, mask in streams):
        return None
    pieces = []
    for sharding, mask in streams:
        if mask is None:
            mask = torch.ones(batch, sharding.num_tokens, dtype=torch.bool, device=device)
        padded = sharding.pad(mask.to(device=device, dtype=torch.bool).transpose(0, 1)).transpose(0, 1)
        pieces.append(padded.unflatten(1, (sharding.ulysses, sharding.ulysses_tokens)))
    return torch.cat(pieces, dim=2).flatten(1)
