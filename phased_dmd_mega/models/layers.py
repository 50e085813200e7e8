"""The layers both DiTs are built from: the tensor-parallel linears (local megatron or Transformer
Engine) and megatron's config for them, TP-aware norms, adaLN modulation and the MLP.

Activations follow megatron's layout: tokens first, ``[S, B, ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from phased_dmd_mega.models.options import ModelParallelOptions
from phased_dmd_mega.parallel.linears import has_transformer_engine, local_linear_classes, te_linear_classes
from phased_dmd_mega.parallel.megatron_config import stand_in_transformer_config
from phased_dmd_mega.parallel.state import tensor_parallel_group, tensor_parallel_size


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
    return dict(
        config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False
    )


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


# ----------------------------------------------------------------------------- megatron's config


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
    tp = tensor_parallel_size()
    return stand_in_transformer_config(
        hidden_size=tp,
        num_attention_heads=tp,
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
    )


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
        self.weight = nn.Parameter(torch.ones(divide(full_size, tensor_parallel_size(), "q/k norm size"), dtype=dtype))
        # Split over the heads like the column-parallel q/k projections (megatron's tags).
        self.weight.tensor_model_parallel, self.weight.partition_dim, self.weight.partition_stride = True, 0, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = xf.pow(2).sum(dim=-1, keepdim=True)
        if tensor_parallel_size() > 1:
            sum_sq = _AllReduceSum.apply(sum_sq, tensor_parallel_group())
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
