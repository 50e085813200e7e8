"""The parallel runtime on real gloo processes: groups, megatron-core TP layers, Ulysses all-to-all."""

import pytest
import torch
import torch.distributed as dist

from phased_dmd_mega import parallel
from phased_dmd_mega.testing import run_distributed

HIDDEN, FFN, SEQ, BATCH = 8, 12, 6, 2


# ----------------------------------------------------------------------------- single process


def test_single_process_initialize_and_destroy():
    layout = parallel.initialize(seed=3)
    try:
        assert (layout.world_size, layout.rank, layout.data_parallel) == (1, 0, 1)
        assert layout.backend == ("nccl" if torch.cuda.is_available() else "gloo")
        assert dist.get_world_size(parallel.tensor_parallel_group()) == 1
        with pytest.raises(RuntimeError, match="already called"):
            parallel.initialize()
    finally:
        parallel.destroy()
    assert not parallel.is_initialized() and not dist.is_initialized()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"tensor_parallel": 2},
            r"world size 1 is not divisible by tensor_parallel \(2\) x ulysses_parallel \(1\) = 2",
        ),
        ({"ulysses_parallel": 3}, r"tensor_parallel \(1\) x ulysses_parallel \(3\) = 3"),
        ({"tensor_parallel": 0}, "tensor_parallel must be a positive integer, got 0"),
    ],
)
def test_invalid_sizes_name_the_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        parallel.initialize(**kwargs)
    assert not parallel.is_initialized() and not dist.is_initialized()


def test_a_local_rank_beyond_the_visible_gpus_is_an_error_naming_both(monkeypatch):
    from phased_dmd_mega.parallel import state

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # what parallel.initialize asks on CUDA
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert state.local_cuda_device() == 1
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK is 2, but this process sees 2 GPU\(s\)"):
        state.local_cuda_device()


@pytest.mark.parametrize("allow_tf32, precision", [(True, "tf32"), (False, "ieee")])
def test_initialize_sets_the_float32_precision_when_asked(float32_precision, allow_tf32, precision):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not allow_tf32
    before = float32_precision()
    parallel.initialize()  # not asked: torch's settings stay
    parallel.destroy()
    assert float32_precision() == before
    parallel.initialize(allow_tf32=allow_tf32)
    parallel.destroy()
    assert float32_precision() == (allow_tf32, allow_tf32, precision)


# ----------------------------------------------------------------------------- group layout


def _group_ranks(tp, up):
    layout = parallel.initialize(tensor_parallel=tp, ulysses_parallel=up)
    groups = {
        "tp": dist.get_process_group_ranks(parallel.tensor_parallel_group()),
        "ulysses": dist.get_process_group_ranks(parallel.ulysses_group()),
        "dp": dist.get_process_group_ranks(parallel.data_parallel_group(with_ulysses=False)),
        "dp_ulysses": dist.get_process_group_ranks(parallel.data_parallel_group()),
    }
    ranks = (layout.tensor_parallel_rank, layout.ulysses_rank, layout.data_parallel_rank)
    parallel.destroy()
    return groups, ranks, layout.data_parallel


@pytest.mark.slow
def test_group_layout_tp2_ulysses2_on_4_processes():
    results = run_distributed(_group_ranks, 4, 2, 2)
    expected_tp = [[0, 1], [0, 1], [2, 3], [2, 3]]
    expected_ulysses = [[0, 2], [1, 3], [0, 2], [1, 3]]
    for rank, (groups, ranks, dp) in enumerate(results):
        assert groups["tp"] == expected_tp[rank]
        assert groups["ulysses"] == expected_ulysses[rank]
        assert groups["dp"] == [rank] and dp == 1
        # Ulysses ranks hold tokens of the same samples: they average gradients together.
        assert groups["dp_ulysses"] == expected_ulysses[rank]
        assert ranks == (rank % 2, rank // 2, 0)


@pytest.mark.slow
def test_group_layout_tp2_leaves_data_parallel_over_the_rest():
    results = run_distributed(_group_ranks, 4, 2, 1)
    for rank, (groups, ranks, dp) in enumerate(results):
        assert groups["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert groups["dp"] == [rank % 2, rank % 2 + 2] and dp == 2
        assert ranks == (rank % 2, 0, rank // 2)


# ----------------------------------------------------------------------------- tensor parallel


def _reference_tensors():
    gen = torch.Generator().manual_seed(1234)
    return {
        "w1": torch.randn(FFN, HIDDEN, generator=gen),
        "b1": torch.randn(FFN, generator=gen),
        "w2": torch.randn(HIDDEN, FFN, generator=gen),
        "b2": torch.randn(HIDDEN, generator=gen),
        "x": torch.randn(SEQ, BATCH, HIDDEN, generator=gen),  # megatron's [s, b, h]
        "grad_out": torch.randn(SEQ, BATCH, HIDDEN, generator=gen),
    }


def _single_process_linear_pair():
    t = _reference_tensors()
    params = {k: t[k].clone().requires_grad_() for k in ("w1", "b1", "w2", "b2")}
    x = t["x"].clone().requires_grad_()
    hidden = torch.nn.functional.linear(x, params["w1"], params["b1"])
    out = torch.nn.functional.linear(hidden, params["w2"], params["b2"])
    out.backward(t["grad_out"])
    return out.detach(), x.grad, {k: p.grad for k, p in params.items()}


def _tp2_linear_pair(sequence_parallel):
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    layout = parallel.initialize(tensor_parallel=2, sequence_parallel=sequence_parallel)
    rank = layout.tensor_parallel_rank
    config = ModelParallelConfig(
        tensor_model_parallel_size=2, sequence_parallel=sequence_parallel, use_cpu_initialization=True
    )
    column = ColumnParallelLinear(
        HIDDEN, FFN, config=config, init_method=torch.nn.init.zeros_, bias=True, gather_output=False
    )
    row = RowParallelLinear(
        FFN,
        HIDDEN,
        config=config,
        init_method=torch.nn.init.zeros_,
        bias=True,
        input_is_parallel=True,
        skip_bias_add=False,
    )
    t = _reference_tensors()
    with torch.no_grad():
        column.weight.copy_(t["w1"].chunk(2, dim=0)[rank])  # column parallel: output rows
        column.bias.copy_(t["b1"].chunk(2, dim=0)[rank])
        row.weight.copy_(t["w2"].chunk(2, dim=1)[rank])  # row parallel: input columns
        row.bias.copy_(t["b2"])
    x, grad_out = t["x"], t["grad_out"]
    if sequence_parallel:  # each rank holds its slice of the sequence
        x, grad_out = x.chunk(2, dim=0)[rank], grad_out.chunk(2, dim=0)[rank]
    x = x.clone().requires_grad_()
    hidden, _ = column(x)
    out, _ = row(hidden)
    out.backward(grad_out)
    grads = {"w1": column.weight.grad, "b1": column.bias.grad, "w2": row.weight.grad, "b2": row.bias.grad}
    row_bias_is_sequence_parallel = bool(getattr(row.bias, "sequence_parallel", False))
    parallel.destroy()
    return out.detach(), x.grad, grads, row_bias_is_sequence_parallel


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_column_row_parallel_pair_matches_single_process(sequence_parallel):
    ref_out, ref_dx, ref_grads = _single_process_linear_pair()
    results = run_distributed(_tp2_linear_pair, 2, sequence_parallel)
    dim = 0 if sequence_parallel else None
    out = torch.cat([r[0] for r in results], 0) if sequence_parallel else results[0][0]
    dx = torch.cat([r[1] for r in results], 0) if sequence_parallel else results[0][1]
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    if dim is None:  # without SP every rank holds the full activations
        torch.testing.assert_close(results[1][0], ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r[2]["w1"] for r in results], 0), ref_grads["w1"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r[2]["b1"] for r in results], 0), ref_grads["b1"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r[2]["w2"] for r in results], 1), ref_grads["w2"], rtol=1e-5, atol=1e-5)
    if sequence_parallel:
        # Under SP each rank sees its own tokens only: the replicated bias's gradient is a
        # partial sum, marked for the all-reduce that megatron's grad finalisation does.
        assert all(r[3] for r in results)
        b2 = results[0][2]["b2"] + results[1][2]["b2"]
    else:
        b2 = results[0][2]["b2"]
        torch.testing.assert_close(results[1][2]["b2"], b2)
    torch.testing.assert_close(b2, ref_grads["b2"], rtol=1e-5, atol=1e-5)


def _tracked_random_numbers(seed):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    layout = parallel.initialize(tensor_parallel=2, seed=seed)
    with get_cuda_rng_tracker().fork():
        tensor_parallel_draw = torch.randn(4)
    default_draw = torch.randn(4)
    parallel.destroy()
    return layout.tensor_parallel_rank, tensor_parallel_draw, default_draw


@pytest.mark.slow
def test_megatron_rng_tracker_on_cpu_differs_across_tp_ranks_only_inside_fork():
    first = run_distributed(_tracked_random_numbers, 2, 7)
    again = run_distributed(_tracked_random_numbers, 2, 7)
    (_, tp0, default0), (_, tp1, default1) = first
    assert not torch.equal(tp0, tp1)  # the model-parallel state differs per TP rank
    assert torch.equal(default0, default1)  # the default state is shared within the TP group
    for (_, tp_a, default_a), (_, tp_b, default_b) in zip(first, again):
        assert torch.equal(tp_a, tp_b) and torch.equal(default_a, default_b)  # seeded


# ----------------------------------------------------------------------------- Ulysses


def _ulysses_exchange():
    from phased_dmd_mega.parallel.ulysses import seq_all_to_all

    layout = parallel.initialize(ulysses_parallel=2)
    rank = layout.ulysses_rank
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(2, 6, 4, 3, generator=gen)  # [B, S, H, D]
    grad_full = torch.randn(2, 6, 4, 3, generator=gen)
    x = full.chunk(2, dim=1)[rank].clone().requires_grad_()  # this rank's tokens, all heads
    heads = seq_all_to_all(x, scatter_dim=2, gather_dim=1)  # all tokens, this rank's heads
    back = seq_all_to_all(heads, scatter_dim=1, gather_dim=2)
    heads.backward(grad_full.chunk(2, dim=2)[rank])
    parallel.destroy()
    return rank, heads.detach(), back.detach(), x.grad, full, grad_full


@pytest.mark.slow
def test_ulysses_all_to_all_moves_sequence_shards_to_head_shards_and_back():
    for rank, heads, back, grad, full, grad_full in run_distributed(_ulysses_exchange, 2):
        assert torch.equal(heads, full.chunk(2, dim=2)[rank])
        assert torch.equal(back, full.chunk(2, dim=1)[rank])
        # The backward is the reverse exchange: each rank gets the gradient of its own tokens.
        assert torch.equal(grad, grad_full.chunk(2, dim=1)[rank])
