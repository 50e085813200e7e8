"""Pieces both DiTs share: linear-layer specs (local megatron vs Transformer Engine), TP-aware
norms, adaLN modulation, rotary embeddings, token sharding and the attention core.

Activations follow megatron's layout: tokens first, ``[S, B, ...]``. Under Megatron sequence
parallelism and Ulysses each rank holds a contiguous slice of the (padded) token sequence.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- parallel sizes


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def ulysses_group():
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()


def ulysses_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_world_size()


def ulysses_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_rank()


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what}: {numerator} is not divisible by {denominator}")
    return numerator // denominator


# ----------------------------------------------------------------------------- linear specs


@dataclass(frozen=True)
class LinearSpec:
    """Which column-/row-parallel linear classes a model is built from (megatron's ModuleSpec
    idea reduced to what a DiT needs): one layer definition, local or Transformer Engine."""

    column: type
    row: type


def has_transformer_engine() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def linear_spec(transformer_impl: str = "local") -> LinearSpec:
    if transformer_impl == "local":
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        return LinearSpec(ColumnParallelLinear, RowParallelLinear)
    if transformer_impl == "transformer_engine":
        if not has_transformer_engine():
            raise RuntimeError(
                "model.transformer_impl=transformer_engine needs CUDA and the transformer_engine "
                "package (shipped in the NGC PyTorch image); use transformer_impl=local here"
            )
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return LinearSpec(TEColumnParallelLinear, TERowParallelLinear)
    raise ValueError(f"unknown transformer_impl {transformer_impl!r}; expected local or transformer_engine")


FP8_RECIPES = ("delayed", "current", "mxfp8")


def fp8_autocast(recipe_name: Optional[str]):
    """Transformer Engine's FP8 autocast for the TE layers inside it (modulation, embeddings
    and head are plain torch layers and stay in bf16); a no-op context without a recipe."""
    if recipe_name is None:
        return contextlib.nullcontext()
    if recipe_name not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe {recipe_name!r} is not one of {', '.join(FP8_RECIPES)}")
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    recipes = {
        "delayed": recipe.DelayedScaling,
        "current": recipe.Float8CurrentScaling,
        "mxfp8": recipe.MXFP8BlockScaling,
    }
    return te.fp8_autocast(enabled=True, fp8_recipe=recipes[recipe_name]())


RECOMPUTE_MODES = ("none", "full", "blocks")


def run_blocks(block_modules, x, *args, recompute: str = "none", recompute_num_blocks: int = 0):
    """Run the blocks in order; with activation recompute, the chosen blocks keep only their
    inputs and are re-run in the backward (megatron's checkpoint, RNG states included).

    ``x`` is one token tensor, or a tuple of them for multi-stream blocks (each block then
    takes the streams as its first arguments and returns them as a tuple): the streams are
    passed to the checkpoint as separate tensors so that each gets its gradient."""
    from megatron.core.tensor_parallel import checkpoint

    streams = isinstance(x, tuple)
    for index, block in enumerate(block_modules):
        inputs = x if streams else (x,)
        recomputed = recompute == "full" or (recompute == "blocks" and index < recompute_num_blocks)
        if recomputed and torch.is_grad_enabled():
            x = checkpoint(block, False, *inputs, *args)
        else:
            x = block(*inputs, *args)
    return x


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
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute {self.recompute!r} is not one of {', '.join(RECOMPUTE_MODES)}")
        if self.recompute == "blocks" and self.recompute_num_blocks < 1:
            raise ValueError("recompute='blocks' needs recompute_num_blocks >= 1")


def init_method(options: ModelParallelOptions):
    """Initialiser for the megatron linears."""
    # Weights are normally loaded; random initialisation (tests, from-scratch toys) stays small.
    return (lambda w: nn.init.normal_(w, std=0.02)) if options.initialize else nn.init.zeros_


def layer_setup(par) -> Tuple[LinearSpec, object]:
    """Checked options -> the linear classes and megatron's config that a model's layers share."""
    par.validate()
    return linear_spec(par.transformer_impl), model_parallel_config(par.sequence_parallel, par.dtype, par.initialize)


def model_parallel_config(sequence_parallel: bool, params_dtype: torch.dtype, initialize: bool):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size(),
        sequence_parallel=sequence_parallel and tp_size() > 1,
        params_dtype=params_dtype,
        # Full weights initialised on CPU then sliced: the same model at any TP size.
        use_cpu_initialization=True,
        perform_initialization=initialize,
    )


def tag_tensor_parallel_parameters(module: nn.Module) -> None:
    """megatron tags its split weights (``tensor_model_parallel``, ``partition_dim``) only when
    it initialises them; a model built to be loaded needs the same tags, since gradient norms,
    clipping and megatron's optimizers rely on them."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    for layer in module.modules():
        if isinstance(layer, ColumnParallelLinear):
            split = [(layer.weight, 0), (layer.bias, 0)]
        elif isinstance(layer, RowParallelLinear):
            split = [(layer.weight, 1)]  # the bias is replicated
        else:
            continue
        for param, dim in split:
            if param is not None and not getattr(param, "tensor_model_parallel", False):
                param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1


def mark_sequence_parallel(module: nn.Module) -> None:
    """Tag replicated parameters that only see this rank's tokens: their gradients are partial
    sums that the trainer all-reduces over the tensor-parallel group (megatron's convention)."""
    for param in module.parameters(recurse=True):
        param.sequence_parallel = True


# ----------------------------------------------------------------------------- norms


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (modulation maths stays fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group. Every rank's output depends on every rank's input, so the backward
    sums the incoming gradients over the group as well."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class RMSNormAcrossHeads(nn.Module):
    """RMSNorm over the full hidden size when the heads are split across tensor-parallel ranks:
    the sum of squares is all-reduced over the TP group, so the result equals the unsplit norm.
    The all-reduce's backward is an all-reduce too (every rank's output depends on the sum)."""

    def __init__(self, full_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.full_size = full_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(divide(full_size, tp_size(), "q/k norm size"), dtype=dtype))
        # Split over the heads like the column-parallel q/k projections (megatron's tags).
        self.weight.tensor_model_parallel, self.weight.partition_dim, self.weight.partition_stride = True, 0, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = xf.pow(2).sum(dim=-1, keepdim=True)
        if tp_size() > 1:
            sum_sq = _AllReduceSum.apply(sum_sq, tp_group())
        normed = xf * torch.rsqrt(sum_sq / self.full_size + self.eps)
        return (normed * self.weight.float()).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm with a weight over the last dimension, computed in fp32 (diffusers' RMSNorm in
    fp32). Used per head on q/k (weight [head_dim], shared by all heads) and on whole vectors."""

    def __init__(self, size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, in fp32."""
    return x.float() * (1 + scale.float()) + shift.float()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class ParallelMLP(nn.Module):
    """Linear(dim, ffn) -> GELU(tanh) -> Linear(ffn, dim), column- then row-parallel: the
    hidden units are split over tensor-parallel ranks and summed back by the second linear."""

    def __init__(self, dim: int, ffn_dim: int, options: ModelParallelOptions, spec: LinearSpec, config):
        super().__init__()
        init = init_method(options)
        self.linear_fc1 = spec.column(dim, ffn_dim, config=config, init_method=init, bias=True, gather_output=False)
        self.linear_fc2 = spec.row(ffn_dim, dim, config=config, init_method=init, bias=True,
                                   input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_fc1(x)
        out, _ = self.linear_fc2(gelu_tanh(hidden))
        return out


def split_fused_heads(fused: torch.Tensor, num_heads: int, parts: int, head_dim: int) -> Tuple[torch.Tensor, ...]:
    """[..., num_heads * parts * head_dim] in megatron's per-head interleaved layout
    ([q_h, k_h, v_h] for each head) -> ``parts`` tensors [..., num_heads, head_dim]."""
    return fused.unflatten(-1, (num_heads, parts, head_dim)).unbind(-2)


# ----------------------------------------------------------------------------- embeddings


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """[cos, sin] of ``scale * (timesteps * 10000^(-i/half))``, computed in fp32 as diffusers
    does (its ``Timesteps(scale=...)`` multiplies after the product, kept in that order)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[..., None] * torch.exp(exponent)
    if scale != 1.0:
        args = scale * args
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """sinusoid -> Linear -> SiLU -> Linear (diffusers' TimestepEmbedding)."""

    def __init__(self, freq_dim: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim, dtype=dtype)
        self.linear_2 = nn.Linear(dim, dim, dtype=dtype)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(sinusoid.to(self.linear_1.weight.dtype))))


def grid_positions(index: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
    """Integer (f, h, w) positions [S, 3] of flat token indices in (f, h, w) order; indices
    past the grid (sharding padding) get position 0."""
    f, h, w = grid
    index = torch.where(index < f * h * w, index, torch.zeros_like(index))
    return torch.stack([index // (h * w), (index // w) % h, index % w], dim=-1)


def rope_frequencies(positions: torch.Tensor, axis_dims: Tuple[int, ...], theta: float) -> torch.Tensor:
    """Rotation angles [S, sum(axis_dims)/2] (float64) for integer positions [S, n_axes]: each
    axis of size n rotates pairs with frequencies theta^(-arange(0, n, 2)/n)."""
    angles = []
    for axis, n in enumerate(axis_dims):
        freqs = 1.0 / theta ** (torch.arange(0, n, 2, dtype=torch.float64, device=positions.device) / n)
        angles.append(positions[:, axis].to(torch.float64)[:, None] * freqs[None, :])
    return torch.cat(angles, dim=-1)


def apply_rope_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [S, B, H, D] by angles [S, D/2]."""
    cos = torch.cos(angles).float()[:, None, None, :]
    sin = torch.sin(angles).float()[:, None, None, :]
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- token sharding


@dataclass(frozen=True)
class TokenSharding:
    """How a sequence of ``num_tokens`` is padded and split: first into Ulysses shards, then,
    under Megatron sequence parallelism, each Ulysses shard into tensor-parallel pieces."""

    num_tokens: int
    ulysses: int
    ulysses_rank: int
    tp: int  # 1 without sequence parallelism
    tp_rank: int

    @classmethod
    def current(cls, num_tokens: int, sequence_parallel: bool) -> "TokenSharding":
        sp = sequence_parallel and tp_size() > 1
        return cls(num_tokens, ulysses_size(), ulysses_rank(), tp_size() if sp else 1, tp_rank() if sp else 0)

    @property
    def padded_tokens(self) -> int:
        parts = self.ulysses * self.tp
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


# ----------------------------------------------------------------------------- attention


ATTENTION_BACKENDS = ("auto", "flash", "te", "sdpa")


def has_flash_attention() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attention_backend(requested: str, transformer_impl: str = "local") -> str:
    """auto: flash-attn when installed with CUDA, TE attention with the TE spec, else SDPA.
    A backend asked for explicitly that cannot run here is an error, never a silent fallback."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {requested!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if requested == "auto":
        if has_flash_attention():
            return "flash"
        if transformer_impl == "transformer_engine" and has_transformer_engine():
            return "te"
        return "sdpa"
    if requested == "flash" and not has_flash_attention():
        raise RuntimeError("attention_backend=flash needs CUDA and the flash_attn package; use sdpa or auto")
    if requested == "te" and not has_transformer_engine():
        raise RuntimeError("attention_backend=te needs CUDA and transformer_engine; use sdpa or auto")
    return requested


class AttentionCore(nn.Module):
    """Softmax attention over [S, B, H, D] tensors with a selectable backend. Self-attention
    under Ulysses exchanges sequence shards for head shards around the kernel (all-to-all), so
    every rank attends over the whole sequence with a subset of the heads.

    ``masked_keys_anywhere``: the key mask may have holes (joint text+image sequences), not only
    padding at the end. TE's padding masks are turned into sequence lengths, which assumes the
    latter, so such masked calls go through SDPA (as every masked call with flash does)."""

    def __init__(self, backend: str, num_local_heads: int, head_dim: int, ulysses: bool,
                 masked_keys_anywhere: bool = False):
        super().__init__()
        self.backend = backend
        self.masked_keys_anywhere = masked_keys_anywhere
        self.head_dim = head_dim
        self.ulysses = ulysses and ulysses_size() > 1
        if self.ulysses:
            divide(num_local_heads, ulysses_size(), "attention heads per tensor-parallel rank vs Ulysses size")
        self._te_attention = None
        if backend == "te":
            import transformer_engine.pytorch as te

            local = num_local_heads // (ulysses_size() if self.ulysses else 1)
            self._te_attention = te.DotProductAttention(local, head_dim, attn_mask_type="padding", qkv_format="sbhd")

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """q [Sq, B, H, D], k/v [Sk, B, H, D]; key_mask [Sk] or [B, Sk] True where a key is real
        (for Ulysses self-attention: over the full gathered sequence)."""
        if self.ulysses:
            from phased_dmd_mega.parallel.ulysses import seq_all_to_all

            q, k, v = (seq_all_to_all(t, scatter_dim=2, gather_dim=0, batch_dim=1) for t in (q, k, v))
        out = self._attend(q, k, v, key_mask)
        if self.ulysses:
            out = seq_all_to_all(out, scatter_dim=0, gather_dim=2, batch_dim=1)
        return out

    def _attend(self, q, k, v, key_mask):
        # Masked keys go through SDPA with flash (no varlen re-packing yet) and, when the mask
        # may have holes, with TE too (its padding masks assume padding at the end).
        if self.backend == "flash" and key_mask is None:
            return self._flash(q, k, v)
        if self.backend == "te" and not (self.masked_keys_anywhere and key_mask is not None):
            return self._te(q, k, v, key_mask)
        return self._sdpa(q, k, v, key_mask)

    @staticmethod
    def _sdpa(q, k, v, key_mask):
        mask = None
        if key_mask is not None:
            mask = key_mask.reshape(-1 if key_mask.dim() == 2 else 1, 1, 1, key_mask.shape[-1])
        out = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=mask
        )
        return out.permute(2, 0, 1, 3)

    @staticmethod
    def _flash(q, k, v):
        from flash_attn import flash_attn_func

        return flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)

    def _te(self, q, k, v, key_mask):
        batch = q.shape[1]
        if key_mask is None:
            key_mask = torch.ones(k.shape[0], dtype=torch.bool, device=k.device)
        keys = key_mask.expand(batch, -1) if key_mask.dim() == 1 else key_mask
        queries = torch.ones(batch, q.shape[0], dtype=torch.bool, device=q.device)
        # TE's padding masks are True where a position is masked out, shaped [B, 1, 1, S].
        masks = (~queries[:, None, None, :], ~keys[:, None, None, :])
        out = self._te_attention(q, k, v, attention_mask=masks)
        return out.view(q.shape[0], batch, -1, self.head_dim)
