"""Which parameters of a model are split or see only part of the work: declared once per
architecture (a ``ParallelPlan`` next to its model) and applied by ``apply_parallel_plan`` when
the model is built.

Tensor-parallel linears hold a shard of their weight. megatron tags such weights
(``tensor_model_parallel``, ``partition_dim``) only when it initialises them; a model built to be
loaded needs the same tags, since gradient norms, clipping and megatron's optimizers rely on them.

A replicated parameter that sees only part of a sample's work has a gradient that is a partial
sum over the tensor-parallel group, which the trainer all-reduces: megatron's tag for it is
``sequence_parallel``. The plan names these parameters:

- ``token_sharded``: they see only this rank's tokens under Megatron sequence parallelism
  (embeddings and the head applied per token, modulations of per-token activations);
- ``head_sharded``: they see only this rank's heads under tensor parallelism, with or without
  sequence parallelism (a per-head norm weight shared by all heads).

Entries are module or parameter names in which ``*`` matches anything (a block index); an entry
tags every parameter of the modules it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable, Tuple

from torch import nn

from phased_dmd_mega.parallel.linears import parallel_linear_kind
from phased_dmd_mega.parallel.state import tensor_parallel_size


@dataclass(frozen=True)
class ParallelPlan:
    """The replicated parameters of one architecture whose gradients are partial sums over TP."""

    token_sharded: Tuple[str, ...] = ()
    head_sharded: Tuple[str, ...] = ()

    def entries(self) -> Tuple[str, ...]:
        return self.token_sharded + self.head_sharded


def apply_parallel_plan(model: nn.Module, plan: ParallelPlan, sequence_parallel: bool) -> None:
    """Tag ``model``'s tensor-parallel shards and the partial-sum parameters ``plan`` names.
    ``sequence_parallel``: tokens are split over the tensor-parallel ranks (TP > 1)."""
    _check_entries(model, plan)
    tag_tensor_parallel_parameters(model)
    tp_split = tensor_parallel_size() > 1
    entries = (plan.token_sharded if sequence_parallel and tp_split else ()) + (plan.head_sharded if tp_split else ())
    for name, param in model.named_parameters():
        if any(_names(name, entry) for entry in entries):
            param.sequence_parallel = True


def tag_tensor_parallel_parameters(module: nn.Module) -> None:
    """megatron's split tags on the weights (and column-parallel biases) of every parallel linear."""
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


def _names(name: str, entry: str) -> bool:
    """Whether ``entry`` names the module or parameter ``name``, or a module above it."""
    return fnmatchcase(name, entry) or fnmatchcase(name, entry + ".*")


def _check_entries(model: nn.Module, plan: ParallelPlan) -> None:
    """Every entry must name something in the model: a misspelt one would tag nothing."""
    names = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_parameters()]
    unknown = [entry for entry in plan.entries() if not _any_named(names, entry)]
    if unknown:
        raise ValueError(f"parallel plan entries {unknown} name nothing in {type(model).__name__}")


def _any_named(names: Iterable[str], entry: str) -> bool:
    return any(fnmatchcase(name, entry) for name in names)
