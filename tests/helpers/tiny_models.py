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
