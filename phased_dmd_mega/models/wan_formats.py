"""Wan's two Hugging Face layouts: original (Wan-Video) and diffusers names, configs and shapes,
and ``WAN``, the adapter through which the checkpoint code handles Wan (see ``architecture_types``).

The weight rule table (``diffusers_weight_rules``) speaks diffusers names. An original Wan folder
is read through the key renames of diffusers' Wan conversion script
(``scripts/convert_wan_to_diffusers.py``: original -> diffusers, applied in order as substring
replacements); writing one needs the inverse, which is checked against the forward renames for
every key so the two can never drift apart.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from phased_dmd_mega.models.architecture_types import (
    FP32_BYTES,
    Architecture,
    BlockActivations,
    CheckpointError,
    ExpertPairs,
    OriginalLayout,
    Shape,
    add_linear,
    keep_fields,
    require_fields,
    rope_bytes,
)
from phased_dmd_mega.models.wan import WAN_PRESETS, WanDims, WanModel
from phased_dmd_mega.models.weights import COLUMN, ROW, linear_rules, tensor_rules
from phased_dmd_mega.vae import wan_vae

__all__ = ["CheckpointError", "Shape", "WAN"]  # the first two are re-exported for existing imports


# ----------------------------------------------------------------------------- key renames

# Applied in this order, before the norm2 <-> norm3 swap.
_EMBEDDING_AND_HEAD_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)

# Applied in this order, after the swap (so the image embedder's norm2 is not swapped). The
# image-branch fragments come before their prefixes (cross_attn.k before cross_attn.k_img
# would turn k_img into to_k_img).
_IMAGE_AND_ATTENTION_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
)

_NORM_2_OR_3 = re.compile(r"\bnorm([23])\b")


def _swap_norm2_norm3(name: str) -> str:
    # The original block's affine cross-attention norm is norm3; diffusers calls it norm2.
    return _NORM_2_OR_3.sub(lambda m: "norm3" if m.group(1) == "2" else "norm2", name)


def _replace_in_order(name: str, renames: Iterable[Tuple[str, str]]) -> str:
    for old, new in renames:
        name = name.replace(old, new)
    return name


def original_to_diffusers_name(name: str) -> str:
    """An original Wan key -> its diffusers key (the conversion script's renames, in order)."""
    name = _replace_in_order(name, _EMBEDDING_AND_HEAD_RENAMES)
    name = _swap_norm2_norm3(name)
    return _replace_in_order(name, _IMAGE_AND_ATTENTION_RENAMES)


def _inverted(renames: Tuple[Tuple[str, str], ...]) -> Tuple[Tuple[str, str], ...]:
    return tuple((new, old) for old, new in reversed(renames))


def _diffusers_to_original_candidate(name: str) -> str:
    # "scale_shift_table" is the one rename that is not one-to-one on fragments: the head's
    # (top level) and the blocks' (block.N.scale_shift_table) come from different names.
    if name == "scale_shift_table":
        return "head.modulation"
    name = _replace_in_order(name, _inverted(_IMAGE_AND_ATTENTION_RENAMES))
    name = _swap_norm2_norm3(name)
    return _replace_in_order(name, _inverted(_EMBEDDING_AND_HEAD_RENAMES))


def original_names(diffusers_names: Iterable[str]) -> Dict[str, str]:
    """{diffusers key: original key}, each checked to rename forward to its diffusers key."""
    mapping: Dict[str, str] = {}
    for name in diffusers_names:
        original = _diffusers_to_original_candidate(name)
        if original_to_diffusers_name(original) != name:
            raise AssertionError(f"no original Wan name renames to {name!r} (tried {original!r})")
        mapping[name] = original
    if len(set(mapping.values())) != len(mapping):
        raise AssertionError("two diffusers keys map to one original Wan key")
    return mapping


# ----------------------------------------------------------------------------- weight names


def diffusers_weight_rules(dims: WanDims):
    """The adapter between diffusers' ``WanTransformer3DModel`` and ``WanModel`` names."""
    linear = partial(linear_rules, head_dim=dims.head_dim)
    single = partial(tensor_rules, head_dim=dims.head_dim)

    rules = linear("patch_embedding", "patch_embedding")
    rules += linear("time_embedding.linear_1", "condition_embedder.time_embedder.linear_1")
    rules += linear("time_embedding.linear_2", "condition_embedder.time_embedder.linear_2")
    rules += linear("time_projection", "condition_embedder.time_proj")
    rules += linear("text_embedding.linear_1", "condition_embedder.text_embedder.linear_1")
    rules += linear("text_embedding.linear_2", "condition_embedder.text_embedder.linear_2")
    if dims.image_dim is not None:
        image = "condition_embedder.image_embedder"
        rules += linear("image_embedding.norm1", f"{image}.norm1")
        rules += linear("image_embedding.linear_1", f"{image}.ff.net.0.proj")
        rules += linear("image_embedding.linear_2", f"{image}.ff.net.2")
        rules += linear("image_embedding.norm2", f"{image}.norm2")
        if dims.pos_embed_seq_len is not None:
            rules += single("image_embedding.pos_embed", f"{image}.pos_embed")
    for i in range(dims.num_layers):
        own, hf = f"blocks.{i}", f"blocks.{i}"
        qkv = (f"{hf}.attn1.to_q", f"{hf}.attn1.to_k", f"{hf}.attn1.to_v")
        rules += linear(f"{own}.self_attention.linear_qkv", qkv, COLUMN)
        rules += single(f"{own}.self_attention.q_norm.weight", f"{hf}.attn1.norm_q.weight", COLUMN)
        rules += single(f"{own}.self_attention.k_norm.weight", f"{hf}.attn1.norm_k.weight", COLUMN)
        rules += linear(f"{own}.self_attention.linear_proj", f"{hf}.attn1.to_out.0", ROW)
        rules += linear(f"{own}.cross_attention.linear_q", f"{hf}.attn2.to_q", COLUMN)
        rules += linear(f"{own}.cross_attention.linear_kv", (f"{hf}.attn2.to_k", f"{hf}.attn2.to_v"), COLUMN)
        rules += single(f"{own}.cross_attention.q_norm.weight", f"{hf}.attn2.norm_q.weight", COLUMN)
        rules += single(f"{own}.cross_attention.k_norm.weight", f"{hf}.attn2.norm_k.weight", COLUMN)
        if dims.image_dim is not None:
            kv_img = (f"{hf}.attn2.add_k_proj", f"{hf}.attn2.add_v_proj")
            rules += linear(f"{own}.cross_attention.linear_kv_img", kv_img, COLUMN)
            rules += single(f"{own}.cross_attention.k_img_norm.weight", f"{hf}.attn2.norm_added_k.weight", COLUMN)
        rules += linear(f"{own}.cross_attention.linear_proj", f"{hf}.attn2.to_out.0", ROW)
        if dims.cross_attn_norm:
            rules += linear(f"{own}.cross_attention_norm", f"{hf}.norm2")
        rules += linear(f"{own}.mlp.linear_fc1", f"{hf}.ffn.net.0.proj", COLUMN)
        rules += linear(f"{own}.mlp.linear_fc2", f"{hf}.ffn.net.2", ROW)
        rules += single(f"{own}.modulation", f"{hf}.scale_shift_table")
    rules += single("head_modulation", "scale_shift_table")
    rules += linear("head", "proj_out")
    return rules


# ----------------------------------------------------------------------------- shapes


def diffusers_shapes(dims: WanDims) -> Dict[str, Shape]:
    """The shape of every diffusers ``WanTransformer3DModel`` tensor of ``dims``."""
    d, shapes = dims.dim, {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        add_linear(shapes, name, out_features, in_features)

    def affine_norm(name: str, size: int) -> None:
        shapes[f"{name}.weight"] = (size,)
        shapes[f"{name}.bias"] = (size,)

    shapes["patch_embedding.weight"] = (d, dims.in_channels, *dims.patch_size)
    shapes["patch_embedding.bias"] = (d,)
    linear("condition_embedder.time_embedder.linear_1", d, dims.freq_dim)
    linear("condition_embedder.time_embedder.linear_2", d, d)
    linear("condition_embedder.time_proj", 6 * d, d)
    linear("condition_embedder.text_embedder.linear_1", d, dims.text_dim)
    linear("condition_embedder.text_embedder.linear_2", d, d)
    if dims.image_dim is not None:
        image = "condition_embedder.image_embedder"
        affine_norm(f"{image}.norm1", dims.image_dim)
        linear(f"{image}.ff.net.0.proj", dims.image_dim, dims.image_dim)
        linear(f"{image}.ff.net.2", d, dims.image_dim)
        affine_norm(f"{image}.norm2", d)
        if dims.pos_embed_seq_len is not None:
            shapes[f"{image}.pos_embed"] = (1, dims.pos_embed_seq_len, dims.image_dim)
    for i in range(dims.num_layers):
        block = f"blocks.{i}"
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                linear(f"{block}.{attn}.{proj}", d, d)
            shapes[f"{block}.{attn}.norm_q.weight"] = (d,)
            shapes[f"{block}.{attn}.norm_k.weight"] = (d,)
        if dims.image_dim is not None:
            linear(f"{block}.attn2.add_k_proj", d, d)
            linear(f"{block}.attn2.add_v_proj", d, d)
            shapes[f"{block}.attn2.norm_added_k.weight"] = (d,)
        if dims.cross_attn_norm:
            affine_norm(f"{block}.norm2", d)
        linear(f"{block}.ffn.net.0.proj", dims.ffn_dim, d)
        linear(f"{block}.ffn.net.2", d, dims.ffn_dim)
        shapes[f"{block}.scale_shift_table"] = (1, 6, d)
    shapes["scale_shift_table"] = (1, 2, d)
    volume = dims.patch_size[0] * dims.patch_size[1] * dims.patch_size[2]
    linear("proj_out", dims.out_channels * volume, d)
    return shapes


# ----------------------------------------------------------------------------- configs

DIFFUSERS_CLASS = "WanTransformer3DModel"
ORIGINAL_CLASS = "WanModel"
# diffusers config fields that do not change the weights: kept from the source when exporting.
DIFFUSERS_NON_ARCH_FIELDS = ("_diffusers_version", "rope_max_seq_len")
ORIGINAL_NON_ARCH_FIELDS = ("_diffusers_version", "model_type", "text_len")


def from_diffusers_config(config: Dict[str, Any]) -> WanDims:
    """From a diffusers ``WanTransformer3DModel`` config.json."""
    known = {
        "dim": config["num_attention_heads"] * config["attention_head_dim"],
        "ffn_dim": config["ffn_dim"],
        "num_heads": config["num_attention_heads"],
        "num_layers": config["num_layers"],
        "in_channels": config["in_channels"],
        "out_channels": config.get("out_channels") or config["in_channels"],
        "text_dim": config.get("text_dim", 4096),
        "freq_dim": config.get("freq_dim", 256),
        "patch_size": tuple(config.get("patch_size", (1, 2, 2))),
        "eps": config.get("eps", 1e-6),
        "cross_attn_norm": config.get("cross_attn_norm", True),
        "image_dim": config.get("image_dim"),
        "pos_embed_seq_len": config.get("pos_embed_seq_len"),
    }
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"unsupported Wan qk_norm {config.get('qk_norm')!r}")
    return WanDims(**known)


def to_diffusers_config(dims: WanDims) -> Dict[str, Any]:
    """A diffusers ``WanTransformer3DModel`` config.json for ``dims``."""
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(dims.patch_size),
        "num_attention_heads": dims.num_heads,
        "attention_head_dim": dims.head_dim,
        "in_channels": dims.in_channels,
        "out_channels": dims.out_channels,
        "text_dim": dims.text_dim,
        "freq_dim": dims.freq_dim,
        "ffn_dim": dims.ffn_dim,
        "num_layers": dims.num_layers,
        "cross_attn_norm": dims.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": dims.eps,
        "image_dim": dims.image_dim,
        "added_kv_proj_dim": dims.dim if dims.image_dim is not None else None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": dims.pos_embed_seq_len,
    }


def is_original_config(config: Mapping[str, Any]) -> bool:
    return config.get("_class_name") == ORIGINAL_CLASS or ("dim" in config and "num_heads" in config)


def dims_from_diffusers_config(config: Mapping[str, Any], where: str) -> WanDims:
    """WanDims of a diffusers config.json, refusing what WanModel does not implement."""
    name = config.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise CheckpointError(f"{where}: model class {name!r} is not supported (expected {DIFFUSERS_CLASS})")
    required = ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "in_channels")
    require_fields(config, required, where)
    try:
        dims = from_diffusers_config(dict(config))
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from err
    added_kv = config.get("added_kv_proj_dim")
    expected_added_kv = dims.dim if dims.image_dim is not None else None
    if added_kv != expected_added_kv:
        raise CheckpointError(
            f"{where}: added_kv_proj_dim {added_kv} with image_dim {dims.image_dim}: Wan's image branch "
            f"needs added_kv_proj_dim = dim ({dims.dim}) with an image_dim, and neither without"
        )
    return dims


def dims_from_original_config(config: Mapping[str, Any], weight_shapes: Mapping[str, Shape], where: str) -> WanDims:
    """WanDims of an original Wan config.json. The config cannot tell Wan2.1 I2V (with an image
    branch) from Wan2.2 I2V (without): both say model_type "i2v" with 36 input channels, so the
    presence of ``img_emb`` weights decides."""
    require_fields(config, ("dim", "ffn_dim", "num_heads", "num_layers"), where)
    if not config.get("qk_norm", True):
        raise CheckpointError(f"{where}: qk_norm false is not supported (Wan normalises q and k)")
    if list(config.get("window_size", (-1, -1))) != [-1, -1]:
        raise CheckpointError(f"{where}: window_size {config['window_size']} is not supported (full attention only)")
    dim, heads = config["dim"], config["num_heads"]
    if dim % heads:
        raise CheckpointError(f"{where}: dim {dim} is not divisible by num_heads {heads}")
    model_type = config.get("model_type", "t2v")
    image_dim = pos_embed_seq_len = None
    if "img_emb.proj.0.weight" in weight_shapes:
        image_dim = weight_shapes["img_emb.proj.0.weight"][0]
    elif model_type == "flf2v":
        image_dim = 1280  # so that the missing image branch is reported as missing keys
    if "img_emb.emb_pos" in weight_shapes:
        pos_embed_seq_len = weight_shapes["img_emb.emb_pos"][1]
    elif model_type == "flf2v":
        pos_embed_seq_len = 514
    return WanDims(
        dim=dim,
        ffn_dim=config["ffn_dim"],
        num_heads=heads,
        num_layers=config["num_layers"],
        in_channels=config.get("in_dim", 16),
        out_channels=config.get("out_dim", 16),
        text_dim=config.get("text_dim", 4096),
        freq_dim=config.get("freq_dim", 256),
        patch_size=tuple(config.get("patch_size", (1, 2, 2))),
        eps=config.get("eps", 1e-6),
        cross_attn_norm=config.get("cross_attn_norm", True),
        image_dim=image_dim,
        pos_embed_seq_len=pos_embed_seq_len,
    )


def default_model_type(dims: WanDims) -> str:
    if dims.pos_embed_seq_len is not None:
        return "flf2v"
    if dims.image_dim is not None or dims.in_channels == 36:
        return "i2v"
    return "ti2v" if dims.in_channels == 48 else "t2v"


def original_config(dims: WanDims, source: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """An original Wan config.json for ``dims``; fields that do not shape the weights
    (model_type, text_len) are taken from ``source`` (an original config) when given."""
    config: Dict[str, Any] = {
        "_class_name": ORIGINAL_CLASS,
        "model_type": default_model_type(dims),
        "patch_size": list(dims.patch_size),
        "text_len": 512,
        "in_dim": dims.in_channels,
        "dim": dims.dim,
        "ffn_dim": dims.ffn_dim,
        "freq_dim": dims.freq_dim,
        "text_dim": dims.text_dim,
        "out_dim": dims.out_channels,
        "num_heads": dims.num_heads,
        "num_layers": dims.num_layers,
        "window_size": [-1, -1],
        "qk_norm": True,
        "cross_attn_norm": dims.cross_attn_norm,
        "eps": dims.eps,
    }
    return keep_fields(config, source, ORIGINAL_NON_ARCH_FIELDS)


def summary(dims: WanDims) -> str:
    image = f", image_dim {dims.image_dim}" if dims.image_dim is not None else ""
    return (
        f"dim {dims.dim}, {dims.num_heads} heads, {dims.num_layers} layers, ffn_dim {dims.ffn_dim}, "
        f"in/out channels {dims.in_channels}/{dims.out_channels}{image}"
    )


# ----------------------------------------------------------------------------- Wan2.2 A14B experts

# The expert boundary on the 0..1 noise scale, by input channels (T2V, I2V).
DEFAULT_BOUNDARY_RATIO = {16: 0.875, 36: 0.9}


def default_boundary_ratio(dims: WanDims) -> Optional[float]:
    return DEFAULT_BOUNDARY_RATIO.get(dims.in_channels)


def vae_compression(dims: WanDims) -> Tuple[int, int]:
    """The VAE a Wan DiT's latents come from, by their channels (Wan2.2-TI2V-5B: the 48-channel
    Wan2.2 VAE, 16x spatial)."""
    vae = wan_vae(dims.out_channels)
    return vae.temporal, vae.spatial


def pipeline_settings(dims: WanDims) -> Dict[str, Any]:
    """A DiT of the Wan2.2 VAE's latents runs with per-token timesteps (``expand_timesteps``)."""
    return {"expand_timesteps": True} if wan_vae(dims.out_channels).image_condition == "first_frame" else {}


def pipeline_class(dims: WanDims) -> str:
    return "WanImageToVideoPipeline" if dims.in_channels == 36 else "WanPipeline"


# ----------------------------------------------------------------------------- the adapter


def block_activations(dims, act_bytes: int) -> BlockActivations:
    """Bytes one block keeps for its backward, counted from the block's code (``act_bytes``: the
    model's dtype; norms, modulation and gates are fp32): norm1 input, its modulated output, the
    self-attention output before its gate, the cross-attention norm input, norm2 input, its
    modulated output and the MLP output before its gate (7 fp32 tensors), the inputs of
    linear_qkv, linear_q and linear_fc1; q/k RMSNorms (input and output in fp32, self-attention q
    and k, cross-attention q), attention q, k, the fused qkv holding v, the output,
    cross-attention q and output; the MLP hidden before and after GELU; the prompt's k/v per
    text token."""
    h, f, a, fp32 = dims.dim, dims.ffn_dim, act_bytes, FP32_BYTES
    return BlockActivations(
        stream=7 * fp32 * h + 3 * a * h,
        sharded=(4 + 2) * fp32 * h + (2 + 3 + 1 + 2) * a * h + 2 * a * f,
        gathered=rope_bytes(dims.head_dim),
        block_input=a * h,
        text_fixed=2 * fp32 * h + 3 * a * h,  # k RMSNorm input/output, fused k/v, normed k
    )


WAN = Architecture(
    name="wan",
    title="Wan",
    dims_class=WanDims,
    model_class=WanModel,
    presets=WAN_PRESETS,
    diffusers_class=DIFFUSERS_CLASS,
    weight_rules=diffusers_weight_rules,
    diffusers_shapes=diffusers_shapes,
    dims_from_diffusers_config=dims_from_diffusers_config,
    dims_to_diffusers_config=to_diffusers_config,
    diffusers_fields=("num_attention_heads", "ffn_dim"),
    diffusers_non_dims_fields=DIFFUSERS_NON_ARCH_FIELDS,
    summary=summary,
    vae_class="AutoencoderKLWan",
    vae_compression=vae_compression,
    text_encoder_class="UMT5EncoderModel",
    block_activations=block_activations,
    prompt_tokens=512,  # the Wan pipelines pad every prompt to 512 tokens
    joint_text=False,  # cross-attention: the prompt's k/v, not its tokens, meet every block
    original=OriginalLayout(
        description="an original Wan config (dim, num_heads, ...)",
        is_config=is_original_config,
        dims_from_config=dims_from_original_config,
        names=original_names,
        config=original_config,
    ),
    experts=ExpertPairs(
        default_boundary_ratio=default_boundary_ratio,
        pipeline_class=pipeline_class,
        pipeline_settings=pipeline_settings,
    ),
)
