"""Pieces both DiTs share: linear-layer specs (local megatron vs Transformer Engine), FP8,
TP-aware norms, adaLN modulation, rotary embeddings and token sharding (the attention core is
in ``attention``).

Activations follow megatron's layout: tokens first, ``[S, B, ...]``. Under Megatron sequence
parallelism and Ulysses each rank holds a contiguous slice of the (padded) token sequence.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

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
    idea reduced to what a DiT needs): one layer definition, local or Transformer Engine. Both
    families take the same keyword arguments (megatron's TE wrappers require ``skip_bias_add``
    and ``is_expert``, keyword-only), so the layers are built through these two methods."""

    column: type
    row: type

    def column_parallel(self, in_features: int, out_features: int, config, init):
        return self.column(in_features, out_features, **column_parallel_kwargs(config, init))

    def row_parallel(self, in_features: int, out_features: int, config, init):
        return self.row(in_features, out_features, **row_parallel_kwargs(config, init))


def column_parallel_kwargs(config, init) -> Dict[str, Any]:
    """Output split over TP ranks, not gathered; the bias added inside the layer."""
    return dict(config=config, init_method=init, bias=True, gather_output=False, skip_bias_add=False, is_expert=False)


def row_parallel_kwargs(config, init) -> Dict[str, Any]:
    """Input split over TP ranks, outputs summed (reduce-scattered under sequence parallelism)."""
    return dict(config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False,
                is_expert=False)


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


def linear_spec(transformer_impl: str = "local") -> LinearSpec:
    if transformer_impl == "local":
        return LinearSpec(*local_linear_classes())
    if transformer_impl == "transformer_engine":
        classes = te_linear_classes() if has_transformer_engine() else None
        if classes is None:
            raise RuntimeError(
                "model.transformer_impl=transformer_engine needs CUDA and the transformer_engine "
                "package (shipped in the NGC PyTorch image); use transformer_impl=local here"
            )
        return LinearSpec(*classes)
    raise ValueError(f"unknown transformer_impl {transformer_impl!r}; expected local or transformer_engine")


def parallel_linear_kind(module: nn.Module) -> Optional[str]:
    """"column" or "row" for a tensor-parallel linear of either family, else None."""
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

    return {"delayed": recipe.DelayedScaling, "current": recipe.Float8CurrentScaling,
            "mxfp8": recipe.MXFP8BlockScaling}[recipe_name]()


def _te_autocast(enabled: bool, recipe_name: Optional[str] = None):
    """TE's quantization autocast: ``te.autocast`` since TE 2.9, ``te.fp8_autocast`` (now
    deprecated) before. Delayed scaling all-reduces its amax history on exit over the group
    given; the tensor- and Ulysses-parallel ranks run the same samples through the same modules
    (data-parallel ranks may route samples to different experts, so they are left out)."""
    import transformer_engine.pytorch as te
    from megatron.core import parallel_state

    kwargs = {}
    if enabled:
        group = parallel_state.get_amax_reduction_group(with_context_parallel=True, tp_only_amax_red=True)
        kwargs = {"recipe": _te_recipe(recipe_name), "amax_reduction_group": group}
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


RECOMPUTE_MODES = ("none", "full", "blocks")


def _checkpoint(block, fp8: bool, *args):
    """megatron's checkpoint (RNG states included); under FP8 TE's, which re-runs the block in
    the FP8 autocast state of its forward (megatron's TransformerBlock does the same). Both save
    their arguments for the backward, which takes tensors only: other arguments (a KeyMask) are
    bound into the function instead."""
    bound = {i: arg for i, arg in enumerate(args) if not (arg is None or torch.is_tensor(arg))}

    def run(*tensors):
        given = iter(tensors)
        return block(*(bound[i] if i in bound else next(given) for i in range(len(args))))

    tensors = [arg for i, arg in enumerate(args) if i not in bound]
    if fp8:
        from megatron.core.extensions.transformer_engine import te_checkpoint
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        return te_checkpoint(run, False, get_cuda_rng_tracker, tp_group(), *tensors)
    from megatron.core.tensor_parallel import checkpoint

    return checkpoint(run, False, *tensors)


def run_blocks(block_modules, x, *args, recompute: str = "none", recompute_num_blocks: int = 0, fp8: bool = False):
    """Run the blocks in order; with activation recompute, the chosen blocks keep only their
    inputs and are re-run in the backward.

    ``x`` is one token tensor, or a tuple of them for multi-stream blocks (each block then
    takes the streams as its first arguments and returns them as a tuple): the streams are
    passed to the checkpoint as separate tensors so that each gets its gradient."""
    streams = isinstance(x, tuple)
    for index, block in enumerate(block_modules):
        inputs = x if streams else (x,)
        recomputed = recompute == "full" or (recompute == "blocks" and index < recompute_num_blocks)
        if recomputed and torch.is_grad_enabled():
            x = _checkpoint(block, fp8, *inputs, *args)
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

    @property
    def attention(self) -> str:
        """The attention backend these options resolve to here."""
        from phased_dmd_mega.models.attention import resolve_attention_backend

        return resolve_attention_backend(self.attention_backend, self.transformer_impl, self.dtype)


def init_method(options: ModelParallelOptions):
    """Initialiser for the megatron linears."""
    # Weights are normally loaded; random initialisation (tests, from-scratch toys) stays small.
    return (lambda w: nn.init.normal_(w, std=0.02)) if options.initialize else nn.init.zeros_


def layer_setup(par) -> Tuple[LinearSpec, object]:
    """Checked options -> the linear classes and megatron's config that a model's layers share."""
    par.validate()
    return linear_spec(par.transformer_impl), model_parallel_config(par.sequence_parallel, par.dtype, par.initialize)


def model_parallel_config(sequence_parallel: bool, params_dtype: torch.dtype, initialize: bool):
    """megatron's config for the parallel linears. A TransformerConfig, not the ModelParallelConfig
    the local layers would take: megatron's TE wrappers read TransformerConfig fields
    (``disable_parameter_transpose_cache``, ``symmetric_ar_type``). Its layer and head counts
    describe no model (nothing here reads them); the heads only have to divide by TP."""
    from megatron.core.transformer import TransformerConfig

    tp = tp_size()
    return TransformerConfig(
        num_layers=1, hidden_size=tp, num_attention_heads=tp,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        # Full weights initialised on CPU then sliced: the same model at any TP size.
        use_cpu_initialization=True,
        perform_initialization=initialize,
        # TE caches a layer's FP8 weight cast after its first call and reuses it while
        # is_first_microbatch is False, which megatron's wrapper sets after that call and never
        # resets: trained weights would be used as they were at step 0. Recast every call.
        disable_parameter_transpose_cache=True,
        cuda_graph_scope=[],  # the default "full" warns on every build (its deprecated spelling)
    )


def tag_tensor_parallel_parameters(module: nn.Module) -> None:
    """megatron tags its split weights (``tensor_model_parallel``, ``partition_dim``) only when
    it initialises them; a model built to be loaded needs the same tags, since gradient norms,
    clipping and megatron's optimizers rely on them."""
    for layer in module.modules():
        kind = parallel_linear_kind(layer)
        if kind == "column":
            split = [(layer.weight, 0), (layer.bias, 0)]
        elif kind == "row":
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
        self.linear_fc1 = spec.column_parallel(dim, ffn_dim, config, init)
        self.linear_fc2 = spec.row_parallel(ffn_dim, dim, config, init)

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
        sp = sequence_parallel and tp_size() > 1
        return cls(num_tokens, ulysses_size(), ulysses_rank(), tp_size() if sp else 1, tp_rank() if sp else 0, multiple)

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
