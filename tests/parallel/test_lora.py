"""LoRA roles on a shared frozen model: TP=2 (with and without SP) reproduces TP=1 in output
and adapter gradients; roles share one base, start equal to it, and leave it untouched."""

from dataclasses import replace

import pytest
import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.models import WAN_PRESETS, ModelParallelOptions, WanModel
from phased_dmd_mega.models.lora import add_adapter
from phased_dmd_mega.testing import run_distributed

ARCH = replace(WAN_PRESETS["tiny"], in_channels=4, out_channels=4)
TARGETS = ("linear_qkv", "linear_q", "linear_kv", "linear_proj", "linear_fc1", "linear_fc2")


def inputs():
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 1, 6, 8, generator=gen),
        torch.tensor([900.0, 300.0]),
        torch.randn(2, 5, ARCH.text_dim, generator=gen),
    )


def _set_nonzero_b(view):
    """Give every B a value (drawn whole, then sliced like the layer) so the update shows."""
    for index, pair in enumerate(view.adapters):
        b = pair.lora_B
        full_rows = b.shape[0] * (parallel.layout().tensor_parallel if getattr(b, "partition_dim", None) == 0 else 1)
        full = torch.randn(full_rows, b.shape[1], generator=torch.Generator().manual_seed(index)) * 0.1
        rank = parallel.layout().tensor_parallel_rank
        with torch.no_grad():
            b.copy_(full[rank * b.shape[0] : (rank + 1) * b.shape[0]] if full_rows != b.shape[0] else full)


def _run(tp, sequence_parallel):
    parallel.initialize(tensor_parallel=tp, sequence_parallel=sequence_parallel, seed=2)
    model = WanModel(ARCH, ModelParallelOptions(attention_backend="sdpa", sequence_parallel=sequence_parallel))
    view = add_adapter(model, "generator0", rank=4, alpha=8.0, target_modules=TARGETS)
    _set_nonzero_b(view)
    out = view(*inputs())
    out.square().mean().backward()
    grads = {
        n: (
            p.grad.clone(),
            getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None,
            bool(getattr(p, "sequence_parallel", False)),
        )
        for n, p in view.named_parameters()
    }
    parallel.destroy()
    return out.detach(), grads


def _unshard(rank_grads):
    full = {}
    for name in rank_grads[0]:
        pieces = [grads[name][0] for grads in rank_grads]
        dim, partial = rank_grads[0][name][1], rank_grads[0][name][2]
        if dim is not None:
            full[name] = torch.cat(pieces, dim)
        elif partial:
            full[name] = sum(pieces)
        else:
            torch.testing.assert_close(pieces[0], pieces[1])
            full[name] = pieces[0]
    return full


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_lora_under_tp2_reproduces_tp1(sequence_parallel):
    ref_out, ref_grads = run_distributed(_run, 1, 1, False)[0]
    results = run_distributed(_run, 2, 2, sequence_parallel)
    for out, _ in results:
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    full = _unshard([grads for _, grads in results])
    assert set(full) == set(ref_grads)
    for name, (grad, _, _) in ref_grads.items():
        torch.testing.assert_close(full[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_roles_share_one_frozen_base_and_start_equal_to_it():
    parallel.initialize()
    try:
        model = WanModel(ARCH, ModelParallelOptions(attention_backend="sdpa"))
        base_out = model(*inputs())
        base_params = sum(p.numel() for p in model.parameters())
        generator = add_adapter(model, "generator0", 4, 0.0, TARGETS)
        fake = add_adapter(model, "fake0", 4, 0.0, TARGETS)
        torch.testing.assert_close(generator(*inputs()), base_out)  # B = 0 at the start
        _set_nonzero_b(generator)
        moved = generator(*inputs())
        assert not torch.allclose(moved, base_out)
        torch.testing.assert_close(fake(*inputs()), base_out)  # the other role is unaffected
        torch.testing.assert_close(model(*inputs()), base_out)  # and so is the base model
        # One copy of the base: the roles' parameters are adapters only, all trainable.
        adapters = sum(p.numel() for p in generator.parameters())
        assert adapters < 0.5 * base_params and all(p.requires_grad for p in generator.parameters())
        assert not any(p.requires_grad for n, p in model.named_parameters() if "adapters" not in n)
        assert set(dict(generator.named_parameters())).isdisjoint({"shared"})
        with pytest.raises(ValueError, match="adapter 'fake0' already exists"):
            add_adapter(model, "fake0", 4, 0.0, TARGETS)
    finally:
        parallel.destroy()
