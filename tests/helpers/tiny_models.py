"""Tiny random-model configurations shared by the tests (diffusers constructor arguments)."""

# WanTransformer3DModel: 4 heads of 12 (RoPE axes 4/4/4), 2 layers.
WAN_TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)

# QwenImageTransformer2DModel: 4 heads of 16 (RoPE axes 4/6/6), 2 layers, 24-dim text; the
# "tiny" preset of QwenImageDims.
QWEN_TINY = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),
)


def _is_norm(module) -> bool:
    """A normalisation layer owning its affine parameters (LayerNorm, RMSNorm, GroupNorm, and
    diffusers' FP32LayerNorm / RMSNorm)."""
    return "Norm" in type(module).__name__ and any(True for _ in module.parameters(recurse=False))


def randomize_(model, seed: int = 0, noise: float = 0.1):
    """Every floating parameter of ``model`` drawn afresh from a generator seeded ``seed`` (the
    same values whatever the model's own initialisation drew): a norm's weight 1 + noise * N(0, 1)
    and its bias noise * N(0, 1); a weight of fan-in n (a linear's, a convolution's, a table's)
    N(0, 1 / 3n), the spread of torch's default initialisation; any other vector (biases)
    noise * N(0, 1). diffusers initialises every norm weight to ones (their biases to zeros),
    under which a norm weight taken from the wrong tensor, or the wrong slice of one, goes
    unnoticed. Returns ``model``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            norm = _is_norm(module)
            for name, param in module.named_parameters(recurse=False):
                if not param.is_floating_point():
                    continue
                draw = torch.randn(param.shape, generator=generator)
                if norm:
                    value = (1.0 if name == "weight" else 0.0) + noise * draw
                elif param.dim() >= 2:
                    value = draw * (3 * param.numel() / param.shape[0]) ** -0.5
                else:
                    value = noise * draw
                param.copy_(value.to(param.dtype))
    return model


def save_tiny_wan_vae(folder):
    """A tiny random AutoencoderKLWan for the tiny Wan's 4 latent channels (8x spatial, 4x temporal)."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(3)
    AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.7, 2.0, 1.1],
    ).save_pretrained(folder)
    return folder


def save_tiny_wan22_vae(folder):
    """A tiny random Wan2.2 VAE (AutoencoderKLWan as Wan2.2-TI2V-5B's: 48 latent channels, pixels
    patchified 2x2, 16x spatial and 4x temporal compression), with non-trivial latent statistics."""
    import torch
    from diffusers import AutoencoderKLWan

    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    AutoencoderKLWan(
        base_dim=8,
        z_dim=48,
        in_channels=12,
        out_channels=12,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        is_residual=True,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=(0.2 * torch.randn(48, generator=gen)).tolist(),
        latents_std=(0.5 + torch.rand(48, generator=gen)).tolist(),
    ).save_pretrained(folder)
    return folder


def save_image(path, seed: int, size=(40, 24)):
    """A random RGB picture of another size and aspect than the resolutions (it gets resized)."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path
