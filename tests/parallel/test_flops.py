"""The FLOP counter (flops.py) against torch's FlopCounterMode on real Phased DMD iterations of a
tiny Wan (attention through SDPA's math kernel, whose matmuls the counter mode sees): each
rank's count, at one process, at tensor parallel 2 with sequence parallelism, and at Ulysses 2,
matches what that rank ran."""

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from phased_dmd_mega import parallel
from phased_dmd_mega.flops import FlopCounter
from phased_dmd_mega.testing import run_distributed

from helpers.tiny_distill import PADDED_SHAPE, SHAPE, build_trainer


def _counted_and_measured(tp, sequence_parallel, ulysses, shape):
    trainer, batch = build_trainer(tp, sequence_parallel, 3.0, ulysses, shape)
    counter = FlopCounter().attach(trainer.teacher.experts, *(r.model for r in trainer.generators + trainer.fakes))
    pairs = []
    for phase, iteration in ((0, 0), (1, 1)):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as measured:
            trainer.iteration(phase, batch, iteration)
        counted = counter.take()
        assert counted.hardware == counted.model  # no recompute here
        pairs.append((counted.model, measured.get_total_flops()))
    parallel.destroy()
    return pairs


def assert_close_counts(pairs):
    for counted, measured in pairs:
        assert measured > 0 and counted == pytest.approx(measured, rel=0.02), (counted, measured)


def test_one_process_counts_what_an_iteration_runs():
    (pairs,) = run_distributed(_counted_and_measured, 1, 1, False, 1, SHAPE)
    assert_close_counts(pairs)


@pytest.fixture(scope="module")
def one_process_padded():
    (pairs,) = run_distributed(_counted_and_measured, 1, 1, False, 1, PADDED_SHAPE)
    return pairs


@pytest.mark.slow
@pytest.mark.parametrize("tp, sequence_parallel, ulysses", [(2, True, 1), (1, False, 2)], ids=["tp2_sp", "ulysses2"])
def test_each_rank_counts_its_share(one_process_padded, tp, sequence_parallel, ulysses):
    """On 9 tokens, which 2 ranks split with padding."""
    whole = one_process_padded
    for pairs in run_distributed(_counted_and_measured, 2, tp, sequence_parallel, ulysses, PADDED_SHAPE):
        assert_close_counts(pairs)
        # Each rank runs about half of the one-process work (the text, the time embedding and,
        # under Ulysses, the cross-attention's keys and values are whole on every rank).
        for (rank_count, _), (one_process, _) in zip(pairs, whole):
            assert 0.4 * one_process < rank_count < 0.75 * one_process
