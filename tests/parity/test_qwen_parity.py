"""Qwen-Image on megatron-core against diffusers' own QwenImageTransformer2DModel (the numerical
reference).

Every parallel layout loads a tiny random diffusers model through the weights adapter (each
rank reading only its slices) and must reproduce diffusers' output and gradients in fp32
(helpers/parity.py). The image is not square (3 x 5 = 15 packed tokens) and the text has 7
tokens with a different real length per sample, so neither stream divides 2 or 4 ranks:
padding, the sharding-padding mask and the text mask are all exercised. diffusers takes packed
tokens: the pipeline's own pack/unpack functions are the reference for our in-model packing.
"""

import pytest
import torch

from phased_dmd_mega.models import QwenImageModel
from phased_dmd_mega.models.qwen_image import QWEN_IMAGE_PRESETS
from phased_dmd_mega.models.qwen_image_formats import (
    diffusers_weight_rules,
    from_diffusers_config,
    to_diffusers_config,
)
from phased_dmd_mega.models.weights import TensorReader, check_source_keys
from phased_dmd_mega.testing import run_distributed

from helpers import rel_error
from helpers.parity import (
    QWEN,
    TOLERANCE,
    assert_grads_match,
    dims_of,
    full_grads,
    full_latent_grad,
    qwen_inputs,
    run_layout,
    save_reference,
    unsharded,
)
from helpers.tiny_models import QWEN_TINY

TINY = QWEN_TINY


@pytest.fixture(scope="module")
def diffusers_model(tmp_path_factory):
    return save_reference(tmp_path_factory.mktemp("qwen_image"), QWEN)


# ----------------------------------------------------------------------------- tests


def test_dims_presets_and_config_round_trip(diffusers_model):
    folder = diffusers_model.folder
    dims = dims_of(folder, QWEN)
    assert dims == QWEN_IMAGE_PRESETS["tiny"]
    assert (dims.in_channels, dims.packed_channels, dims.dim, dims.ffn_dim) == (16, 64, 64, 256)
    full = QWEN_IMAGE_PRESETS["qwen-image"]
    assert (full.num_layers, full.num_heads, full.head_dim, full.text_dim, full.ffn_dim) == (60, 24, 128, 3584, 12288)
    for preset in QWEN_IMAGE_PRESETS.values():
        assert from_diffusers_config(to_diffusers_config(preset)) == preset
    # The adapter names exactly the tensors diffusers saved.
    check_source_keys(diffusers_weight_rules(dims), TensorReader(folder).keys(), str(folder))
    with pytest.raises(ValueError, match="zero_cond_t"):
        from_diffusers_config({**TINY, "zero_cond_t": True})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"timestep": torch.zeros(2, 15)}, r"timestep must be \[B\]"),
        ({"latents": torch.zeros(2, 16, 2, 6, 10)}, r"latents \[B, C, H, W\] or \[B, C, 1, H, W\]"),
        ({"context_mask": torch.ones(2, 5)}, r"context_mask must be \[B, L\]"),
    ],
    ids=["per_token_timestep", "two_frames", "mask_shape"],
)
def test_bad_inputs_are_clear_errors(change, message):
    latents, timestep, context, context_mask = qwen_inputs()
    given = {"latents": latents, "timestep": timestep, "context": context, "context_mask": context_mask, **change}
    with pytest.raises(ValueError, match=message):
        QwenImageModel.check_inputs(**given)


def test_tp1_forward_and_gradients_match_diffusers(diffusers_model):
    ref = diffusers_model
    out, grads, dlatents, _, _ = run_layout(ref.folder, QWEN, 1, 1, False, ref.grad_out)
    assert rel_error(out, ref.out) < TOLERANCE
    assert rel_error(dlatents, ref.dlatents) < TOLERANCE
    assert_grads_match(unsharded(grads), ref, QWEN)


def test_frame_axis_and_activation_recompute(diffusers_model):
    """[B, C, 1, H, W] latents give [B, C, 1, H, W]; recompute changes nothing numerically."""
    ref = diffusers_model
    out, grads, _, _, _ = run_layout(
        ref.folder, QWEN, 1, 1, False, ref.grad_out, with_frame_axis=True, recompute="full"
    )
    assert rel_error(out, ref.out) < TOLERANCE
    assert_grads_match(unsharded(grads), ref, QWEN)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp, ulysses, sequence_parallel",
    [(2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False), (2, 2, True)],
    ids=["tp2", "tp2_sp", "ulysses2", "tp2_ulysses2", "tp2_sp_ulysses2"],
)
def test_parallel_layouts_match_diffusers(diffusers_model, tp, ulysses, sequence_parallel):
    """The full velocity on every rank; parameter and input gradients once the shards are
    joined and the partial sums added up."""
    ref = diffusers_model
    results = run_distributed(run_layout, tp * ulysses, ref.folder, QWEN, tp, ulysses, sequence_parallel, ref.grad_out)
    for out, *_ in results:
        assert rel_error(out, ref.out) < TOLERANCE
    assert_grads_match(full_grads(ref.folder, QWEN, results), ref, QWEN)
    assert rel_error(full_latent_grad(results, sequence_parallel), ref.dlatents) < TOLERANCE
