"""The attention core both DiTs share: softmax attention over [S, B, H, D] tensors with a
selectable backend (SDPA, flash-attn, Transformer Engine), Ulysses head/sequence exchange, and
masked keys.

A mask (the padding TokenSharding adds, Qwen-Image's text padding, which sits between text and
image tokens) is one ``KeyMask`` per forward, shared by every block. SDPA applies it as a boolean
mask. flash-attn and TE take no such mask: their variable-length kernels take the real tokens
packed back to back, sample after sample, with cumulative lengths (``cu_seqlens``). Picking the
real tokens by index makes any mask contiguous, holes included, so one packing serves both.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from phased_dmd_mega.models.layers import divide
from phased_dmd_mega.models.options import ModelParallelOptions
from phased_dmd_mega.parallel.linears import has_transformer_engine
from phased_dmd_mega.parallel.state import ulysses_size

ATTENTION_BACKENDS = ("auto", "flash", "te", "sdpa")
HALF_DTYPES = (torch.bfloat16, torch.float16)  # what flash-attn and TE's fused kernels take


def has_flash_attention() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def choose_attention_backend(
    requested: str, dtype: torch.dtype, transformer_impl: str, *, flash_available: bool, te_available: bool
) -> str:
    """The backend for ``requested`` given what is installed. auto: flash-attn for bf16/fp16,
    else TE attention with the TE layer spec (bf16/fp16), else SDPA. An explicit backend that
    cannot run is an error, never a silent fallback."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {requested!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    half = dtype in HALF_DTYPES
    if requested == "auto":
        if flash_available and half:
            return "flash"
        if transformer_impl == "transformer_engine" and te_available and half:
            return "te"
        return "sdpa"
    if requested == "flash":
        if not flash_available:
            raise RuntimeError("attention_backend=flash needs CUDA and the flash_attn package; use sdpa or auto")
        if not half:
            raise ValueError(
                f"attention_backend=flash needs model.dtype bfloat16 or float16 (flash-attn refuses "
                f"{str(dtype).removeprefix('torch.')}); use sdpa or auto"
            )
    if requested == "te" and not te_available:
        raise RuntimeError("attention_backend=te needs CUDA and transformer_engine; use sdpa or auto")
    return requested


def resolve_attention_backend(
    requested: str, transformer_impl: str = "local", dtype: torch.dtype = torch.bfloat16
) -> str:
    return choose_attention_backend(
        requested, dtype, transformer_impl, flash_available=has_flash_attention(), te_available=has_transformer_engine()
    )


def attention_backend(options: ModelParallelOptions) -> str:
    """The attention backend ``options`` resolve to here."""
    return resolve_attention_backend(options.attention_backend, options.transformer_impl, options.dtype)


# ----------------------------------------------------------------------------- masks and packing


@dataclass(frozen=True)
class Packing:
    """The real tokens of a [S, B] batch, packed sample after sample (variable-length kernels)."""

    index: torch.Tensor  # [total] positions in the sequence-major flattening [S * B] (s * B + b)
    cu_seqlens: torch.Tensor  # [B + 1] int32: sample b's tokens are packed[cu[b]:cu[b + 1]]
    max_seqlen: int

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[S, B, H, D] -> [total, H, D]."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor, seq_len: int, batch: int) -> torch.Tensor:
        """[total, H, D] -> [S, B, H, D], zeros at the masked positions."""
        out = packed.new_zeros((seq_len * batch, *packed.shape[1:]))
        return out.index_copy(0, self.index, packed).unflatten(0, (seq_len, batch))


@dataclass(frozen=True, eq=False)
class KeyMask:
    """Which tokens of a self- or joint-attention sequence are real: [B, S] bool, True = real.
    The same mask serves queries and keys (a masked query's output is never used)."""

    mask: torch.Tensor

    @classmethod
    def of(cls, mask: Optional[torch.Tensor], batch: int) -> Optional["KeyMask"]:
        """From [S] (the same for every sample) or [B, S]; None stays None (every token real)."""
        if mask is None:
            return None
        return cls(mask.expand(batch, -1) if mask.dim() == 1 else mask)

    @cached_property
    def packing(self) -> Packing:
        # Sample-major order of the real tokens: sort by (b, s) the positions s * B + b.
        batch, seq_len = self.mask.shape
        b, s = self.mask.nonzero(as_tuple=True)
        index = s * batch + b
        lengths = self.mask.sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return Packing(index, cu_seqlens, int(lengths.max()))  # one host sync per forward


# ----------------------------------------------------------------------------- the core


def _te_dot_product_attention(num_heads: int, head_dim: int, cross: bool):
    import transformer_engine.pytorch as te

    # attn_mask_type is chosen per call (no_mask or padding); TE's default would be causal.
    return te.DotProductAttention(
        num_heads, head_dim, qkv_format="sbhd", attn_mask_type="no_mask", attention_type="cross" if cross else "self"
    )


class AttentionCore(nn.Module):
    """Softmax attention over [S, B, H, D] tensors with a selectable backend. Self-attention
    under Ulysses exchanges sequence shards for head shards around the kernel (all-to-all), so
    every rank attends over the whole sequence with a subset of the heads.

    ``cross``: queries and keys are different sequences (Wan's text cross-attention); such calls
    take no key mask."""

    def __init__(self, backend: str, num_local_heads: int, head_dim: int, ulysses: bool, cross: bool = False):
        super().__init__()
        self.backend, self.head_dim, self.cross = backend, head_dim, cross
        self.ulysses = ulysses and ulysses_size() > 1
        if self.ulysses:
            divide(num_local_heads, ulysses_size(), "attention heads per tensor-parallel rank vs Ulysses size")
        self._te_attention = None
        if backend == "te":
            local = num_local_heads // (ulysses_size() if self.ulysses else 1)
            self._te_attention = _te_dot_product_attention(local, head_dim, cross)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[KeyMask] = None
    ) -> torch.Tensor:
        """q [Sq, B, H, D], k/v [Sk, B, H, D]; ``key_mask`` (self/joint attention only) over the
        full sequence (for Ulysses: the gathered one)."""
        if key_mask is not None and self.cross:
            raise ValueError("a key mask is for self- or joint attention; this core is cross-attention")
        if self.ulysses:
            from phased_dmd_mega.parallel.ulysses import seq_all_to_all

            q, k, v = (seq_all_to_all(t, scatter_dim=2, gather_dim=0, batch_dim=1) for t in (q, k, v))
        out = self._attend(q, k, v, key_mask)
        if self.ulysses:
            out = seq_all_to_all(out, scatter_dim=0, gather_dim=2, batch_dim=1)
        return out

    def _attend(self, q, k, v, key_mask):
        if self.backend == "sdpa":
            return sdpa_attention(q, k, v, key_mask)
        if key_mask is None:
            return self._flash(q, k, v) if self.backend == "flash" else self._te(q, k, v)
        packing = key_mask.packing
        packed = (packing.pack(t) for t in (q, k, v))
        out = self._flash_varlen(*packed, packing) if self.backend == "flash" else self._te_varlen(*packed, packing)
        return packing.unpack(out, q.shape[0], q.shape[1])

    @staticmethod
    def _flash(q, k, v):
        from flash_attn import flash_attn_func

        return flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)

    @staticmethod
    def _flash_varlen(q, k, v, packing: Packing):
        from flash_attn import flash_attn_varlen_func

        cu, longest = packing.cu_seqlens, packing.max_seqlen
        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest)

    def _te(self, q, k, v):
        out = self._te_attention(q, k, v, qkv_format="sbhd", attn_mask_type="no_mask")
        return out.view(q.shape[0], q.shape[1], -1, self.head_dim)

    def _te_varlen(self, q, k, v, packing: Packing):
        cu, longest = packing.cu_seqlens, packing.max_seqlen
        out = self._te_attention(
            q,
            k,
            v,
            qkv_format="thd",
            attn_mask_type="padding",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
        return out.view(q.shape[0], -1, self.head_dim)


def sdpa_attention(q, k, v, key_mask: Optional[KeyMask] = None) -> torch.Tensor:
    """torch's scaled_dot_product_attention on [S, B, H, D] tensors, masked keys left out."""
    mask = None if key_mask is None else key_mask.mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=mask
    )
    return out.permute(2, 0, 1, 3)
