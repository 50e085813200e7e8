"""Parallel runtime: process groups, megatron-core set-up and its CPU compatibility layer."""

from phased_dmd_mega.parallel.state import (
    ParallelLayout,
    data_parallel_group,
    destroy,
    initialize,
    is_initialized,
    layout,
    tensor_parallel_group,
    token_split_group,
    ulysses_group,
)

__all__ = [
    "ParallelLayout",
    "data_parallel_group",
    "destroy",
    "initialize",
    "is_initialized",
    "layout",
    "tensor_parallel_group",
    "token_split_group",
    "ulysses_group",
]
