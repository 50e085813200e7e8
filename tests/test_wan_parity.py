"""Wan on megatron-core against diffusers' own WanTransformer3DModel (the numerical reference).

A tiny random diffusers model is saved with save_pretrained; every parallel layout loads it
through the weights adapter (each rank reading only its slices) and must reproduce diffusers'
output in fp32. 18 tokens do not divide 4 ranks, so padding and masking are exercised.
"""

import json

import pytest
import torch
from tiny_models import WAN_TINY

from phased_dmd_mega import parallel
from phased_dmd_mega.models import ModelParallelOptions, WanModel
from phased_dmd_mega.models.wan_formats import diffusers_weight_rules, from_diffusers_config
from phased_dmd_mega.models.weights import (
    COLUMN,
    ROW,
    TensorReader,
    interleave_heads,
    load_rank_state,
)
from phased_dmd_mega.testing import run_distributed

TINY = WAN_TINY
TOLERANCE = 1e-5


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


VARIANTS = {
    "t2v": {},
    # Wan2.1 I2V: the image branch in cross-attention (diffusers expects 512 text tokens there).
    "i2v": {"in_channels": 8, "image_dim": 20, "added_kv_proj_dim": 48},
    # Wan2.2 TI2V-5B: per-token timesteps, more channels.
    "ti2v": {"in_channels": 8, "out_channels": 8},
}


def inputs(variant="t2v"):
    """Model inputs; the same on every rank (seeded). 18 tokens: 3 x 2 x 3 after patching."""
    config = {**TINY, **VARIANTS[variant]}
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(2, config["in_channels"], 3, 4, 6, generator=gen)
    timestep = torch.tensor([999.0, 250.0])
    if variant == "ti2v":
        timestep = torch.rand(2, 18, generator=gen) * 1000
    context = torch.randn(2, 512 if variant == "i2v" else 7, 16, generator=gen)
    kwargs = {}
    if variant == "i2v":
        kwargs["encoder_hidden_states_image"] = torch.randn(2, 5, 20, generator=gen)
    return latents, timestep, context, kwargs


def save_diffusers_model(folder, variant):
    """A tiny random diffusers model saved with save_pretrained, and its output and gradients."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY, **VARIANTS[variant]}).eval()
    model.save_pretrained(folder)
    latents, timestep, context, kwargs = inputs(variant)
    latents.requires_grad_()
    out = model(latents, timestep, context, **kwargs).sample
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad_out)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return folder, out.detach(), grad_out, grads, latents.grad.clone()


@pytest.fixture(scope="module")
def diffusers_t2v(tmp_path_factory):
    return save_diffusers_model(tmp_path_factory.mktemp("wan_t2v"), "t2v")


@pytest.fixture(scope="module", params=["i2v", "ti2v"])
def diffusers_variant(request, tmp_path_factory):
    return request.param, save_diffusers_model(tmp_path_factory.mktemp(f"wan_{request.param}"), request.param)


def load_model(folder, sequence_parallel=False, **options):
    arch = from_diffusers_config(json.loads((folder / "config.json").read_text()))
    par = ModelParallelOptions(
        sequence_parallel=sequence_parallel, attention_backend="sdpa", initialize=False, **options
    )
    model = WanModel(arch, par)
    layout = parallel.layout()
    state = load_rank_state(
        diffusers_weight_rules(arch), TensorReader(folder), layout.tensor_parallel_rank, layout.tensor_parallel
    )
    model.load_state_dict(state, strict=True)
    return model


def _run_layout(folder, tp, ulysses, sequence_parallel, grad_out=None, variant="t2v", **options):
    parallel.initialize(tensor_parallel=tp, ulysses_parallel=ulysses, sequence_parallel=sequence_parallel)
    model = load_model(folder, sequence_parallel, **options)
    latents, timestep, context, kwargs = inputs(variant)
    latents.requires_grad_()
    out = model(latents, timestep, context, **kwargs)
    grads = None
    if grad_out is not None:
        out.backward(grad_out)
        grads = {
            name: (p.grad.clone(), bool(getattr(p, "sequence_parallel", False))) for name, p in model.named_parameters()
        }
    parallel.destroy()
    return out.detach(), grads, None if latents.grad is None else latents.grad.clone()


def test_tp1_forward_and_gradients_match_diffusers(diffusers_t2v):
    folder, ref_out, grad_out, ref_grads, ref_dlatents = diffusers_t2v
    out, grads, dlatents = _run_layout(folder, 1, 1, False, grad_out)
    assert rel_error(out, ref_out) < TOLERANCE
    assert rel_error(dlatents, ref_dlatents) < TOLERANCE
    full = {name: g for name, (g, _) in grads.items()}
    _assert_grads_match(full, ref_grads, folder)


def _assert_grads_match(own_grads, ref_grads, folder):
    """Own gradients (full, unsharded) against diffusers' via the adapter's table."""
    arch = from_diffusers_config(json.loads((folder / "config.json").read_text()))
    expected = load_rank_state(diffusers_weight_rules(arch), ref_grads, 0, 1)
    assert set(expected) == set(own_grads)
    for name, grad in own_grads.items():
        assert rel_error(grad, expected[name]) < 1e-4, name


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp, ulysses, sequence_parallel",
    [(2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False)],
    ids=["tp2", "tp2_sp", "ulysses2", "tp2_ulysses2"],
)
def test_parallel_layouts_match_diffusers_output(diffusers_t2v, tp, ulysses, sequence_parallel):
    folder, ref_out, *_ = diffusers_t2v
    results = run_distributed(_run_layout, tp * ulysses, folder, tp, ulysses, sequence_parallel)
    for out, _, _ in results:  # the full velocity on every rank
        assert rel_error(out, ref_out) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_gradients_match_diffusers(diffusers_t2v, sequence_parallel):
    folder, ref_out, grad_out, ref_grads, ref_dlatents = diffusers_t2v
    results = run_distributed(_run_layout, 2, folder, 2, 1, sequence_parallel, grad_out)
    if sequence_parallel:  # each rank's input gradient covers its own tokens; they add up
        assert rel_error(results[0][2] + results[1][2], ref_dlatents) < TOLERANCE
        assert rel_error(results[0][2], ref_dlatents) > 0.1
    else:
        for _, _, dlatents in results:
            assert rel_error(dlatents, ref_dlatents) < TOLERANCE
    arch = from_diffusers_config(json.loads((folder / "config.json").read_text()))
    _assert_grads_match(_unshard_grads(arch, [r[1] for r in results]), ref_grads, folder)


def _unshard_grads(arch, rank_grads):
    """Join TP=2 gradient shards into full tensors following the adapter's split rules;
    partial sums of sequence-parallel replicated parameters are added up."""
    full = {}
    for rule in diffusers_weight_rules(arch):
        pieces = [grads[rule.own][0] for grads in rank_grads]
        if rule.split == COLUMN:
            if len(rule.sources) > 1:  # interleaved per head on each rank: regroup per source
                per_rank = [_deinterleave(p, len(rule.sources), arch.head_dim) for p in pieces]
                full[rule.own] = interleave_heads([torch.cat(parts, 0) for parts in zip(*per_rank)], arch.head_dim)
            else:
                full[rule.own] = torch.cat(pieces, 0)
        elif rule.split == ROW:
            full[rule.own] = torch.cat(pieces, 1)
        elif rank_grads[0][rule.own][1]:  # sequence parallel: partial sums over tokens
            full[rule.own] = sum(pieces)
        else:
            torch.testing.assert_close(pieces[0], pieces[1])
            full[rule.own] = pieces[0]
    return full


def _deinterleave(fused, parts, head_dim):
    from phased_dmd_mega.models.weights import split_interleaved_heads

    return split_interleaved_heads(fused, parts, head_dim)


def test_variants_match_diffusers_at_tp1(diffusers_variant):
    variant, (folder, ref_out, grad_out, ref_grads, ref_dlatents) = diffusers_variant
    out, grads, dlatents = _run_layout(folder, 1, 1, False, grad_out, variant)
    assert rel_error(out, ref_out) < TOLERANCE
    assert rel_error(dlatents, ref_dlatents) < TOLERANCE
    _assert_grads_match({name: g for name, (g, _) in grads.items()}, ref_grads, folder)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp, ulysses, sequence_parallel", [(2, 1, True), (2, 2, False)], ids=["tp2_sp", "tp2_ulysses2"]
)
def test_variants_match_diffusers_in_parallel(diffusers_variant, tp, ulysses, sequence_parallel):
    variant, (folder, ref_out, *_) = diffusers_variant
    results = run_distributed(_run_layout, tp * ulysses, folder, tp, ulysses, sequence_parallel, None, variant)
    for out, _, _ in results:
        assert rel_error(out, ref_out) < TOLERANCE


@pytest.mark.parametrize("options", [{"recompute": "full"}, {"recompute": "blocks", "recompute_num_blocks": 1}])
def test_activation_recompute_changes_nothing_numerically(diffusers_t2v, options):
    folder, ref_out, grad_out, ref_grads, _ = diffusers_t2v
    out, grads, _ = _run_layout(folder, 1, 1, False, grad_out, "t2v", **options)
    assert rel_error(out, ref_out) < TOLERANCE
    _assert_grads_match({name: g for name, (g, _) in grads.items()}, ref_grads, folder)


@pytest.mark.slow
def test_activation_recompute_under_tp2_sp(diffusers_t2v):
    folder, ref_out, grad_out, ref_grads, _ = diffusers_t2v
    results = run_distributed(_run_layout, 2, folder, 2, 1, True, grad_out, "t2v", recompute="full")
    arch = from_diffusers_config(json.loads((folder / "config.json").read_text()))
    _assert_grads_match(_unshard_grads(arch, [r[1] for r in results]), ref_grads, folder)
