"""What the GPU attention and FP8 paths decide, checked where a CPU can see it: the backend for a
dtype, the packing that flash-attn's and TE's variable-length kernels take (against per-sample
attention over each sample's real tokens), the token padding FP8 GEMMs need, the FP8 recipes a
GPU can run, and that no rank materialises the whole token sequence at model width."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from phased_dmd_mega import parallel
from phased_dmd_mega.models import ModelParallelOptions, WanModel
from phased_dmd_mega.models.attention import KeyMask, choose_attention_backend, sdpa_attention
from phased_dmd_mega.models.options import check_fp8_recipe
from phased_dmd_mega.models.token_sharding import TokenSharding
from phased_dmd_mega.models.wan import WAN_PRESETS
from phased_dmd_mega.testing import run_distributed

# ----------------------------------------------------------------------------- backend choice


@pytest.mark.parametrize(
    "dtype, impl, flash, te, expected",
    [
        (torch.bfloat16, "local", True, False, "flash"),
        (torch.float16, "local", True, False, "flash"),
        (torch.float32, "local", True, False, "sdpa"),  # flash-attn refuses float32
        (torch.float32, "transformer_engine", True, True, "sdpa"),
        (torch.bfloat16, "transformer_engine", False, True, "te"),
        (torch.bfloat16, "local", False, True, "sdpa"),  # TE attention comes with the TE spec only
        (torch.bfloat16, "local", False, False, "sdpa"),
    ],
)
def test_auto_picks_a_backend_that_takes_the_dtype(dtype, impl, flash, te, expected):
    assert choose_attention_backend("auto", dtype, impl, flash_available=flash, te_available=te) == expected


def test_flash_asked_for_in_float32_is_a_clear_error():
    with pytest.raises(ValueError, match="attention_backend=flash needs model.dtype bfloat16 or float16 .*float32"):
        choose_attention_backend("flash", torch.float32, "local", flash_available=True, te_available=False)


# ----------------------------------------------------------------------------- packing


def _reference(q, k, v, mask):
    """Each sample's attention over its real tokens alone, scattered back; zeros elsewhere."""
    out = torch.zeros_like(q)
    for b in range(q.shape[1]):
        real = mask[b].nonzero().squeeze(1)
        qb, kb, vb = (t[real, b].transpose(0, 1) for t in (q, k, v))  # [H, S_real, D]
        out[real, b] = F.scaled_dot_product_attention(qb, kb, vb).transpose(0, 1)
    return out


def _masked_qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(12, 3, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    # Holes anywhere (Qwen-Image's text padding sits between text and image tokens), and
    # a different count per sample.
    mask = torch.rand(3, 12, generator=gen) < 0.6
    mask[:, 0] = True
    return q, k, v, mask


def test_packed_variable_length_attention_equals_per_sample_attention():
    q, k, v, mask = _masked_qkv()
    key_mask = KeyMask.of(mask, 3)
    packing = key_mask.packing
    lengths = mask.sum(1)
    assert packing.cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert packing.cu_seqlens.dtype == torch.int32 and packing.max_seqlen == int(lengths.max())
    # What a variable-length kernel computes: attention within each [cu[b], cu[b + 1]) segment.
    packed = [packing.pack(t) for t in (q, k, v)]
    segments = []
    for b in range(3):
        lo, hi = packing.cu_seqlens[b], packing.cu_seqlens[b + 1]
        qs, ks, vs = (t[lo:hi].transpose(0, 1) for t in packed)
        segments.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
    out = packing.unpack(torch.cat(segments), 12, 3)
    torch.testing.assert_close(out, _reference(q, k, v, mask), rtol=1e-12, atol=1e-12)
    # At the real queries the masked SDPA path agrees (its masked queries attend too, unused).
    real = mask.transpose(0, 1)
    torch.testing.assert_close(sdpa_attention(q, k, v, key_mask)[real], out[real], rtol=1e-12, atol=1e-12)


def test_unpack_sends_gradients_to_the_real_tokens_only():
    q, _, _, mask = _masked_qkv(1)
    q.requires_grad_(True)
    packing = KeyMask.of(mask, 3).packing
    packing.unpack(packing.pack(q) * 2, 12, 3).sum().backward()
    torch.testing.assert_close(q.grad, 2.0 * mask.transpose(0, 1)[..., None, None].expand_as(q).double())


def test_a_mask_shared_by_the_batch_packs_every_sample_alike():
    mask = torch.arange(10) < 7  # TokenSharding's padding: real tokens first
    packing = KeyMask.of(mask, 2).packing
    assert packing.cu_seqlens.tolist() == [0, 7, 14] and packing.max_seqlen == 7


# ----------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("recipe, multiple", [(None, 1), ("delayed", 8), ("current", 8), ("mxfp8", 32)])
def test_fp8_pads_each_ranks_tokens_to_what_its_gemms_take(recipe, multiple):
    options = ModelParallelOptions(transformer_impl="transformer_engine", fp8_recipe=recipe)
    assert options.token_multiple == multiple
    # Wan 480p (21 x 30 x 52 = 32,760 tokens) over TP 4 with sequence parallelism x Ulysses 2.
    for ulysses_rank in range(2):
        for tp_rank in range(4):
            sharding = TokenSharding(32760, 2, ulysses_rank, 4, tp_rank, options.token_multiple)
            assert sharding.local_tokens % multiple == 0
            assert sharding.padded_tokens == sharding.local_tokens * 8 >= 32760
    assert TokenSharding(32760, 2, 0, 4, 0, 8).local_tokens == 4096  # 4,095 without FP8


@pytest.mark.parametrize(
    "recipe, capability, message",
    [
        (
            "mxfp8",
            (9, 0),
            r"fp8_recipe=mxfp8 needs compute capability 10.0 or higher; this GPU H100 has 9.0: "
            r"use delayed or current",
        ),
        (
            "delayed",
            (8, 0),
            r"needs compute capability 8.9 or higher; this GPU H100 has 8.0: it has no FP8 tensor cores",
        ),
        ("int4", (9, 0), "fp8_recipe 'int4' is not one of delayed, current, mxfp8"),
    ],
)
def test_fp8_recipes_the_gpu_cannot_run_are_refused(recipe, capability, message):
    with pytest.raises(ValueError, match=message):
        check_fp8_recipe(recipe, capability, "H100")


@pytest.mark.parametrize(
    "recipe, capability", [("delayed", (9, 0)), ("current", (8, 9)), ("mxfp8", (10, 0)), ("mxfp8", None)]
)
def test_fp8_recipes_the_gpu_runs_pass(recipe, capability):
    check_fp8_recipe(recipe, capability)


# ----------------------------------------------------------------------------- token memory


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


ARCH = replace(WAN_PRESETS["tiny"], dim=96, ffn_dim=128, num_heads=4)  # dim unlike any other size here


def _widest_full_sequence_tensor(per_token_timesteps: bool):
    """Shapes a Ulysses rank creates during a forward that hold every token at model width."""
    parallel.initialize(ulysses_parallel=2, seed=0)
    try:
        model = WanModel(ARCH, ModelParallelOptions(attention_backend="sdpa"))
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 16, 3, 8, 6, generator=gen)
        tokens = 3 * 4 * 3
        timestep = torch.rand(1, tokens, generator=gen) * 1000 if per_token_timesteps else torch.tensor([500.0])
        context = torch.randn(1, 8, ARCH.text_dim, generator=gen)
        recorder = _ShapeRecorder()
        with recorder:
            out = model(latents, timestep, context)
        out.sum().backward()
        full = [s for s in recorder.shapes if tokens in s and ARCH.dim in s]
        return full, out.shape
    finally:
        parallel.destroy()


@pytest.mark.slow
@pytest.mark.parametrize("per_token_timesteps", [False, True])
def test_no_ulysses_rank_holds_every_token_at_model_width(per_token_timesteps):
    for full, shape in run_distributed(_widest_full_sequence_tensor, 2, per_token_timesteps):
        assert shape == (1, 16, 3, 8, 6)
        assert full == [], f"full-sequence tensors at model width: {full}"
