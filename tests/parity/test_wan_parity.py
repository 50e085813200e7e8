"""Wan on megatron-core against diffusers' own WanTransformer3DModel (the numerical reference).

Every parallel layout loads a tiny random diffusers model through the weights adapter (each
rank reading only its slices) and must reproduce diffusers' output and gradients in fp32
(helpers/parity.py). 18 tokens do not divide 4 ranks, so padding and masking are exercised.
"""

import pytest

from phased_dmd_mega.testing import run_distributed

from helpers import rel_error
from helpers.parity import (
    TOLERANCE,
    WAN,
    assert_grads_match,
    full_grads,
    full_latent_grad,
    run_layout,
    save_reference,
    unsharded,
)


@pytest.fixture(scope="module")
def diffusers_t2v(tmp_path_factory):
    return save_reference(tmp_path_factory.mktemp("wan_t2v"), WAN, "t2v")


@pytest.fixture(scope="module", params=["i2v", "ti2v"])
def diffusers_variant(request, tmp_path_factory):
    return request.param, save_reference(tmp_path_factory.mktemp(f"wan_{request.param}"), WAN, request.param)


def test_tp1_forward_and_gradients_match_diffusers(diffusers_t2v):
    ref = diffusers_t2v
    out, grads, dlatents, _, _ = run_layout(ref.folder, WAN, 1, 1, False, ref.grad_out)
    assert rel_error(out, ref.out) < TOLERANCE
    assert rel_error(dlatents, ref.dlatents) < TOLERANCE
    assert_grads_match(unsharded(grads), ref, WAN)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp, ulysses, sequence_parallel",
    [(2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False)],
    ids=["tp2", "tp2_sp", "ulysses2", "tp2_ulysses2"],
)
def test_parallel_layouts_match_diffusers_output(diffusers_t2v, tp, ulysses, sequence_parallel):
    ref = diffusers_t2v
    results = run_distributed(run_layout, tp * ulysses, ref.folder, WAN, tp, ulysses, sequence_parallel)
    for out, *_ in results:  # the full velocity on every rank
        assert rel_error(out, ref.out) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_gradients_match_diffusers(diffusers_t2v, sequence_parallel):
    ref = diffusers_t2v
    results = run_distributed(run_layout, 2, ref.folder, WAN, 2, 1, sequence_parallel, ref.grad_out)
    if sequence_parallel:  # each rank's input gradient covers its own tokens; they add up
        assert rel_error(results[0][2], ref.dlatents) > 0.1
    else:
        for _, _, dlatents, _, _ in results:
            assert rel_error(dlatents, ref.dlatents) < TOLERANCE
    assert rel_error(full_latent_grad(results, sequence_parallel), ref.dlatents) < TOLERANCE
    assert_grads_match(full_grads(ref.folder, WAN, results), ref, WAN)


def test_variants_match_diffusers_at_tp1(diffusers_variant):
    variant, ref = diffusers_variant
    out, grads, dlatents, _, _ = run_layout(ref.folder, WAN, 1, 1, False, ref.grad_out, variant)
    assert rel_error(out, ref.out) < TOLERANCE
    assert rel_error(dlatents, ref.dlatents) < TOLERANCE
    assert_grads_match(unsharded(grads), ref, WAN)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp, ulysses, sequence_parallel", [(2, 1, True), (2, 2, False)], ids=["tp2_sp", "tp2_ulysses2"]
)
def test_variants_match_diffusers_in_parallel(diffusers_variant, tp, ulysses, sequence_parallel):
    variant, ref = diffusers_variant
    results = run_distributed(run_layout, tp * ulysses, ref.folder, WAN, tp, ulysses, sequence_parallel, None, variant)
    for out, *_ in results:
        assert rel_error(out, ref.out) < TOLERANCE


@pytest.mark.parametrize("options", [{"recompute": "full"}, {"recompute": "blocks", "recompute_num_blocks": 1}])
def test_activation_recompute_changes_nothing_numerically(diffusers_t2v, options):
    ref = diffusers_t2v
    out, grads, _, _, _ = run_layout(ref.folder, WAN, 1, 1, False, ref.grad_out, "t2v", **options)
    assert rel_error(out, ref.out) < TOLERANCE
    assert_grads_match(unsharded(grads), ref, WAN)


@pytest.mark.slow
def test_activation_recompute_under_tp2_sp(diffusers_t2v):
    ref = diffusers_t2v
    results = run_distributed(run_layout, 2, ref.folder, WAN, 2, 1, True, ref.grad_out, "t2v", recompute="full")
    assert_grads_match(full_grads(ref.folder, WAN, results), ref, WAN)
