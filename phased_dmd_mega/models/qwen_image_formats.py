"""Qwen-Image's Hugging Face layout (diffusers ``QwenImageTransformer2DModel``): weight names, config
and tensor shapes, and ``QWEN_IMAGE``, the adapter through which the checkpoint code handles
Qwen-Image (see ``architecture_types``). There is no other layout: Qwen-Image is released in
diffusers form, as a transformer folder or as a pipeline root with ``transformer/``.

The shapes are written out rather than read off a diffusers model built on the meta device: the
same answer without importing diffusers or building 60 blocks, and the tests check the table
against diffusers' own parameters (tiny and full size).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, Mapping

from phased_dmd_mega.models.architecture_types import (
    FP32_BYTES,
    Architecture,
    BlockActivations,
    CheckpointError,
    Shape,
    add_linear,
    rope_bytes,
)
from phased_dmd_mega.models.layers import divide
from phased_dmd_mega.models.qwen_image import QWEN_IMAGE_PRESETS, QwenImageDims, QwenImageModel
from phased_dmd_mega.models.weights import COLUMN, ROW, linear_rules, tensor_rules

DIFFUSERS_CLASS = "QwenImageTransformer2DModel"
# diffusers config fields that do not change the weights: kept from the source when exporting.
DIFFUSERS_NON_ARCH_FIELDS = ("_diffusers_version",)
# The two attention streams of a block: (q, k, v, out, q norm, k norm) under diffusers' names.
_STREAMS = (
    ("to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k"),
    ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q", "norm_added_k"),
)


def diffusers_weight_rules(dims: QwenImageDims):
    """The adapter between diffusers' ``QwenImageTransformer2DModel`` and ``QwenImageModel``
    names. Per-head q/k norm weights are whole on every rank ([head_dim], shared by the heads)."""
    linear = partial(linear_rules, head_dim=dims.head_dim)
    single = partial(tensor_rules, head_dim=dims.head_dim)

    def stream(own, attn, q, k, v, out, norm_q, norm_k):
        return (
            linear(f"{own}.linear_qkv", (f"{attn}.{q}", f"{attn}.{k}", f"{attn}.{v}"), COLUMN)
            + single(f"{own}.q_norm.weight", f"{attn}.{norm_q}.weight")
            + single(f"{own}.k_norm.weight", f"{attn}.{norm_k}.weight")
            + linear(f"{own}.linear_proj", f"{attn}.{out}", ROW)
        )

    def mlp(own, source):
        fc1 = linear(f"{own}.linear_fc1", f"{source}.net.0.proj", COLUMN)
        return fc1 + linear(f"{own}.linear_fc2", f"{source}.net.2", ROW)

    rules = linear("img_in", "img_in")
    rules += single("txt_norm.weight", "txt_norm.weight")
    rules += linear("txt_in", "txt_in")
    rules += linear("time_embedding.linear_1", "time_text_embed.timestep_embedder.linear_1")
    rules += linear("time_embedding.linear_2", "time_text_embed.timestep_embedder.linear_2")
    for i in range(dims.num_layers):
        own, hf = f"blocks.{i}", f"transformer_blocks.{i}"
        rules += linear(f"{own}.img_mod", f"{hf}.img_mod.1")
        rules += linear(f"{own}.txt_mod", f"{hf}.txt_mod.1")
        rules += stream(f"{own}.attention.img", f"{hf}.attn", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k")
        rules += stream(
            f"{own}.attention.txt",
            f"{hf}.attn",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
            "norm_added_q",
            "norm_added_k",
        )
        rules += mlp(f"{own}.img_mlp", f"{hf}.img_mlp")
        rules += mlp(f"{own}.txt_mlp", f"{hf}.txt_mlp")
    rules += linear("head_modulation", "norm_out.linear")
    rules += linear("head", "proj_out")
    return rules


def diffusers_shapes(dims: QwenImageDims) -> Dict[str, Shape]:
    """The shape of every diffusers ``QwenImageTransformer2DModel`` tensor of ``dims``."""
    d, shapes = dims.dim, {}
    add_linear(shapes, "time_text_embed.timestep_embedder.linear_1", d, dims.freq_dim)
    add_linear(shapes, "time_text_embed.timestep_embedder.linear_2", d, d)
    shapes["txt_norm.weight"] = (dims.text_dim,)
    add_linear(shapes, "img_in", d, dims.packed_channels)
    add_linear(shapes, "txt_in", d, dims.text_dim)
    for i in range(dims.num_layers):
        block = f"transformer_blocks.{i}"
        for stream in ("img", "txt"):
            add_linear(shapes, f"{block}.{stream}_mod.1", 6 * d, d)
            add_linear(shapes, f"{block}.{stream}_mlp.net.0.proj", dims.ffn_dim, d)
            add_linear(shapes, f"{block}.{stream}_mlp.net.2", d, dims.ffn_dim)
        for *projections, norm_q, norm_k in _STREAMS:
            for projection in projections:
                add_linear(shapes, f"{block}.attn.{projection}", d, d)
            shapes[f"{block}.attn.{norm_q}.weight"] = (dims.head_dim,)
            shapes[f"{block}.attn.{norm_k}.weight"] = (dims.head_dim,)
    add_linear(shapes, "norm_out.linear", 2 * d, d)
    add_linear(shapes, "proj_out", dims.out_features, d)
    return shapes


def from_diffusers_config(config: Dict[str, Any]) -> QwenImageDims:
    """From a diffusers ``QwenImageTransformer2DModel`` config.json (plain Qwen-Image:
    the guidance, zero_cond_t, additional-t and layer-3D-RoPE variants are refused)."""
    for flag in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
        if config.get(flag):
            raise ValueError(f"unsupported Qwen-Image variant: {flag}=True")
    patch = config.get("patch_size", 2)
    packed_in = config.get("in_channels", 64)
    return QwenImageDims(
        num_heads=config.get("num_attention_heads", 24),
        head_dim=config.get("attention_head_dim", 128),
        num_layers=config.get("num_layers", 60),
        in_channels=divide(packed_in, patch * patch, "Qwen-Image packed in_channels vs patch area"),
        # diffusers: 16 when absent, in_channels (the packed count, used as is) when null.
        out_channels=config.get("out_channels", 16) or packed_in,
        text_dim=config.get("joint_attention_dim", 3584),
        patch_size=patch,
        axes_dims_rope=tuple(config.get("axes_dims_rope", (16, 56, 56))),
    )


def to_diffusers_config(dims: QwenImageDims) -> Dict[str, Any]:
    """A diffusers ``QwenImageTransformer2DModel`` config.json for ``dims``."""
    return {
        "_class_name": "QwenImageTransformer2DModel",
        "patch_size": dims.patch_size,
        "in_channels": dims.packed_channels,
        "out_channels": dims.out_channels,
        "num_layers": dims.num_layers,
        "attention_head_dim": dims.head_dim,
        "num_attention_heads": dims.num_heads,
        "joint_attention_dim": dims.text_dim,
        "guidance_embeds": False,
        "axes_dims_rope": list(dims.axes_dims_rope),
        "zero_cond_t": False,
        "use_additional_t_cond": False,
        "use_layer3d_rope": False,
    }


def dims_from_diffusers_config(config: Mapping[str, Any], where: str) -> QwenImageDims:
    """QwenImageDims of a diffusers config.json (absent fields take diffusers' defaults, as
    diffusers itself does), refusing the variants QwenImageModel does not implement."""
    try:
        return from_diffusers_config(dict(config))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from err


def summary(dims: QwenImageDims) -> str:
    return (
        f"dim {dims.dim} ({dims.num_heads} heads of {dims.head_dim}), {dims.num_layers} layers, "
        f"text_dim {dims.text_dim}, in/out channels {dims.in_channels}/{dims.out_channels}"
    )


def block_activations(dims, act_bytes: int) -> BlockActivations:
    """Bytes one block keeps for its backward per token of either stream, counted from the
    block's code (``act_bytes``: the model's dtype; norms, modulation and gates are fp32): per
    half-block the norm input, modulated output and gated update (fp32) and the linear input;
    per-head q/k RMSNorm input and output (fp32); the joint q, k, v and output; the MLP hidden
    before and after GELU."""
    h, f, a, fp32 = dims.dim, dims.ffn_dim, act_bytes, FP32_BYTES
    return BlockActivations(
        stream=2 * 3 * fp32 * h + 2 * a * h,
        sharded=4 * fp32 * h + 4 * a * h + 2 * a * f,
        gathered=rope_bytes(dims.head_dim),
        block_input=a * h,
    )


QWEN_IMAGE = Architecture(
    name="qwen_image",
    title="Qwen-Image",
    dims_class=QwenImageDims,
    model_class=QwenImageModel,
    presets=QWEN_IMAGE_PRESETS,
    diffusers_class=DIFFUSERS_CLASS,
    weight_rules=diffusers_weight_rules,
    diffusers_shapes=diffusers_shapes,
    dims_from_diffusers_config=dims_from_diffusers_config,
    dims_to_diffusers_config=to_diffusers_config,
    diffusers_fields=("num_attention_heads", "joint_attention_dim"),
    diffusers_non_dims_fields=DIFFUSERS_NON_ARCH_FIELDS,
    summary=summary,
    vae_class="AutoencoderKLQwenImage",
    text_encoder_class="Qwen2_5_VLForConditionalGeneration",
    block_activations=block_activations,
    prompt_tokens=512,  # QwenImagePipeline's max_sequence_length
    joint_text=True,
    max_frames=1,  # an image model
)
