"""Phased DMD iterations on a tiny Wan: the TP=2 runs (with and without sequence parallelism)
and the Ulysses runs must reproduce the one-process run: every loss, every gradient norm, and
the trained generator. Under a token split each rank's losses cover its own tokens only."""

import pytest
import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.distill.alignment import pull_fake_toward_generator
from phased_dmd_mega.distill.phased import sample
from phased_dmd_mega.testing import run_distributed

from helpers.tiny_distill import PADDED_SHAPE, SHAPE, TI2V_SHAPE, build_trainer, run_iterations


def _distill(tp, sequence_parallel, guidance, ulysses=1, shape=SHAPE, micro_batch_size=None, first_frame=False):
    trainer, batch = build_trainer(
        tp, sequence_parallel, guidance, ulysses, shape, first_frame, micro_batch_size=micro_batch_size
    )
    logs = run_iterations(trainer, batch, ((0, 0), (0, 1), (1, 2)))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = sample([g.model for g in trainer.generators], trainer.layout, noise, batch.condition)
    parallel.destroy()
    return logs, out


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp, sequence_parallel, ulysses, shape, micro",
    [
        (2, False, 1, SHAPE, None),
        (2, True, 1, SHAPE, None),
        (2, True, 1, PADDED_SHAPE, None),
        (1, False, 2, PADDED_SHAPE, None),
        (2, True, 1, SHAPE, 1),
    ],
    ids=["tp2", "tp2_sp", "tp2_sp_padded", "ulysses2_padded", "tp2_sp_micro_batches"],
)
def test_split_distillation_reproduces_one_process(tp, sequence_parallel, ulysses, shape, micro):
    reference_logs, reference_out = run_distributed(_distill, 1, 1, False, 3.0, 1, shape)[0]
    for logs, out in run_distributed(_distill, 2, tp, sequence_parallel, 3.0, ulysses, shape, micro):
        for ref, got in zip(reference_logs, logs):
            assert set(ref) == set(got)
            for key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key
        torch.testing.assert_close(out, reference_out, rtol=1e-4, atol=1e-5)
    # The run did something: the losses are real numbers and the generator moved.
    assert all(log["dmd_loss"] > 0 and log["fake_loss"] > 0 for log in reference_logs)


@pytest.mark.slow
@pytest.mark.parametrize("tp, ulysses", [(2, 1), (1, 2)], ids=["tp2_sp", "ulysses2"])
def test_split_ti2v_distillation_leaves_the_given_frame_out_of_every_ranks_losses(tp, ulysses):
    """The given first frame's tokens lie on rank 0 only: its share of the losses is smaller."""
    reference_logs, reference_out = run_distributed(_distill, 1, 1, False, 3.0, 1, TI2V_SHAPE, None, True)[0]
    for logs, out in run_distributed(_distill, 2, tp, tp > 1, 3.0, ulysses, TI2V_SHAPE, None, True):
        for ref, got in zip(reference_logs, logs):
            for key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key
        torch.testing.assert_close(out, reference_out, rtol=1e-4, atol=1e-5)
    assert all(log["dmd_loss"] > 0 and log["fake_loss"] > 0 for log in reference_logs)


def _distill_with_ida(tp, sequence_parallel, decay):
    """As ``_distill``, each applied generator update followed by the IDA pull of its fake."""
    trainer, batch = build_trainer(tp, sequence_parallel, 3.0)
    logs = []
    for phase, it in ((0, 0), (0, 1), (1, 2)):
        logs += run_iterations(trainer, batch, ((phase, it),))
        if decay is not None:
            role = trainer.generators[phase]
            pull_fake_toward_generator(trainer.fakes[phase], role.model, trainer.layout, phase, decay)
    fakes = [p.detach().clone() for f in trainer.fakes for p in f.model.parameters()]
    parallel.destroy()
    return logs, fakes


@pytest.mark.slow
def test_split_distillation_with_ida_reproduces_one_process():
    reference_logs, _ = run_distributed(_distill_with_ida, 1, 1, False, 0.5)[0]
    without_logs, _ = run_distributed(_distill_with_ida, 1, 1, False, None)[0]
    assert reference_logs[1]["fake_loss"] != without_logs[1]["fake_loss"]  # IDA acted (deterministic runs)
    for logs, _ in run_distributed(_distill_with_ida, 2, 2, True, 0.5):
        for ref, got in zip(reference_logs, logs):
            for key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key


def _distill_counting_dit_calls(batched):
    trainer, batch = build_trainer(1, fake_updates_per_generator_update=4, batch_fake_rollouts=batched)
    calls = []
    for role in trainer.generators:
        role.model.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    logs = run_iterations(trainer, batch, ((0, 0), (1, 1), (1, 2)))
    weights = [p.detach().clone() for g in trainer.generators for p in g.model.parameters()]
    parallel.destroy()
    return logs, weights, calls


def test_batched_fake_rollouts_give_the_same_iterations_with_fewer_dit_calls():
    ((ref_logs, ref_weights, ref_calls),) = run_distributed(_distill_counting_dit_calls, 1, False)
    ((logs, weights, calls),) = run_distributed(_distill_counting_dit_calls, 1, True)
    for ref, got in zip(ref_logs, logs):
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key
    for ref, got in zip(ref_weights, weights):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # Four fake updates over two SGTS exit steps: at least two share one, so fewer, larger calls
    # over the same number of generated samples.
    assert len(calls) < len(ref_calls) and sum(calls) == sum(ref_calls)
    assert max(calls) > SHAPE[0]


def _distill_recording_calls(micro_batch_size):
    trainer, batch = build_trainer(1, shape=(4, *SHAPE[1:]), micro_batch_size=micro_batch_size)
    calls = []  # (batch, with gradient) of every generator and fake call
    for role in trainer.generators + trainer.fakes:
        role.model.register_forward_hook(
            lambda module, args, out: calls.append((out.shape[0], torch.is_grad_enabled()))
        )
    logs = run_iterations(trainer, batch, ((0, 0), (1, 1), (1, 2)))
    weights = [p.detach().clone() for role in trainer.generators + trainer.fakes for p in role.model.parameters()]
    parallel.destroy()
    return logs, weights, calls


def test_micro_batches_accumulate_to_the_whole_batch_update():
    ((ref_logs, ref_weights, ref_calls),) = run_distributed(_distill_recording_calls, 1, None)
    ((logs, weights, calls),) = run_distributed(_distill_recording_calls, 1, 2)
    for ref, got in zip(ref_logs, logs):
        assert set(ref) == set(got)
        for key in ref:
            if key != "step_seconds":
                assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key
    for ref, got in zip(ref_weights, weights):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    (initial,) = run_distributed(_initial_weights, 1)
    assert any(not torch.equal(start, end) for start, end in zip(initial, weights))  # the updates did move them
    # What keeps activations for the backward runs two samples at a time instead of four.
    assert max(n for n, grad in ref_calls if grad) == 4
    assert max(n for n, grad in calls if grad) == 2


def _initial_weights():
    """The roles' weights before any update (the teacher's)."""
    trainer, _ = build_trainer(1, shape=(4, *SHAPE[1:]))
    weights = [p.detach().clone() for role in trainer.generators + trainer.fakes for p in role.model.parameters()]
    parallel.destroy()
    return weights


def _refused_micro_batch():
    trainer, batch = build_trainer(1, shape=(4, *SHAPE[1:]), micro_batch_size=3)
    try:
        trainer.iteration(0, batch, 0)
    except ValueError as error:
        return str(error)
    finally:
        parallel.destroy()
    return None


def test_a_micro_batch_size_that_does_not_divide_the_batch_is_refused():
    (message,) = run_distributed(_refused_micro_batch, 1)
    assert message is not None and "micro_batch_size 3" in message and "4 samples" in message
