"""The parallel accessors: the one-process answer without a layout, the layout's values with one."""

import pytest
import torch
import torch.distributed as dist

from phased_dmd_mega import parallel
from phased_dmd_mega.testing import run_distributed


def test_without_a_layout_the_accessors_give_the_one_process_answer():
    assert not parallel.is_initialized() and not dist.is_initialized()
    assert (parallel.global_rank(), parallel.world_size(), parallel.data_parallel_rank()) == (0, 1, 0)
    assert parallel.group_size(None) == 1
    assert parallel.device() == torch.device("cpu")
    assert parallel.device(torch.device("meta")) == torch.device("meta")
    parallel.barrier()  # nothing to wait for
    values = torch.tensor([1.0, 2.0])
    assert parallel.all_reduce(values, None) is values and values.tolist() == [1.0, 2.0]


def test_layout_names_what_needs_it():
    with pytest.raises(RuntimeError, match="has not been called"):
        parallel.layout()
    with pytest.raises(RuntimeError, match=r"^export needs the parallel state: call parallel.initialize\(\) first$"):
        parallel.layout("export needs the parallel state")


def test_ensure_layout_starts_a_one_process_layout_only_where_none_is_set_up():
    with parallel.ensure_layout() as layout:
        assert (layout.world_size, layout.tensor_parallel) == (1, 1) and parallel.is_initialized()
    assert not parallel.is_initialized() and not dist.is_initialized()
    outer = parallel.initialize()
    try:
        with parallel.ensure_layout() as layout:
            assert layout is outer
        assert parallel.is_initialized()  # the caller's layout outlives the block
    finally:
        parallel.destroy()


def _accessors_on_a_rank():
    layout = parallel.initialize(tensor_parallel=1)
    try:
        tp_group = parallel.tensor_parallel_group()
        dp_group = parallel.data_parallel_group()
        summed = parallel.all_reduce(torch.tensor([float(layout.rank + 1)]), dp_group)
        largest = parallel.all_reduce(torch.tensor([float(layout.rank)]), dp_group, op=dist.ReduceOp.MAX)
        untouched = parallel.all_reduce(torch.tensor([float(layout.rank)]), tp_group)  # one rank per group
        parallel.barrier()
        return {
            "ranks": (parallel.global_rank(), parallel.world_size(), parallel.data_parallel_rank()),
            "sizes": (parallel.group_size(dp_group), parallel.group_size(tp_group), parallel.tensor_parallel_size()),
            "device": parallel.device(torch.device("meta")),
            "reduced": (summed.item(), largest.item(), untouched.item()),
        }
    finally:
        parallel.destroy()


@pytest.mark.slow
def test_with_a_layout_the_accessors_give_its_values_on_2_processes():
    for rank, found in enumerate(run_distributed(_accessors_on_a_rank, 2)):
        assert found["ranks"] == (rank, 2, rank)
        assert found["sizes"] == (2, 1, 1)
        assert found["device"] == torch.device("cpu")  # gloo: the layout's, not the default
        assert found["reduced"] == (3.0, 1.0, float(rank))
