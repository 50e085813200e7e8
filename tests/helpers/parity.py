"""One parity harness for both DiTs against diffusers' own models (the numerical reference).

A tiny random diffusers model (every parameter random, norms included: ``randomize_``) is saved
with save_pretrained; a parallel layout loads it through
the architecture's weight rules (each rank reading only its slices), runs a forward and a
backward on fixed inputs, and returns its output, its gradient shards and its input gradient.
The helpers below join the shards (following the same rules' splits, and adding up the partial
sums of replicated parameters fed by split tokens) and compare them with diffusers' gradients.

Wan takes latents [B, C, F, H, W] and diffusers' own call; Qwen-Image takes [B, C, H, W]
(or with a frame axis of 1) and is driven as QwenImagePipeline drives it: packed tokens,
img_shapes and sigma = t / 1000.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.models import ModelParallelOptions
from phased_dmd_mega.models.architectures import registry
from phased_dmd_mega.models.weights import (
    COLUMN,
    ROW,
    TensorReader,
    interleave_heads,
    load_rank_state,
    split_interleaved_heads,
)

from helpers import rel_error
from helpers.tiny_models import QWEN_TINY, WAN_TINY, randomize_

TOLERANCE = 1e-5
WAN, QWEN = "wan", "qwen_image"

# ----------------------------------------------------------------------------- inputs

WAN_VARIANTS = {
    "t2v": {},
    # Wan2.1 I2V: the image branch in cross-attention (diffusers expects 512 text tokens there).
    "i2v": {"in_channels": 8, "image_dim": 20, "added_kv_proj_dim": 48},
    # Wan2.2 TI2V-5B: per-token timesteps, more channels.
    "ti2v": {"in_channels": 8, "out_channels": 8},
}
QWEN_LATENT_HW = (6, 10)  # -> a 3 x 5 grid of packed tokens
QWEN_TEXT_LENGTHS = (7, 4)  # real text tokens per sample; the context has 7


def wan_inputs(variant="t2v"):
    """(latents, timestep, context, kwargs), the same on every rank (seeded). 18 tokens:
    3 x 2 x 3 after patching, which divide neither 4 ranks nor (for Ulysses) evenly."""
    config = {**WAN_TINY, **WAN_VARIANTS[variant]}
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


def qwen_inputs():
    """(latents, timestep, context, context_mask), the same on every rank (seeded): a
    non-square image and a different real text length per sample."""
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 16, *QWEN_LATENT_HW, generator=gen)
    timestep = torch.tensor([999.0, 250.0])  # our 0..1000 scale
    context = torch.randn(2, max(QWEN_TEXT_LENGTHS), 24, generator=gen)
    lengths = torch.tensor(QWEN_TEXT_LENGTHS)
    context_mask = torch.arange(max(QWEN_TEXT_LENGTHS))[None, :] < lengths[:, None]
    return latents, timestep, context, context_mask.long()


def qwen_diffusers_velocity(model, latents, timestep, context, context_mask):
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


# ----------------------------------------------------------------------------- the reference


@dataclass
class Reference:
    """A saved diffusers model and what it computed on the inputs."""

    folder: Path
    out: torch.Tensor
    grad_out: torch.Tensor
    grads: Dict[str, torch.Tensor]
    dlatents: torch.Tensor


def _grad(param) -> torch.Tensor:
    # Qwen-Image: the last block's text-stream outputs are never used, so no gradient reaches
    # the weights that only feed them.
    return torch.zeros_like(param) if param.grad is None else param.grad.clone()


def save_reference(folder: Path, family: str, variant: str = "t2v") -> Reference:
    """A tiny random diffusers model (``randomize_``) saved with save_pretrained, its output and
    gradients."""
    torch.manual_seed(0)
    if family == WAN:
        from diffusers import WanTransformer3DModel

        model = randomize_(WanTransformer3DModel(**{**WAN_TINY, **WAN_VARIANTS[variant]}).eval())
        latents, timestep, context, kwargs = wan_inputs(variant)
        call = lambda x: model(x, timestep, context, **kwargs).sample  # noqa: E731
    else:
        from diffusers import QwenImageTransformer2DModel

        model = randomize_(QwenImageTransformer2DModel(**QWEN_TINY).eval())
        latents, timestep, context, context_mask = qwen_inputs()
        call = lambda x: qwen_diffusers_velocity(model, x, timestep, context, context_mask)  # noqa: E731
    model.save_pretrained(folder)
    latents.requires_grad_()
    out = call(latents)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad_out)
    grads = {name: _grad(p) for name, p in model.named_parameters()}
    return Reference(Path(folder), out.detach(), grad_out, grads, latents.grad.clone())


# ----------------------------------------------------------------------------- our model, per rank


def dims_of(folder: Path, family: str):
    config = json.loads((Path(folder) / "config.json").read_text())
    return registry()[family].dims_from_diffusers_config(config, str(folder))


def load_rank_model(folder: Path, family: str, sequence_parallel: bool = False, **options):
    """Our model of the folder's weights, this rank's slices only."""
    architecture, dims = registry()[family], dims_of(folder, family)
    par = ModelParallelOptions(
        sequence_parallel=sequence_parallel, attention_backend="sdpa", initialize=False, **options
    )
    model = architecture.model_class(dims, par)
    layout = parallel.layout()
    rules = architecture.weight_rules(dims)
    model.load_state_dict(
        load_rank_state(rules, TensorReader(folder), layout.tensor_parallel_rank, layout.tensor_parallel), strict=True
    )
    return model


def _forward(model, family: str, variant: str, with_frame_axis: bool):
    """(the latents leaf, our velocity) on the family's inputs."""
    if family == WAN:
        latents, timestep, context, kwargs = wan_inputs(variant)
        latents.requires_grad_()
        return latents, model(latents, timestep, context, **kwargs)
    latents, timestep, context, context_mask = qwen_inputs()
    latents.requires_grad_()
    out = model(latents.unsqueeze(2) if with_frame_axis else latents, timestep, context, context_mask)
    if with_frame_axis:
        assert out.shape == (*latents.shape[:2], 1, *latents.shape[2:])
        out = out[:, :, 0]
    return latents, out


def run_layout(
    folder, family, tp, ulysses, sequence_parallel, grad_out=None, variant="t2v", with_frame_axis=False, **options
):
    """One rank: forward (and backward) -> (output, {name: (grad, tagged)}, dlatents, tp rank,
    ulysses rank). Run under ``run_distributed`` or alone (one process)."""
    layout = parallel.initialize(tensor_parallel=tp, ulysses_parallel=ulysses, sequence_parallel=sequence_parallel)
    model = load_rank_model(folder, family, sequence_parallel, **options)
    latents, out = _forward(model, family, variant, with_frame_axis)
    grads = None
    if grad_out is not None:
        out.backward(grad_out)
        grads = {name: (_grad(p), bool(getattr(p, "sequence_parallel", False))) for name, p in model.named_parameters()}
    parallel.destroy()
    dlatents = None if latents.grad is None else latents.grad.clone()
    return out.detach(), grads, dlatents, layout.tensor_parallel_rank, layout.ulysses_rank


# ----------------------------------------------------------------------------- gradients


def assert_grads_match(own_grads: Dict[str, torch.Tensor], reference: Reference, family: str) -> None:
    """Our full (unsharded) gradients against diffusers' through the architecture's rules."""
    dims = dims_of(reference.folder, family)
    expected = load_rank_state(registry()[family].weight_rules(dims), reference.grads, 0, 1)
    assert set(expected) == set(own_grads)
    for name, grad in own_grads.items():
        if expected[name].norm() == 0:  # weights that only feed the last block's unused text output
            assert grad.norm() < 1e-6, name
        else:
            assert rel_error(grad, expected[name]) < 1e-4, name


def unsharded(grads) -> Dict[str, torch.Tensor]:
    """One process's gradients without their tags."""
    return {name: grad for name, (grad, _) in grads.items()}


def _unshard_tp_grads(dims, rules, rank_grads: List[dict]) -> Dict[str, torch.Tensor]:
    """Join one Ulysses rank's TP gradient shards (in TP rank order) into full tensors following
    the split rules; partial sums of tagged replicated parameters are added up."""
    full = {}
    for rule in rules:
        pieces = [grads[rule.own][0] for grads in rank_grads]
        if rule.split == COLUMN and len(rule.sources) > 1:  # interleaved per head: regroup per source
            per_rank = [split_interleaved_heads(p, len(rule.sources), dims.head_dim) for p in pieces]
            full[rule.own] = interleave_heads([torch.cat(parts, 0) for parts in zip(*per_rank)], dims.head_dim)
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


def full_grads(folder: Path, family: str, results: List[Tuple]) -> Dict[str, torch.Tensor]:
    """Unshard over TP within each Ulysses rank, then add the Ulysses ranks' partial sums."""
    dims = dims_of(folder, family)
    rules = registry()[family].weight_rules(dims)
    by_ulysses: Dict[int, list] = {}
    for _, grads, _, _, ulysses_rank in sorted(results, key=lambda r: (r[4], r[3])):
        by_ulysses.setdefault(ulysses_rank, []).append(grads)
    per_ulysses = [_unshard_tp_grads(dims, rules, group) for group in by_ulysses.values()]
    return {name: sum(g[name] for g in per_ulysses) for name in per_ulysses[0]}


def full_latent_grad(results: List[Tuple], sequence_parallel: bool) -> torch.Tensor:
    """Each Ulysses rank (and, under sequence parallelism, each TP rank) holds the input
    gradient of its own tokens; without sequence parallelism the TP ranks agree."""
    total = 0
    for _, _, dlatents, tp_rank, _ in results:
        if sequence_parallel or tp_rank == 0:
            total = total + dlatents
    return total
