"""Attention backends and layer specs: explicit requests that cannot run here are clear errors,
never silent fallbacks; the GPU paths themselves are tested in test_gpu.py."""

import pytest
import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.models import ModelParallelOptions, WanModel
from phased_dmd_mega.models.attention import AttentionCore, KeyMask, resolve_attention_backend
from phased_dmd_mega.models.layers import linear_spec
from phased_dmd_mega.models.wan import WAN_PRESETS

TINY = WAN_PRESETS["tiny"]
on_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error paths")


@pytest.fixture
def single_process():
    parallel.initialize()
    yield
    parallel.destroy()


@on_cpu
def test_auto_resolves_to_sdpa_without_cuda():
    assert resolve_attention_backend("auto") == "sdpa"
    assert resolve_attention_backend("auto", "transformer_engine") == "sdpa"


@on_cpu
@pytest.mark.parametrize(
    "backend, message",
    [
        ("flash", "attention_backend=flash needs CUDA and the flash_attn package"),
        ("te", "attention_backend=te needs CUDA and transformer_engine"),
    ],
)
def test_explicit_gpu_backend_is_a_clear_error(backend, message):
    with pytest.raises(RuntimeError, match=message):
        resolve_attention_backend(backend)


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="attention_backend 'xformers' is not one of auto, flash, te, sdpa"):
        resolve_attention_backend("xformers")


@on_cpu
def test_transformer_engine_spec_is_a_clear_error_without_te():
    with pytest.raises(RuntimeError, match="transformer_impl=transformer_engine needs CUDA and the transformer_engine"):
        linear_spec("transformer_engine")


@on_cpu
def test_model_with_te_spec_fails_before_building(single_process):
    with pytest.raises(RuntimeError, match="transformer_engine"):
        WanModel(TINY, ModelParallelOptions(transformer_impl="transformer_engine"))


def test_fp8_needs_the_te_spec(single_process):
    with pytest.raises(ValueError, match="fp8_recipe='delayed' needs transformer_impl='transformer_engine'"):
        WanModel(TINY, ModelParallelOptions(fp8_recipe="delayed"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"recompute": "some"}, "recompute 'some' is not one of none, full, blocks"),
        ({"recompute": "blocks"}, "recompute='blocks' needs recompute_num_blocks >= 1"),
    ],
)
def test_recompute_options_are_checked(single_process, options, message):
    with pytest.raises(ValueError, match=message):
        WanModel(TINY, ModelParallelOptions(**options))


def test_heads_not_divisible_by_tp_name_both_numbers():
    from phased_dmd_mega.testing import run_distributed

    with pytest.raises(Exception, match="Wan heads vs tensor_parallel: 3 is not divisible by 2"):
        run_distributed(_three_heads_at_tp2, 2)


def _three_heads_at_tp2():
    from dataclasses import replace

    parallel.initialize(tensor_parallel=2)
    WanModel(replace(TINY, dim=48, num_heads=3), ModelParallelOptions())


def _sdpa_reference(q, k, v, key_mask=None):
    mask = None if key_mask is None else key_mask[None, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3).float(), k.permute(1, 2, 0, 3).float(), v.permute(1, 2, 0, 3).float(), attn_mask=mask
    )
    return out.permute(2, 0, 1, 3)


def test_sdpa_core_masks_padded_keys(single_process):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, 2, 4, 8, generator=gen) for _ in range(3))
    mask = torch.arange(10) < 7
    core = AttentionCore("sdpa", 4, 8, ulysses=False)
    out = core(q, k, v, KeyMask.of(mask, 2))
    torch.testing.assert_close(out, _sdpa_reference(q[:], k[:7], v[:7]))


@pytest.mark.parametrize("model_name", ["wan", "qwen_image"])
def test_split_weights_are_tagged_whether_initialised_or_built_for_loading(single_process, model_name):
    """Gradient norms and optimizers find the tensor-parallel shards by megatron's tags."""
    from phased_dmd_mega.models import QWEN_IMAGE_PRESETS, QwenImageModel

    def tags(initialize):
        options = ModelParallelOptions(initialize=initialize)
        model = WanModel(TINY, options) if model_name == "wan" else QwenImageModel(QWEN_IMAGE_PRESETS["tiny"], options)
        return {
            n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", None))
            for n, p in model.named_parameters()
        }

    loaded = tags(False)
    assert loaded == tags(True)
    assert loaded[
        "blocks.0.mlp.linear_fc2.weight" if model_name == "wan" else next(n for n in loaded if n.endswith("fc2.weight"))
    ] == (True, 1)
