"""Wan 2.1 / 2.2 DiT on megatron-core: the computation of diffusers' ``WanTransformer3DModel``
(and of Wan-Video's original ``WanModel``), with megatron's tensor-parallel layers.

One block: adaLN-modulated self-attention with 3D RoPE, un-modulated cross-attention to the text
(plus the image branch of Wan2.1 I2V), adaLN-modulated GELU(tanh) MLP. Heads and the MLP are
split over tensor-parallel ranks; tokens over Megatron sequence-parallel and Ulysses ranks. The
Hugging Face names and layouts of its weights are in ``wan_formats``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from phased_dmd_mega.models.attention import AttentionCore, KeyMask, attention_backend
from phased_dmd_mega.models.embeddings import (
    PatchEmbedding,
    TimestepEmbedding,
    apply_rope_interleaved,
    grid_positions,
    rope_frequencies,
    sinusoidal_embedding,
)
from phased_dmd_mega.models.layers import (
    FP32LayerNorm,
    LinearSpec,
    ParallelMLP,
    RMSNormAcrossHeads,
    divide,
    gelu_tanh,
    init_method,
    layer_setup,
    model_parallel_config,
    modulate,
    split_fused_heads,
)
from phased_dmd_mega.models.options import ModelParallelOptions, fp8_autocast, without_fp8
from phased_dmd_mega.models.recompute import run_blocks
from phased_dmd_mega.models.token_sharding import TokenSharding, latent_tokens
from phased_dmd_mega.parallel.plan import ParallelPlan, apply_parallel_plan
from phased_dmd_mega.parallel.state import tensor_parallel_size

# ----------------------------------------------------------------------------- 1. architecture


@dataclass(frozen=True)
class WanDims:
    """Architecture numbers of one Wan variant."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    image_dim: Optional[int] = None  # Wan2.1 I2V/FLF2V image branch (CLIP features, 1280)
    pos_embed_seq_len: Optional[int] = None  # FLF2V: learned positions of the image tokens
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def token_patch(self) -> Tuple[int, int, int]:
        """The (frames, height, width) latent patch of one token."""
        return tuple(self.patch_size)

    @property
    def rope_axis_dims(self) -> Tuple[int, int, int]:
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))


_14B = WanDims()
WAN_PRESETS: Dict[str, WanDims] = {
    "wan2.1-t2v-1.3b": WanDims(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": _14B,
    "wan2.1-i2v-14b": replace(_14B, in_channels=36, image_dim=1280),
    "wan2.2-t2v-a14b": _14B,
    "wan2.2-i2v-a14b": replace(_14B, in_channels=36),
    "wan2.2-ti2v-5b": WanDims(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_channels=48, out_channels=48),
    # For tests and the CPU demo.
    "tiny": WanDims(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32),
}


# ----------------------------------------------------------------------------- 2. embeddings


class WanImageEmbedding(nn.Module):
    def __init__(self, dims: WanDims, dtype):
        super().__init__()
        self.norm1 = FP32LayerNorm(dims.image_dim, dtype=dtype)
        self.linear_1 = nn.Linear(dims.image_dim, dims.image_dim, dtype=dtype)
        self.linear_2 = nn.Linear(dims.image_dim, dims.dim, dtype=dtype)
        self.norm2 = FP32LayerNorm(dims.dim, dtype=dtype)
        self.pos_embed = None
        if dims.pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, dims.pos_embed_seq_len, dims.image_dim, dtype=dtype))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:  # FLF2V: first and last frame features side by side
            image = image.reshape(-1, 2 * image.shape[1], image.shape[2]) + self.pos_embed
        return self.norm2(self.linear_2(F.gelu(self.linear_1(self.norm1(image)))))


# ----------------------------------------------------------------------------- 3. attention


class WanSelfAttention(nn.Module):
    def __init__(self, dims: WanDims, par: ModelParallelOptions, spec: LinearSpec, config):
        super().__init__()
        self.num_local_heads = divide(dims.num_heads, tensor_parallel_size(), "Wan heads vs tensor_parallel")
        self.head_dim = dims.head_dim
        init = init_method(par)
        self.linear_qkv = spec.column_parallel(dims.dim, 3 * dims.dim, config, init)
        self.q_norm = RMSNormAcrossHeads(dims.dim, dims.eps, par.dtype)
        self.k_norm = RMSNormAcrossHeads(dims.dim, dims.eps, par.dtype)
        self.core = AttentionCore(attention_backend(par), self.num_local_heads, self.head_dim, ulysses=True)
        self.linear_proj = spec.row_parallel(dims.dim, dims.dim, config, init)

    def forward(self, x, rope_angles, key_mask):
        qkv, _ = self.linear_qkv(x)
        q, k, v = split_fused_heads(qkv, self.num_local_heads, 3, self.head_dim)
        q = self.q_norm(q.flatten(2)).unflatten(-1, (self.num_local_heads, self.head_dim))
        k = self.k_norm(k.flatten(2)).unflatten(-1, (self.num_local_heads, self.head_dim))
        q = apply_rope_interleaved(q, rope_angles)
        k = apply_rope_interleaved(k, rope_angles)
        out = self.core(q, k, v, key_mask)
        out, _ = self.linear_proj(out.flatten(2))
        return out


class WanCrossAttention(nn.Module):
    def __init__(self, dims: WanDims, par: ModelParallelOptions, spec: LinearSpec, config, context_config):
        super().__init__()
        self.num_local_heads = divide(dims.num_heads, tensor_parallel_size(), "Wan heads vs tensor_parallel")
        self.head_dim = dims.head_dim
        init = init_method(par)
        self.fp8_recipe = par.fp8_recipe
        self.linear_q = spec.column_parallel(dims.dim, dims.dim, config, init)
        # The text is short and whole on every rank: no sequence-parallel gather for it.
        self.linear_kv = spec.column_parallel(dims.dim, 2 * dims.dim, context_config, init)
        self.q_norm = RMSNormAcrossHeads(dims.dim, dims.eps, par.dtype)
        self.k_norm = RMSNormAcrossHeads(dims.dim, dims.eps, par.dtype)
        self.has_image = dims.image_dim is not None
        if self.has_image:
            self.linear_kv_img = spec.column_parallel(dims.dim, 2 * dims.dim, context_config, init)
            self.k_img_norm = RMSNormAcrossHeads(dims.dim, dims.eps, par.dtype)
        self.core = AttentionCore(
            attention_backend(par), self.num_local_heads, self.head_dim, ulysses=False, cross=True
        )
        self.linear_proj = spec.row_parallel(dims.dim, dims.dim, config, init)

    def _keys_values(self, linear, norm, context):
        # Context lengths (257 CLIP tokens) need not suit FP8 GEMMs, and their share of the
        # compute is small: their keys and values stay in high precision.
        with without_fp8(self.fp8_recipe):
            kv, _ = linear(context)
        k, v = split_fused_heads(kv, self.num_local_heads, 2, self.head_dim)
        k = norm(k.flatten(2)).unflatten(-1, (self.num_local_heads, self.head_dim))
        return k, v

    def forward(self, x, context, image_context):
        q, _ = self.linear_q(x)
        q = self.q_norm(q).unflatten(-1, (self.num_local_heads, self.head_dim))
        k, v = self._keys_values(self.linear_kv, self.k_norm, context)
        out = self.core(q, k, v)
        if self.has_image and image_context is not None:
            k_img, v_img = self._keys_values(self.linear_kv_img, self.k_img_norm, image_context)
            out = out + self.core(q, k_img, v_img)
        out, _ = self.linear_proj(out.flatten(2))
        return out


# ----------------------------------------------------------------------------- 4. transformer block


class WanBlock(nn.Module):
    def __init__(self, dims: WanDims, par: ModelParallelOptions, spec, config, context_config):
        super().__init__()
        self.norm1 = FP32LayerNorm(dims.dim, dims.eps, elementwise_affine=False)
        self.self_attention = WanSelfAttention(dims, par, spec, config)
        self.cross_attention_norm = (
            FP32LayerNorm(dims.dim, dims.eps, elementwise_affine=True, dtype=par.dtype)
            if dims.cross_attn_norm
            else nn.Identity()
        )
        self.cross_attention = WanCrossAttention(dims, par, spec, config, context_config)
        self.norm2 = FP32LayerNorm(dims.dim, dims.eps, elementwise_affine=False)
        self.mlp = ParallelMLP(dims.dim, dims.ffn_dim, par, spec, config)
        self.modulation = nn.Parameter(torch.randn(1, 6, dims.dim, dtype=par.dtype) / dims.dim**0.5)

    def forward(self, x, e0, context, image_context, rope_angles, key_mask):
        """x [S, B, D]; e0 [B, 6, D] or per token [S, B, 6, D]."""
        e = (self.modulation.float() + e0.float()).unbind(-2)
        shift, scale, gate, c_shift, c_scale, c_gate = e
        h = modulate(self.norm1(x), shift, scale).type_as(x)
        x = (x.float() + self.self_attention(h, rope_angles, key_mask).float() * gate).type_as(x)
        x = x + self.cross_attention(self.cross_attention_norm(x), context, image_context)
        h = modulate(self.norm2(x), c_shift, c_scale).type_as(x)
        return (x.float() + self.mlp(h).float() * c_gate).type_as(x)


# ----------------------------------------------------------------------------- 5. the model

# The replicated parameters whose gradients are partial sums over the TP group (parallel.plan):
# under sequence parallelism each rank embeds, modulates and projects out its own tokens only.
WAN_PARALLEL_PLAN = ParallelPlan(
    token_sharded=(
        "patch_embedding",
        "time_embedding",
        "time_projection",
        "blocks.*.cross_attention_norm",
        "blocks.*.modulation",
        "head_modulation",
        "head",
    ),
)


class WanModel(nn.Module):
    """The Wan DiT for the current parallel state (call ``parallel.initialize`` first)."""

    def __init__(self, dims: WanDims, par: ModelParallelOptions = ModelParallelOptions()):
        super().__init__()
        spec, config = layer_setup(par)
        self.dims, self.par = dims, par
        dtype = par.dtype
        context_config = model_parallel_config(False, dtype, par.initialize)
        self.sequence_parallel = config.sequence_parallel

        self.patch_embedding = PatchEmbedding(dims.in_channels, dims.dim, dims.patch_size, dims.patch_size, dtype=dtype)
        self.time_embedding = TimestepEmbedding(dims.freq_dim, dims.dim, dtype)
        self.time_projection = nn.Linear(dims.dim, 6 * dims.dim, dtype=dtype)
        self.text_embedding = nn.ModuleDict(
            {
                "linear_1": nn.Linear(dims.text_dim, dims.dim, dtype=dtype),
                "linear_2": nn.Linear(dims.dim, dims.dim, dtype=dtype),
            }
        )
        self.image_embedding = WanImageEmbedding(dims, dtype) if dims.image_dim is not None else None
        self.blocks = nn.ModuleList(WanBlock(dims, par, spec, config, context_config) for _ in range(dims.num_layers))
        self.head_norm = FP32LayerNorm(dims.dim, dims.eps, elementwise_affine=False)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, dims.dim, dtype=dtype) / dims.dim**0.5)
        self.head = nn.Linear(dims.dim, dims.out_channels * self.patch_volume, dtype=dtype)
        apply_parallel_plan(self, WAN_PARALLEL_PLAN, self.sequence_parallel)

    @property
    def token_patch(self) -> Tuple[int, int, int]:
        """The (frames, height, width) latent patch of one token (latent_tokens)."""
        return self.dims.token_patch

    @property
    def patch_volume(self) -> int:
        p = self.dims.patch_size
        return p[0] * p[1] * p[2]

    # ------------------------------------------------------------------ pieces of the forward

    def grid(self, latents_shape) -> Tuple[int, int, int]:
        _, _, frames, height, width = latents_shape
        p = self.dims.patch_size
        for size, patch, name in ((frames, p[0], "frames"), (height, p[1], "height"), (width, p[2], "width")):
            if size % patch:
                raise ValueError(f"latent {name} {size} is not divisible by the patch size {patch}")
        return frames // p[0], height // p[1], width // p[2]

    def rope_angles(self, grid, sharding: TokenSharding, device) -> torch.Tensor:
        """Angles for this Ulysses shard's tokens (its true positions; padding gets position 0)."""
        positions = grid_positions(sharding.ulysses_index(device), grid)
        return rope_frequencies(positions, self.dims.rope_axis_dims, self.dims.rope_theta)

    def embed_time(self, timestep: torch.Tensor, dtype):
        """timestep [B] or per token [S, B] on the 0..1000 scale -> (e, e0)."""
        sinusoid = sinusoidal_embedding(timestep, self.dims.freq_dim)
        e = self.time_embedding(sinusoid)
        e0 = self.time_projection(F.silu(e)).unflatten(-1, (6, self.dims.dim))
        return e.to(dtype), e0

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        text = self.text_embedding
        return text["linear_2"](gelu_tanh(text["linear_1"](context)))

    def token_sharding(self, num_tokens: int) -> TokenSharding:
        """How this rank's share of ``num_tokens`` video tokens is padded and split (the losses
        take the same split: distill.loss_shard)."""
        return TokenSharding.current(num_tokens, self.sequence_parallel, self.par.token_multiple)

    def embed_patches(self, latents: torch.Tensor, sharding: TokenSharding) -> torch.Tensor:
        """This rank's tokens [S_local, B, D] of [B, C, F, H, W] latents. The patch embedding is a
        convolution whose stride is its kernel, i.e. one linear map per patch: applied to this
        rank's patches only, no rank holds the whole sequence at model width."""
        return self.patch_embedding(sharding.local_slice(latent_tokens(latents, self.token_patch).transpose(0, 1)))

    def unpatchify(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        """[L, B, out * prod(patch)] (channel fastest) -> [B, out, F, H, W]."""
        f, h, w = grid
        pt, ph, pw = self.dims.patch_size
        x = tokens.permute(1, 0, 2).reshape(tokens.shape[1], f, h, w, pt, ph, pw, self.dims.out_channels)
        out = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(tokens.shape[1], self.dims.out_channels, f * pt, h * ph, w * pw)

    # ------------------------------------------------------------------ forward

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        e: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        image_context: Optional[torch.Tensor],
        grid: Tuple[int, int, int],
        sharding: TokenSharding,
    ) -> torch.Tensor:
        """The blocks and the head on this rank's tokens [S_local, B, D]; returns this rank's
        output tokens [S_local, B, out * prod(patch)]. ``e``/``e0`` are [B, D] / [B, 6, D], or
        per token [S_local, B, D] / [S_local, B, 6, D] already sharded like the tokens."""
        angles = self.rope_angles(grid, sharding, tokens.device)
        key_mask = KeyMask.of(sharding.key_padding_mask(tokens.device), tokens.shape[1])
        par = self.par
        with fp8_autocast(par.fp8_recipe):
            tokens = run_blocks(
                self.blocks,
                tokens,
                e0,
                context,
                image_context,
                angles,
                key_mask,
                recompute=par.recompute,
                recompute_num_blocks=par.recompute_num_blocks,
                fp8=par.fp8_recipe is not None,
            )
        shift, scale = (self.head_modulation.float() + e.float().unsqueeze(-2)).unbind(-2)
        return self.head(modulate(self.head_norm(tokens), shift, scale).type_as(tokens))

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Full latents [B, C, F, H, W], timestep [B] (or [B, L] per token) on the 0..1000
        scale, context [B, L_text, text_dim], identical on every rank -> full velocity
        [B, C_out, F, H, W] on every rank.

        Backward: a loss computed from the full output on every rank gives each tensor-parallel
        weight shard its exact gradient. Work done on this rank's tokens only under sequence
        parallelism or Ulysses (the patch and per-token time embeddings, the head) gives
        gradients that are partial sums over the group, added up by the trainer (parameters
        tagged ``sequence_parallel`` over the TP group, all of them over the Ulysses ranks
        through the data-parallel reduction)."""
        grid = self.grid(latents.shape)
        dtype = self.patch_embedding.weight.dtype
        sharding = self.token_sharding(grid[0] * grid[1] * grid[2])
        tokens = self.embed_patches(latents.to(dtype), sharding)
        if timestep.dim() == 2:  # per-token timesteps (TI2V): this rank's tokens' only
            timestep = sharding.local_slice(timestep.transpose(0, 1))
        e, e0 = self.embed_time(timestep, dtype)
        text = self.embed_text(context.to(dtype)).transpose(0, 1)
        image = None
        if self.image_embedding is not None and encoder_hidden_states_image is not None:
            image = self.image_embedding(encoder_hidden_states_image.to(dtype)).transpose(0, 1)
        out = self.forward_tokens(tokens, e, e0, text, image, grid, sharding)
        return self.unpatchify(sharding.gather(out), grid)
