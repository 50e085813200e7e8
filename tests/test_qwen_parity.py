"""Qwen-Image on megatron-core against diffusers' own QwenImageTransformer2DModel (the numerical
reference).

A tiny random diffusers model is saved with save_pretrained; every parallel layout loads it
through the weights adapter (each rank reading only its slices) and must reproduce diffusers'
output and gradients in fp32. The image is not square (3 x 5 = 15 packed tokens) and the text
has 7 tokens with a different real length per sample, so neither stream divides 2 or 4 ranks:
padding, the sharding-padding mask and the text mask are all exercised. diffusers takes packed
tokens: the pipeline's own pack/unpack functions are the reference for our in-model packing.
"""

import json

import pytest
import torch
from tiny_models import QWEN_TINY

from phased_dmd_mega import parallel
from phased_dmd_mega.models import ModelParallelOptions, QwenImageModel
from phased_dmd_mega.models.qwen_image import QWEN_IMAGE_PRESETS
from phased_dmd_mega.models.qwen_image_formats import (
    diffusers_weight_rules,
    from_diffusers_config,
    to_diffusers_config,
)
from phased_dmd_mega.models.weights import (
    COLUMN,
    ROW,
    TensorReader,
    check_source_keys,
    interleave_heads,
    load_rank_state,
    split_interleaved_heads,
)
from phased_dmd_mega.testing import run_distributed

TINY = QWEN_TINY
TOLERANCE = 1e-5
LATENT_HW = (6, 10)  # -> a 3 x 5 grid of packed tokens
TEXT_LENGTHS = (7, 4)  # real text tokens per sample; the context has 7


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def inputs():
    """Model inputs; the same on every rank (seeded)."""
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 16, *LATENT_HW, generator=gen)
    timestep = torch.tensor([999.0, 250.0])  # our 0..1000 scale
    context = torch.randn(2, max(TEXT_LENGTHS), 24, generator=gen)
    context_mask = torch.arange(max(TEXT_LENGTHS))[None, :] < torch.tensor(TEXT_LENGTHS)[:, None]
    return latents, timestep, context, context_mask.long()


def diffusers_velocity(model, latents, timestep, context, context_mask):
    """diffusers' model driven as its pipeline drives it: packed tokens, img_shapes, sigma."""
    from diffusers import QwenImagePipeline

    b, c, height, width = latents.shape
    packed = QwenImagePipeline._pack_latents(latents, b, c, height, width)
    out = model(
        hidden_states=packed,
        encoder_hidden_states=context,
        encoder_hidden_states_mask=context_mask,
        timestep=timestep / 1000,
        img_shapes=[[(1, height // 2, width // 2)]] * b,
    ).sample
    # _unpack_latents takes pixel sizes (VAE factor 8) and returns [B, C, 1, H, W].
    return QwenImagePipeline._unpack_latents(out, height * 8, width * 8, 8)[:, :, 0]


def _grad(param):
    # The last block's text-stream outputs are never used: no gradient reaches those weights.
    return torch.zeros_like(param) if param.grad is None else param.grad.clone()


@pytest.fixture(scope="module")
def diffusers_model(tmp_path_factory):
    """A tiny random diffusers model saved with save_pretrained, and its output and gradients."""
    from diffusers import QwenImageTransformer2DModel

    folder = tmp_path_factory.mktemp("qwen_image")
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY).eval()
    model.save_pretrained(folder)
    latents, timestep, context, context_mask = inputs()
    latents.requires_grad_()
    out = diffusers_velocity(model, latents, timestep, context, context_mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad_out)
    grads = {name: _grad(p) for name, p in model.named_parameters()}
    return folder, out.detach(), grad_out, grads, latents.grad.clone()


def load_arch(folder):
    return from_diffusers_config(json.loads((folder / "config.json").read_text()))


def load_model(folder, sequence_parallel=False, **options):
    arch = load_arch(folder)
    par = ModelParallelOptions(
        sequence_parallel=sequence_parallel, attention_backend="sdpa", initialize=False, **options
    )
    model = QwenImageModel(arch, par)
    layout = parallel.layout()
    state = load_rank_state(
        diffusers_weight_rules(arch), TensorReader(folder), layout.tensor_parallel_rank, layout.tensor_parallel
    )
    model.load_state_dict(state, strict=True)
    return model


def _run_layout(folder, tp, ulysses, sequence_parallel, grad_out=None, with_frame_axis=False, **options):
    """One rank: forward (and backward) -> (output, {name: (grad, tagged)}, dlatents, tp rank, ulysses rank)."""
    layout = parallel.initialize(tensor_parallel=tp, ulysses_parallel=ulysses, sequence_parallel=sequence_parallel)
    model = load_model(folder, sequence_parallel, **options)
    latents, timestep, context, context_mask = inputs()
    latents.requires_grad_()
    out = model(latents.unsqueeze(2) if with_frame_axis else latents, timestep, context, context_mask)
    if with_frame_axis:
        assert out.shape == (*latents.shape[:2], 1, *latents.shape[2:])
        out = out[:, :, 0]
    grads = None
    if grad_out is not None:
        out.backward(grad_out)
        grads = {name: (_grad(p), bool(getattr(p, "sequence_parallel", False))) for name, p in model.named_parameters()}
    parallel.destroy()
    dlatents = None if latents.grad is None else latents.grad.clone()
    return out.detach(), grads, dlatents, layout.tensor_parallel_rank, layout.ulysses_rank


# ----------------------------------------------------------------------------- gradient helpers


def _assert_grads_match(own_grads, ref_grads, arch):
    """Own gradients (full, unsharded) against diffusers' via the adapter's table."""
    expected = load_rank_state(diffusers_weight_rules(arch), ref_grads, 0, 1)
    assert set(expected) == set(own_grads)
    for name, grad in own_grads.items():
        if expected[name].norm() == 0:  # weights that only feed the last block's unused text output
            assert grad.norm() < 1e-6, name
        else:
            assert rel_error(grad, expected[name]) < 1e-4, name


def _unshard_tp_grads(arch, rank_grads):
    """Join one Ulysses rank's TP gradient shards (in TP rank order) into full tensors following
    the adapter's split rules; partial sums of tagged replicated parameters are added up."""
    full = {}
    for rule in diffusers_weight_rules(arch):
        pieces = [grads[rule.own][0] for grads in rank_grads]
        if rule.split == COLUMN and len(rule.sources) > 1:  # interleaved per head: regroup per source
            per_rank = [split_interleaved_heads(p, len(rule.sources), arch.head_dim) for p in pieces]
            full[rule.own] = interleave_heads([torch.cat(parts, 0) for parts in zip(*per_rank)], arch.head_dim)
        elif rule.split == COLUMN:
            full[rule.own] = torch.cat(pieces, 0)
        elif rule.split == ROW:
            full[rule.own] = torch.cat(pieces, 1)
        elif rank_grads[0][rule.own][1]:  # tagged: partial sums over the TP group
            full[rule.own] = sum(pieces)
        else:
            for other in pieces[1:]:
                torch.testing.assert_close(other, pieces[0])
            full[rule.own] = pieces[0]
    return full


def _full_grads(arch, results):
    """Unshard over TP within each Ulysses rank, then add the Ulysses ranks' partial sums."""
    by_ulysses = {}
    for _, grads, _, _tp_rank, ulysses_rank in sorted(results, key=lambda r: (r[4], r[3])):
        by_ulysses.setdefault(ulysses_rank, []).append(grads)
    per_ulysses = [_unshard_tp_grads(arch, group) for group in by_ulysses.values()]
    return {name: sum(g[name] for g in per_ulysses) for name in per_ulysses[0]}


def _full_latent_grad(results, sequence_parallel):
    """Each Ulysses rank (and, under sequence parallelism, each TP rank) holds the input
    gradient of its own tokens; without sequence parallelism the TP ranks agree."""
    total = 0
    for _, _, dlatents, tp_rank, _ in results:
        if sequence_parallel or tp_rank == 0:
            total = total + dlatents
    return total


# ----------------------------------------------------------------------------- tests


def test_arch_presets_and_config_round_trip(diffusers_model):
    folder = diffusers_model[0]
    arch = load_arch(folder)
    assert arch == QWEN_IMAGE_PRESETS["tiny"]
    assert (arch.in_channels, arch.packed_channels, arch.dim, arch.ffn_dim) == (16, 64, 64, 256)
    full = QWEN_IMAGE_PRESETS["qwen-image"]
    assert (full.num_layers, full.num_heads, full.head_dim, full.text_dim, full.ffn_dim) == (60, 24, 128, 3584, 12288)
    for preset in QWEN_IMAGE_PRESETS.values():
        assert from_diffusers_config(to_diffusers_config(preset)) == preset
    # The adapter names exactly the tensors diffusers saved.
    check_source_keys(diffusers_weight_rules(arch), TensorReader(folder).keys(), str(folder))
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
    latents, timestep, context, context_mask = inputs()
    given = {"latents": latents, "timestep": timestep, "context": context, "context_mask": context_mask, **change}
    with pytest.raises(ValueError, match=message):
        QwenImageModel.check_inputs(**given)


def test_tp1_forward_and_gradients_match_diffusers(diffusers_model):
    folder, ref_out, grad_out, ref_grads, ref_dlatents = diffusers_model
    out, grads, dlatents, _, _ = _run_layout(folder, 1, 1, False, grad_out)
    assert rel_error(out, ref_out) < TOLERANCE
    assert rel_error(dlatents, ref_dlatents) < TOLERANCE
    _assert_grads_match({name: g for name, (g, _) in grads.items()}, ref_grads, load_arch(folder))


def test_frame_axis_and_activation_recompute(diffusers_model):
    """[B, C, 1, H, W] latents give [B, C, 1, H, W]; recompute changes nothing numerically."""
    folder, ref_out, grad_out, ref_grads, _ = diffusers_model
    out, grads, _, _, _ = _run_layout(folder, 1, 1, False, grad_out, with_frame_axis=True, recompute="full")
    assert rel_error(out, ref_out) < TOLERANCE
    _assert_grads_match({name: g for name, (g, _) in grads.items()}, ref_grads, load_arch(folder))


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp, ulysses, sequence_parallel",
    [(2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False), (2, 2, True)],
    ids=["tp2", "tp2_sp", "ulysses2", "tp2_ulysses2", "tp2_sp_ulysses2"],
)
def test_parallel_layouts_match_diffusers(diffusers_model, tp, ulysses, sequence_parallel):
    """The full velocity on every rank; parameter and input gradients once the shards are
    joined and the partial sums added up."""
    folder, ref_out, grad_out, ref_grads, ref_dlatents = diffusers_model
    results = run_distributed(_run_layout, tp * ulysses, folder, tp, ulysses, sequence_parallel, grad_out)
    for out, *_ in results:
        assert rel_error(out, ref_out) < TOLERANCE
    arch = load_arch(folder)
    _assert_grads_match(_full_grads(arch, results), ref_grads, arch)
    assert rel_error(_full_latent_grad(results, sequence_parallel), ref_dlatents) < TOLERANCE
