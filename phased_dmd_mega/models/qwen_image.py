"""Qwen-Image MMDiT on megatron-core: the computation of diffusers' ``QwenImageTransformer2DModel``,
with megatron's tensor-parallel layers.

Two token streams, image and text, each with its own adaLN modulation, projections and MLP; one
joint attention over [text, image] per block, with multi-axis RoPE (MSRoPE) and the text padding
masked on the keys. Built from the layers Wan uses too: heads and MLPs split over tensor-parallel
ranks, both streams' tokens over Megatron sequence-parallel and Ulysses ranks. The Hugging Face
names and layouts of its weights are in ``qwen_image_formats``.

Conventions that differ from diffusers' ``QwenImageTransformer2DModel``:

- Latents go in unpacked, [B, 16, H, W] (or [B, 16, 1, H, W]); the 2x2 packing into 64-feature
  tokens (features in (c, ph, pw) order, tokens in (h, w) order) and the unpacking of the output
  happen here, so the model maps latents to a velocity of the same shape.
- ``timestep`` is on the 0..1000 scale (the scheduler's timesteps, 1000 * sigma) as for Wan.
  diffusers' model takes sigma = timestep / 1000 (its pipeline divides) and multiplies by 1000
  again inside ``Timesteps(scale=1000)``; we divide and multiply in the same order, so in fp32
  the embedding is bitwise diffusers'. The sinusoid is always computed from the fp32 timestep
  (diffusers first casts the timestep to the model dtype, e.g. bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from phased_dmd_mega.models.attention import AttentionCore, KeyMask, attention_backend
from phased_dmd_mega.models.embeddings import (
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
    RMSNorm,
    divide,
    init_method,
    layer_setup,
    modulate,
    split_fused_heads,
)
from phased_dmd_mega.models.options import ModelParallelOptions, fp8_autocast
from phased_dmd_mega.models.recompute import run_blocks
from phased_dmd_mega.models.token_sharding import TokenSharding, joint_key_mask
from phased_dmd_mega.parallel.plan import ParallelPlan, apply_parallel_plan
from phased_dmd_mega.parallel.state import tensor_parallel_size

# ----------------------------------------------------------------------------- 1. architecture

# diffusers' QwenTimestepProjEmbeddings: Timesteps(256, flip_sin_to_cos=True, shift 0, scale 1000).
TIMESTEP_CHANNELS = 256
TIMESTEP_SCALE = 1000.0


@dataclass(frozen=True)
class QwenImageDims:
    """Architecture numbers of one Qwen-Image variant."""

    num_heads: int = 24
    head_dim: int = 128
    num_layers: int = 60
    in_channels: int = 16  # latent channels before packing (diffusers' in_channels is 4x this)
    out_channels: int = 16
    text_dim: int = 3584  # diffusers' joint_attention_dim (Qwen2.5-VL-7B hidden size)
    patch_size: int = 2
    axes_dims_rope: Tuple[int, int, int] = (16, 56, 56)  # frame, height, width
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even and sum to head_dim {self.head_dim}")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def token_patch(self) -> Tuple[int, int, int]:
        """The (frames, height, width) latent patch of one token: images pack 2x2 patches."""
        return 1, self.patch_size, self.patch_size

    @property
    def ffn_dim(self) -> int:
        return 4 * self.dim  # diffusers' FeedForward default (mult 4): not configurable there

    @property
    def freq_dim(self) -> int:
        return TIMESTEP_CHANNELS

    @property
    def packed_channels(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def out_features(self) -> int:
        return self.out_channels * self.patch_size**2


QWEN_IMAGE_PRESETS: Dict[str, QwenImageDims] = {
    "qwen-image": QwenImageDims(),
    # For tests and the CPU demo.
    "tiny": QwenImageDims(num_heads=4, head_dim=16, num_layers=2, text_dim=24, axes_dims_rope=(4, 6, 6)),
}


# ----------------------------------------------------------------------------- 2. latent packing


def pack_latents(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> tokens [L, B, C*p*p]: tokens in (h, w) order, features in (c, ph, pw)
    order (diffusers' pipeline ``_pack_latents``, token-first)."""
    b, c, height, width = latents.shape
    x = latents.reshape(b, c, height // patch, patch, width // patch, patch)
    return x.permute(2, 4, 0, 1, 3, 5).reshape((height // patch) * (width // patch), b, c * patch * patch)


def unpack_latents(tokens: torch.Tensor, grid: Tuple[int, int], patch: int) -> torch.Tensor:
    """Inverse of ``pack_latents``: [L, B, C*p*p] -> [B, C, H, W]."""
    h, w = grid
    batch = tokens.shape[1]
    x = tokens.reshape(h, w, batch, -1, patch, patch)
    return x.permute(2, 3, 0, 4, 1, 5).reshape(batch, -1, h * patch, w * patch)


# ----------------------------------------------------------------------------- 3. attention


class QwenStreamProjections(nn.Module):
    """One stream's side of the joint attention: fused per-head QKV (column-parallel), per-head
    RMSNorm on q and k, and the output projection (row-parallel)."""

    def __init__(self, dims: QwenImageDims, par: ModelParallelOptions, spec: LinearSpec, config):
        super().__init__()
        self.num_local_heads = divide(dims.num_heads, tensor_parallel_size(), "Qwen-Image heads vs tensor_parallel")
        self.head_dim = dims.head_dim
        init = init_method(par)
        self.linear_qkv = spec.column_parallel(dims.dim, 3 * dims.dim, config, init)
        self.q_norm = RMSNorm(dims.head_dim, dims.eps, par.dtype)
        self.k_norm = RMSNorm(dims.head_dim, dims.eps, par.dtype)
        self.linear_proj = spec.row_parallel(dims.dim, dims.dim, config, init)

    def qkv(self, x: torch.Tensor, rope_angles: torch.Tensor):
        """x [S, B, D] -> q, k, v [S', B, local heads, head_dim] (S' = S gathered over the TP
        group under sequence parallelism), q and k normed and rotated."""
        fused, _ = self.linear_qkv(x)
        q, k, v = split_fused_heads(fused, self.num_local_heads, 3, self.head_dim)
        q = apply_rope_interleaved(self.q_norm(q), rope_angles)
        k = apply_rope_interleaved(self.k_norm(k), rope_angles)
        return q, k, v

    def project(self, attended: torch.Tensor) -> torch.Tensor:
        out, _ = self.linear_proj(attended.flatten(2))
        return out


class QwenJointAttention(nn.Module):
    """Attention over the concatenated [text, image] tokens, each stream with its own weights.

    Under Ulysses each rank concatenates its text shard and its image shard and the all-to-all
    exchanges that joint sequence as one: afterwards every rank holds all text and image tokens
    for its heads, ordered rank by rank (see ``token_sharding.joint_key_mask``, which builds the key
    mask in the same order; RoPE was applied per token before, so the order is harmless)."""

    def __init__(self, dims: QwenImageDims, par: ModelParallelOptions, spec: LinearSpec, config):
        super().__init__()
        self.img = QwenStreamProjections(dims, par, spec, config)
        self.txt = QwenStreamProjections(dims, par, spec, config)
        self.core = AttentionCore(attention_backend(par), self.img.num_local_heads, dims.head_dim, ulysses=True)

    def forward(self, img, txt, img_angles, txt_angles, key_mask):
        img_q, img_k, img_v = self.img.qkv(img, img_angles)
        txt_q, txt_k, txt_v = self.txt.qkv(txt, txt_angles)
        out = self.core(torch.cat([txt_q, img_q]), torch.cat([txt_k, img_k]), torch.cat([txt_v, img_v]), key_mask)
        txt_out, img_out = out.split([txt_q.shape[0], img_q.shape[0]])
        return self.img.project(img_out), self.txt.project(txt_out)


# ----------------------------------------------------------------------------- 4. transformer block


def _gated_residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (x.float() + update.float() * gate).type_as(x)


class QwenImageBlock(nn.Module):
    """Dual-stream block: both streams are modulated by the time embedding, attend jointly, and
    go through their own MLP."""

    def __init__(self, dims: QwenImageDims, par: ModelParallelOptions, spec: LinearSpec, config):
        super().__init__()
        dim = dims.dim
        # SiLU -> Linear(dim, 6*dim): [shift1, scale1, gate1, shift2, scale2, gate2].
        self.img_mod = nn.Linear(dim, 6 * dim, dtype=par.dtype)
        self.txt_mod = nn.Linear(dim, 6 * dim, dtype=par.dtype)
        # diffusers' img/txt_norm1/2 are the same parameter-free LayerNorm.
        self.norm = FP32LayerNorm(dim, dims.eps, elementwise_affine=False)
        self.attention = QwenJointAttention(dims, par, spec, config)
        self.img_mlp = ParallelMLP(dim, dims.ffn_dim, par, spec, config)
        self.txt_mlp = ParallelMLP(dim, dims.ffn_dim, par, spec, config)

    def _norm_modulate(self, x, shift, scale):
        return modulate(self.norm(x), shift, scale).type_as(x)

    def forward(self, img, txt, temb, img_angles, txt_angles, key_mask):
        """img [S_img, B, D] and txt [S_txt, B, D] (this rank's tokens); temb [B, D]."""
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = (
            self.img_mod(F.silu(temb)).float().chunk(6, dim=-1)
        )
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = (
            self.txt_mod(F.silu(temb)).float().chunk(6, dim=-1)
        )
        img_attn, txt_attn = self.attention(
            self._norm_modulate(img, img_shift1, img_scale1),
            self._norm_modulate(txt, txt_shift1, txt_scale1),
            img_angles,
            txt_angles,
            key_mask,
        )
        img = _gated_residual(img, img_attn, img_gate1)
        txt = _gated_residual(txt, txt_attn, txt_gate1)
        img = _gated_residual(img, self.img_mlp(self._norm_modulate(img, img_shift2, img_scale2)), img_gate2)
        txt = _gated_residual(txt, self.txt_mlp(self._norm_modulate(txt, txt_shift2, txt_scale2)), txt_gate2)
        return img, txt


# ----------------------------------------------------------------------------- 5. the model

# The replicated parameters whose gradients are partial sums over the TP group (parallel.plan).
QWEN_IMAGE_PARALLEL_PLAN = ParallelPlan(
    # Under sequence parallelism each rank embeds, modulates and projects out its own tokens of
    # both streams only.
    token_sharded=(
        "img_in",
        "txt_norm",
        "txt_in",
        "time_embedding",
        "blocks.*.img_mod",
        "blocks.*.txt_mod",
        "head_modulation",
        "head",
    ),
    # One [head_dim] q/k norm weight shared by all heads, of which each TP rank has its own:
    # megatron's qk_layernorm case, with or without sequence parallelism.
    head_sharded=(
        "blocks.*.attention.img.q_norm",
        "blocks.*.attention.img.k_norm",
        "blocks.*.attention.txt.q_norm",
        "blocks.*.attention.txt.k_norm",
    ),
)


class QwenImageModel(nn.Module):
    """The Qwen-Image DiT for the current parallel state (call ``parallel.initialize`` first)."""

    def __init__(self, dims: QwenImageDims, par: ModelParallelOptions = ModelParallelOptions()):
        super().__init__()
        spec, config = layer_setup(par)
        self.dims, self.par = dims, par
        dtype = par.dtype
        self.sequence_parallel = config.sequence_parallel

        self.img_in = nn.Linear(dims.packed_channels, dims.dim, dtype=dtype)
        self.txt_norm = RMSNorm(dims.text_dim, dims.eps, dtype)
        self.txt_in = nn.Linear(dims.text_dim, dims.dim, dtype=dtype)
        self.time_embedding = TimestepEmbedding(dims.freq_dim, dims.dim, dtype)
        self.blocks = nn.ModuleList(QwenImageBlock(dims, par, spec, config) for _ in range(dims.num_layers))
        # diffusers' norm_out (AdaLayerNormContinuous: SiLU -> Linear, chunks (scale, shift)).
        self.head_norm = FP32LayerNorm(dims.dim, dims.eps, elementwise_affine=False)
        self.head_modulation = nn.Linear(dims.dim, 2 * dims.dim, dtype=dtype)
        self.head = nn.Linear(dims.dim, dims.out_features, dtype=dtype)
        apply_parallel_plan(self, QWEN_IMAGE_PARALLEL_PLAN, self.sequence_parallel)

    @property
    def token_patch(self) -> Tuple[int, int, int]:
        """The (frames, height, width) latent patch of one token (token_sharding.latent_tokens)."""
        return self.dims.token_patch

    # ------------------------------------------------------------------ pieces of the forward

    def token_sharding(self, num_tokens: int) -> TokenSharding:
        """How this rank's share of one stream's ``num_tokens`` tokens is padded and split (the
        losses take the image stream's split: distill.loss_shard)."""
        return TokenSharding.current(num_tokens, self.sequence_parallel, self.par.token_multiple)

    def grid(self, latents_shape) -> Tuple[int, int]:
        """Packed token grid (h, w) of [B, C, H, W] latents."""
        _, _, height, width = latents_shape
        p = self.dims.patch_size
        for size, name in ((height, "height"), (width, "width")):
            if size % p:
                raise ValueError(f"latent {name} {size} is not divisible by the patch size {p}")
        return height // p, width // p

    def rope_angles(self, grid, img_sharding: TokenSharding, txt_sharding: TokenSharding, device):
        """MSRoPE angles for this Ulysses shard of each stream (diffusers' QwenEmbedRope with
        scale_rope): image tokens at frame 0 and centred rows/columns -(h - h//2) .. h//2 - 1;
        text token i at max(h//2, w//2) + i on all three axes. Padding angles are unused."""
        h, w = grid
        img_positions = grid_positions(img_sharding.ulysses_index(device), (1, h, w))
        img_positions = img_positions - torch.tensor([0, h - h // 2, w - w // 2], device=device)
        txt_positions = (max(h // 2, w // 2) + txt_sharding.ulysses_index(device))[:, None].expand(-1, 3)
        axes, theta = self.dims.axes_dims_rope, self.dims.rope_theta
        return rope_frequencies(img_positions, axes, theta), rope_frequencies(txt_positions, axes, theta)

    def embed_time(self, timestep: torch.Tensor, dtype) -> torch.Tensor:
        """timestep [B] on the 0..1000 scale -> temb [B, D] (module docstring: the convention)."""
        sigma = timestep.float() / TIMESTEP_SCALE
        sinusoid = sinusoidal_embedding(sigma, self.dims.freq_dim, scale=TIMESTEP_SCALE)
        return self.time_embedding(sinusoid).to(dtype)

    def embed_image(self, packed: torch.Tensor) -> torch.Tensor:
        return self.img_in(packed.to(self.img_in.weight.dtype))

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        return self.txt_in(self.txt_norm(context.to(self.txt_in.weight.dtype)))

    @staticmethod
    def check_inputs(latents, timestep, context, context_mask) -> None:
        batch = latents.shape[0]
        if latents.dim() not in (4, 5) or (latents.dim() == 5 and latents.shape[2] != 1):
            raise ValueError(f"Qwen-Image takes latents [B, C, H, W] or [B, C, 1, H, W], got {tuple(latents.shape)}")
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be [B] = [{batch}] (one per sample), got {tuple(timestep.shape)}")
        if context.dim() != 3 or context.shape[0] != batch:
            raise ValueError(f"context must be [B, L, text_dim] with B = {batch}, got {tuple(context.shape)}")
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(
                f"context_mask must be [B, L] = {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}"
            )

    # ------------------------------------------------------------------ forward

    def forward_tokens(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb: torch.Tensor,
        context_mask: Optional[torch.Tensor],
        grid: Tuple[int, int],
        img_sharding: TokenSharding,
        txt_sharding: TokenSharding,
    ) -> torch.Tensor:
        """The blocks and the head on this rank's embedded tokens, img [S_img_local, B, D] and
        txt [S_txt_local, B, D] (sliced by the two shardings); ``context_mask`` [B, L_text]
        (True = real token, None = all real) is the full mask. Returns this rank's image output
        tokens [S_img_local, B, out_channels * patch**2] (packed features)."""
        img_angles, txt_angles = self.rope_angles(grid, img_sharding, txt_sharding, img.device)
        # Text first, as in diffusers' joint sequence (and in QwenJointAttention).
        batch = img.shape[1]
        key_mask = KeyMask.of(
            joint_key_mask([(txt_sharding, context_mask), (img_sharding, None)], batch, img.device), batch
        )
        par = self.par
        with fp8_autocast(par.fp8_recipe):
            img, _ = run_blocks(
                self.blocks,
                (img, txt),
                temb,
                img_angles,
                txt_angles,
                key_mask,
                recompute=par.recompute,
                recompute_num_blocks=par.recompute_num_blocks,
                fp8=par.fp8_recipe is not None,
            )
        scale, shift = self.head_modulation(F.silu(temb)).float().chunk(2, dim=-1)
        return self.head(modulate(self.head_norm(img), shift, scale).type_as(img))

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Full latents [B, C, H, W] or [B, C, 1, H, W], timestep [B] on the 0..1000 scale,
        context [B, L, text_dim] and context_mask [B, L] (bool or 0/1, 1 = real token; None =
        all real), identical on every rank -> full velocity of the latents' shape on every rank.

        Backward, as for Wan: tensor-parallel weight shards get their exact gradients;
        replicated parameters tagged ``sequence_parallel`` hold partial sums over the TP group
        (the trainer adds them up), and under Ulysses every parameter's gradient is a partial
        sum over the Ulysses ranks (added by the data-parallel reduction)."""
        self.check_inputs(latents, timestep, context, context_mask)
        with_frame_axis = latents.dim() == 5
        if with_frame_axis:
            latents = latents[:, :, 0]
        grid = self.grid(latents.shape)
        packed = pack_latents(latents, self.dims.patch_size)
        img_sharding = self.token_sharding(packed.shape[0])
        txt_sharding = self.token_sharding(context.shape[1])
        dtype = self.img_in.weight.dtype
        # Per-token embeddings: slice first, embed only this rank's tokens.
        img = self.embed_image(img_sharding.local_slice(packed))
        txt = self.embed_text(txt_sharding.local_slice(context.transpose(0, 1)))
        temb = self.embed_time(timestep, dtype)
        if context_mask is not None:
            context_mask = context_mask.to(device=context.device, dtype=torch.bool)
        out = self.forward_tokens(img, txt, temb, context_mask, grid, img_sharding, txt_sharding)
        velocity = unpack_latents(img_sharding.gather(out), grid, self.dims.patch_size)
        return velocity.unsqueeze(2) if with_frame_axis else velocity
