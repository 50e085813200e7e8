"""The models' parallel plans tag exactly the replicated parameters that need a sum over the
tensor-parallel group.

Which parameters those are is found here without the plans: a replicated parameter needs the sum
when its gradient is a partial one, i.e. when the two TP ranks, given the same samples and the
same loss of the full output, end the backward with different gradients for it (each saw only
its own tokens, or its own heads). Every other replicated gradient is the same on both ranks.
"""

from dataclasses import replace

import pytest
import torch
from torch import nn

from phased_dmd_mega.parallel.plan import ParallelPlan, apply_parallel_plan
from phased_dmd_mega.testing import run_distributed


def _cases():
    """name -> (build(options), inputs, keyword inputs); the same on every rank."""
    from phased_dmd_mega.models import QWEN_IMAGE_PRESETS, WAN_PRESETS, QwenImageModel, WanModel

    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    wan, qwen = WAN_PRESETS["tiny"], QWEN_IMAGE_PRESETS["tiny"]
    i2v = replace(wan, image_dim=32, in_channels=36)
    timestep = torch.tensor([300.0, 700.0])
    # 3 x 2 x 3 = 18 video tokens and 12 image tokens, 5 text tokens: padded shards under TP 2.
    text_mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    return {
        "wan": (lambda par: WanModel(wan, par), (randn(2, 16, 3, 4, 6), timestep, randn(2, 5, 32)), {}),
        "wan_i2v": (
            lambda par: WanModel(i2v, par),
            (randn(2, 36, 3, 4, 6), timestep, randn(2, 5, 32)),
            {"encoder_hidden_states_image": randn(2, 7, 32)},
        ),
        "qwen_image": (
            lambda par: QwenImageModel(qwen, par),
            (randn(2, 16, 6, 8), timestep, randn(2, 5, 24)),
            {"context_mask": text_mask},
        ),
    }


def _replicated_gradients_and_tags():
    """On each TP rank: {(model, sequence_parallel): ({name: grad}, {names tagged})} over the
    replicated parameters that get a gradient (not None)."""
    from phased_dmd_mega import parallel
    from phased_dmd_mega.models import ModelParallelOptions

    parallel.initialize(tensor_parallel=2)
    found = {}
    for sequence_parallel in (False, True):
        for name, (build, args, kwargs) in _cases().items():
            model = build(ModelParallelOptions(sequence_parallel=sequence_parallel, attention_backend="sdpa"))
            model(*args, **kwargs).square().sum().backward()
            replicated = {
                n: p
                for n, p in model.named_parameters()
                if not getattr(p, "tensor_model_parallel", False) and p.grad is not None
            }
            found[name, sequence_parallel] = (
                {n: p.grad for n, p in replicated.items()},
                {n for n, p in replicated.items() if getattr(p, "sequence_parallel", False)},
            )
    parallel.destroy()
    return found


@pytest.mark.slow
def test_the_plans_tag_exactly_the_parameters_with_partial_gradients():
    rank0, rank1 = run_distributed(_replicated_gradients_and_tags, 2)
    for case, (grads, tagged) in rank0.items():
        other_grads, other_tagged = rank1[case]
        assert tagged == other_tagged, case
        # A gradient that is zero on both ranks carries nothing to sum (Qwen-Image's last block:
        # its text queries feed only text outputs, which the model does not return).
        unused = {name for name, grad in grads.items() if not (grad.any() or other_grads[name].any())}
        tagged -= unused
        partial = {name for name, grad in grads.items() if not torch.equal(grad, other_grads[name])}
        if case[1] or case[0] == "qwen_image":  # tokens or heads split: the criterion finds some
            assert partial, case
        assert sorted(tagged - partial) == [], f"{case}: tagged, but the same on both ranks"
        assert sorted(partial - tagged) == [], f"{case}: partial sums, but not tagged"


def test_a_plan_entry_that_names_nothing_is_refused():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"\['1'\] name nothing"):
        apply_parallel_plan(model, ParallelPlan(token_sharded=("0", "1")), sequence_parallel=True)
