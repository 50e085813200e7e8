"""Weight conversion: Hugging Face Wan layouts <-> the trainer's own format (phased_dmd_mega.convert).

Tiny random diffusers WanTransformer3DModel instances (T2V, Wan2.1 I2V image branch, TI2V with
48 channels, bf16 with some fp32 tensors, the Wan2.2 A14B pair) are saved with save_pretrained,
sharded; original-layout folders are built here by renaming their keys with this file's own
regexes (independent of the module's renames). Every round trip must be bitwise, every bad
input refused with a message naming what is wrong and nothing left at the destination.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from phased_dmd_mega import cli, convert
from phased_dmd_mega.errors import DamagedFileError
from phased_dmd_mega.models import shards
from phased_dmd_mega.models.checkpoints import inspect_checkpoint
from phased_dmd_mega.models.shards import TensorEntry, parse_size, write_sharded
from phased_dmd_mega.models.wan_formats import (
    CheckpointError,
    diffusers_shapes,
    diffusers_weight_rules,
    from_diffusers_config,
)
from phased_dmd_mega.models.weights import TensorReader

from helpers import REPO_ROOT
from helpers.damaged_files import (
    DAMAGE_MESSAGES,
    DAMAGES,
    WriteFailed,
    assert_failed_on,
    assert_left_as_before,
    assert_nothing_left,
    damage,
    failing_after,
    folder_contents,
    last_file,
    truncate,
    written_in_staging,
)
from helpers.hf_folders import (
    SMALL_SHARDS,
    TINY,
    VARIANTS,
    assert_bitwise_equal,
    assert_refused,
    diffusers_model,
    read_folder,
    rewrite_single_file,
    save_diffusers,
)

ROOT = REPO_ROOT
# ----------------------------------------------------------------------------- building sources


# diffusers -> original Wan names, written independently of the module (anchored regexes).
_TO_ORIGINAL = [
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
    (r"^(blocks\.\d+)\.attn1\.to_out\.0\.", r"\1.self_attn.o."),
    (r"^(blocks\.\d+)\.attn2\.to_out\.0\.", r"\1.cross_attn.o."),
    (r"^(blocks\.\d+)\.attn1\.to_([qkv])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.to_([qkv])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.attn1\.norm_([qk])\.", r"\1.self_attn.norm_\2."),
    (r"^(blocks\.\d+)\.attn2\.norm_([qk])\.", r"\1.cross_attn.norm_\2."),
    (r"^(blocks\.\d+)\.attn2\.add_([kv])_proj\.", r"\1.cross_attn.\2_img."),
    (r"^(blocks\.\d+)\.attn2\.norm_added_k\.", r"\1.cross_attn.norm_k_img."),
]


def to_original_name(key):
    for pattern, replacement in _TO_ORIGINAL:
        new = re.sub(pattern, replacement, key)
        if new != key:
            return new
    assert key.startswith("patch_embedding."), key  # the only key kept as is
    return key


def original_config_for(overrides):
    merged = {**TINY, **overrides}
    model_type = "i2v" if "image_dim" in overrides else ("ti2v" if merged["in_channels"] == 48 else "t2v")
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "model_type": model_type,
        "patch_size": [1, 2, 2],
        "text_len": 512,
        "in_dim": merged["in_channels"],
        "dim": 48,
        "ffn_dim": 32,
        "freq_dim": 16,
        "text_dim": 16,
        "out_dim": merged["out_channels"],
        "num_heads": 4,
        "num_layers": 2,
        "window_size": [-1, -1],
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": 1e-6,
    }


def save_original(folder, seed=0, dtype=torch.float32, **overrides):
    """An original-layout Wan folder, in two shards with an index (like the 14B releases)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    state = {
        to_original_name(k): v.detach().clone().contiguous()
        for k, v in diffusers_model(seed, dtype, **overrides).state_dict().items()
    }
    names = sorted(state)
    halves = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(original_config_for(overrides)))
    return folder


def inputs(in_channels=4, image=False):
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(2, in_channels, 3, 4, 6, generator=gen)
    context = torch.randn(2, 512, 16, generator=gen)  # diffusers' I2V splits the image off at 512 text tokens
    kwargs = {"encoder_hidden_states_image": torch.randn(2, 5, 8, generator=gen)} if image else {}
    return (latents, torch.tensor([999.0, 250.0]), context), kwargs


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize("variant", list(VARIANTS) + ["flf2v"])
def test_shape_table_and_rule_table_cover_every_diffusers_tensor(variant):
    overrides = VARIANTS.get(variant, dict(image_dim=8, added_kv_proj_dim=48, pos_embed_seq_len=10))
    model = diffusers_model(**overrides)
    dims = from_diffusers_config(dict(model.config))
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert diffusers_shapes(dims) == expected
    assert {s for rule in diffusers_weight_rules(dims) for s in rule.sources} == set(expected)
    from phased_dmd_mega.models.wan_formats import original_names, original_to_diffusers_name

    names = original_names(expected)
    assert names == {key: to_original_name(key) for key in expected}
    assert all(original_to_diffusers_name(names[key]) == key for key in expected)


def test_original_export_has_exactly_the_original_wan2_1_i2v_key_set(tmp_path):
    src = save_diffusers(tmp_path / "hf", **VARIANTS["i2v"])
    convert.hf_to_mega(src, tmp_path / "mega")
    convert.mega_to_hf(tmp_path / "mega", tmp_path / "orig", layout="original")
    block = ["modulation", "norm3.weight", "norm3.bias", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias"]
    for attn in ("self_attn", "cross_attn"):
        block += [f"{attn}.{p}.{w}" for p in "qkvo" for w in ("weight", "bias")]
        block += [f"{attn}.norm_q.weight", f"{attn}.norm_k.weight"]
    block += [f"cross_attn.{p}_img.{w}" for p in "kv" for w in ("weight", "bias")] + ["cross_attn.norm_k_img.weight"]
    top = ["head.modulation", "patch_embedding.weight", "patch_embedding.bias"]
    top += [
        f"{m}.{w}"
        for m in (
            "time_embedding.0",
            "time_embedding.2",
            "text_embedding.0",
            "text_embedding.2",
            "time_projection.1",
            "head.head",
            "img_emb.proj.0",
            "img_emb.proj.1",
            "img_emb.proj.3",
            "img_emb.proj.4",
        )
        for w in ("weight", "bias")
    ]
    expected = set(top) | {f"blocks.{i}.{name}" for i in range(2) for name in block}
    assert set(read_folder(tmp_path / "orig")) == expected


# ----------------------------------------------------------------------------- round trips


ROUND_TRIPS = [("t2v", torch.float32), ("i2v", torch.float32), ("ti2v", torch.float32), ("t2v", torch.bfloat16)]
ROUND_TRIP_IDS = ["t2v", "i2v", "ti2v", "bf16"]


@pytest.mark.parametrize("variant, dtype", ROUND_TRIPS, ids=ROUND_TRIP_IDS)
def test_diffusers_round_trip_is_bitwise_and_loads_in_diffusers(tmp_path, variant, dtype):
    from diffusers import WanTransformer3DModel

    src = save_diffusers(tmp_path / "hf", dtype=dtype, **VARIANTS[variant])
    convert.hf_to_mega(src, tmp_path / "mega", max_shard_bytes=parse_size(SMALL_SHARDS))
    convert.mega_to_hf(tmp_path / "mega", tmp_path / "back", layout="diffusers")
    assert len(list((tmp_path / "mega").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "mega" / "model.safetensors.index.json").is_file()
    assert_bitwise_equal(read_folder(tmp_path / "back"), read_folder(src))
    assert {t.dtype for t in read_folder(src).values()} == (
        {torch.float32} if dtype == torch.float32 else {torch.bfloat16, torch.float32}
    )
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    if dtype == torch.float32:  # the export is a working diffusers model with the same output
        args, kwargs = inputs(VARIANTS[variant].get("in_channels", 4), image=variant == "i2v")
        with torch.no_grad():
            want = WanTransformer3DModel.from_pretrained(src).eval()(*args, **kwargs).sample
            got = WanTransformer3DModel.from_pretrained(tmp_path / "back").eval()(*args, **kwargs).sample
        assert torch.equal(got, want)


@pytest.mark.parametrize("variant, dtype", ROUND_TRIPS, ids=ROUND_TRIP_IDS)
def test_original_round_trip_is_bitwise_with_exactly_the_original_keys(tmp_path, variant, dtype):
    src = save_original(tmp_path / "orig", dtype=dtype, **VARIANTS[variant])
    convert.hf_to_mega(src, tmp_path / "mega")
    convert.mega_to_hf(tmp_path / "mega", tmp_path / "back", layout="original")
    assert_bitwise_equal(read_folder(tmp_path / "back"), read_folder(src))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_diffusers_and_original_sources_give_the_same_mega_tensors(tmp_path):
    convert.hf_to_mega(save_diffusers(tmp_path / "hf", seed=3, **VARIANTS["i2v"]), tmp_path / "a")
    convert.hf_to_mega(save_original(tmp_path / "orig", seed=3, **VARIANTS["i2v"]), tmp_path / "b")
    assert_bitwise_equal(read_folder(tmp_path / "b"), read_folder(tmp_path / "a"))
    # and across layouts: original -> mega -> diffusers is the diffusers checkpoint
    convert.mega_to_hf(tmp_path / "b", tmp_path / "hf_again")
    assert_bitwise_equal(read_folder(tmp_path / "hf_again"), read_folder(tmp_path / "hf"))


def test_mega_format_holds_full_fused_tensors_under_own_names(tmp_path):
    src = save_diffusers(tmp_path / "hf")
    convert.hf_to_mega(src, tmp_path / "mega", tensor_parallel=2)
    config = json.loads((tmp_path / "mega" / "config.json").read_text())
    assert config["format"] == "phased-dmd-mega" and config["family"] == "wan" and config["tensor_parallel"] == 2
    dims = from_diffusers_config(json.loads((src / "config.json").read_text()))
    assert config["architecture"]["dim"] == 48 and config["architecture"]["num_heads"] == 4
    assert config["provenance"]["source_layout"] == "diffusers"
    mega, hf = read_folder(tmp_path / "mega"), read_folder(src)
    assert set(mega) == {rule.own for rule in diffusers_weight_rules(dims)}
    # megatron's fused qkv: per head [q_h, k_h, v_h], 12 rows each
    q, k, v = (hf[f"blocks.1.attn1.to_{p}.weight"].reshape(4, 12, 48) for p in "qkv")
    assert torch.equal(mega["blocks.1.self_attention.linear_qkv.weight"], torch.stack([q, k, v], 1).reshape(144, 48))
    kb, vb = (hf[f"blocks.0.attn2.to_{p}.bias"].reshape(4, 12) for p in "kv")
    assert torch.equal(mega["blocks.0.cross_attention.linear_kv.bias"], torch.stack([kb, vb], 1).reshape(96))
    assert torch.equal(mega["blocks.0.cross_attention_norm.weight"], hf["blocks.0.norm2.weight"])


# ----------------------------------------------------------------------------- Wan2.2 A14B


def save_diffusers_pipeline(root, boundary_ratio, in_channels=16):
    root.mkdir()
    save_diffusers(root / "transformer", seed=1, in_channels=in_channels)
    save_diffusers(root / "transformer_2", seed=2, in_channels=in_channels)
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "boundary_ratio": boundary_ratio,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_a14b_diffusers_pipeline_round_trip_keeps_both_experts_and_the_boundary(tmp_path):
    src = save_diffusers_pipeline(tmp_path / "pipe", boundary_ratio=0.8)
    convert.hf_to_mega(src, tmp_path / "mega")
    top = json.loads((tmp_path / "mega" / "config.json").read_text())
    assert top["boundary_ratio"] == 0.8 and top["experts"] == {"high": "high_noise", "low": "low_noise"}
    convert.mega_to_hf(tmp_path / "mega", tmp_path / "back")
    for sub in ("transformer", "transformer_2"):
        assert_bitwise_equal(read_folder(tmp_path / "back" / sub), read_folder(src / sub))
    assert json.loads((tmp_path / "back" / "model_index.json").read_text())["boundary_ratio"] == 0.8
    assert not torch.equal(
        read_folder(src / "transformer")["proj_out.weight"], read_folder(src / "transformer_2")["proj_out.weight"]
    )


def test_mega_folders_of_older_versions_naming_the_family_arch_still_load(tmp_path):
    src = save_diffusers_pipeline(tmp_path / "pipe", boundary_ratio=0.8)
    convert.hf_to_mega(src, tmp_path / "mega")
    configs = sorted((tmp_path / "mega").rglob("config.json"))
    assert len(configs) == 3  # the experts' index and each expert's
    for path in configs:
        config = json.loads(path.read_text())
        assert config["family"] == "wan" and "arch" not in config
        config["arch"] = config.pop("family")
        path.write_text(json.dumps(config))
    checkpoint = inspect_checkpoint(tmp_path / "mega", "wan")
    assert checkpoint.layout == "mega" and checkpoint.architecture.name == "wan" and checkpoint.has_experts
    convert.mega_to_hf(tmp_path / "mega", tmp_path / "back", expect="wan")
    for sub in ("transformer", "transformer_2"):
        assert_bitwise_equal(read_folder(tmp_path / "back" / sub), read_folder(src / sub))


def test_a14b_original_experts_round_trip_with_the_default_i2v_boundary(tmp_path):
    src = tmp_path / "orig"
    src.mkdir()
    save_original(src / "high_noise_model", seed=1, in_channels=36)
    save_original(src / "low_noise_model", seed=2, in_channels=36)
    convert.hf_to_mega(src, tmp_path / "mega")
    assert json.loads((tmp_path / "mega" / "config.json").read_text())["boundary_ratio"] == 0.9  # 36 channels
    assert inspect_checkpoint(tmp_path / "mega").has_experts
    convert.mega_to_hf(tmp_path / "mega", tmp_path / "back", layout="original")
    for sub in ("high_noise_model", "low_noise_model"):
        assert_bitwise_equal(read_folder(tmp_path / "back" / sub), read_folder(src / sub))
    convert.mega_to_hf(tmp_path / "mega", tmp_path / "hf")  # and to a diffusers pipeline root
    index = json.loads((tmp_path / "hf" / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.9 and index["_class_name"] == "WanImageToVideoPipeline"


def test_a14b_t2v_default_boundary_is_0_875(tmp_path):
    src = save_diffusers_pipeline(tmp_path / "pipe", boundary_ratio=None)
    convert.hf_to_mega(src, tmp_path / "mega")
    assert json.loads((tmp_path / "mega" / "config.json").read_text())["boundary_ratio"] == 0.875


# ----------------------------------------------------------------------------- streaming


def test_shards_are_written_as_tensors_arrive(tmp_path):
    entries = [TensorEntry(f"t{i}", torch.bfloat16, (256,)) for i in range(6)]  # 512 bytes each
    values = {e.name: torch.randn(256).to(torch.bfloat16) for e in entries}

    def tensors():
        for i, entry in enumerate(entries):
            if i == 4:  # two tensors per 1 KB shard: the first two files are complete on disk
                done = sorted(p.name for p in tmp_path.glob("*.safetensors"))
                assert done[:2] == ["w-00001-of-00003.safetensors", "w-00002-of-00003.safetensors"]
                assert read_folder_files(tmp_path, done[:2]) == {"t0", "t1", "t2", "t3"}
            yield entry.name, values[entry.name]

    names = write_sharded(tmp_path, "w", entries, tensors(), max_shard_bytes=1024)
    assert names == [f"w-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert_bitwise_equal(read_folder(tmp_path), values)
    index = json.loads((tmp_path / "w.safetensors.index.json").read_text())
    assert index["weight_map"]["t5"] == names[2] and index["metadata"]["total_size"] == 6 * 512


def read_folder_files(folder, files):
    keys = set()
    for file in files:
        with safe_open(str(folder / file), framework="pt") as handle:
            keys |= set(handle.keys())
    return keys


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def hf_folder(tmp_path):
    return save_diffusers(tmp_path / "hf", shards="10GB")


def test_missing_keys_are_listed(tmp_path, hf_folder):
    rewrite_single_file(hf_folder, lambda s: s.pop("blocks.1.attn1.to_q.weight"))
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(hf_folder, dst), r"missing keys \(1\): blocks\.1\.attn1\.to_q\.weight", dst
    )


def test_unexpected_keys_are_listed(tmp_path, hf_folder):
    rewrite_single_file(hf_folder, lambda s: s.update({"extra.weight": torch.zeros(2), "blocks.0.x": torch.zeros(1)}))
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(hf_folder, dst), r"unexpected keys \(2\): blocks\.0\.x, extra\.weight", dst
    )


def test_original_layout_missing_keys_use_original_names(tmp_path):
    src = save_original(tmp_path / "orig")
    index = json.loads((src / "diffusion_pytorch_model.safetensors.index.json").read_text())
    index["weight_map"].pop("blocks.0.norm3.weight")
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    dst = tmp_path / "mega"
    assert_refused(lambda: convert.hf_to_mega(src, dst), r"missing keys \(1\): blocks\.0\.norm3\.weight$", dst)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, hf_folder):
    rewrite_single_file(hf_folder, lambda s: s.update({"blocks.0.ffn.net.0.proj.weight": torch.zeros(33, 48)}))
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(hf_folder, dst),
        r"blocks\.0\.ffn\.net\.0\.proj\.weight: \(33, 48\) in the weights, \(32, 48\) from the config",
        dst,
    )


def test_dtype_mismatch_inside_a_fused_tensor_is_refused(tmp_path, hf_folder):
    def edit(state):
        state["blocks.0.attn1.to_k.weight"] = state["blocks.0.attn1.to_k.weight"].to(torch.bfloat16)

    rewrite_single_file(hf_folder, edit)
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(hf_folder, dst),
        r"dtype mismatch .*blocks\.0\.attn1\.to_q\.weight torch\.float32, "
        r"blocks\.0\.attn1\.to_k\.weight torch\.bfloat16",
        dst,
    )


def test_integer_weights_are_refused(tmp_path, hf_folder):
    rewrite_single_file(hf_folder, lambda s: s.update({"proj_out.bias": torch.zeros(16, dtype=torch.int64)}))
    dst = tmp_path / "mega"
    assert_refused(lambda: convert.hf_to_mega(hf_folder, dst), r"floating point: proj_out\.bias \(torch\.int64\)", dst)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ffn_dim", 64, r"blocks\.0\.ffn\.net\.0\.proj\.weight: \(32, 48\) in the weights, \(64, 48\) from the config"),
        ("num_layers", 3, r"do not match .*config\.json .*3 layers.*missing keys \(\d+\): blocks\.2\."),
        ("image_dim", 8, r"added_kv_proj_dim None with image_dim 8"),
    ],
)
def test_a_config_that_disagrees_with_the_weights_is_refused(tmp_path, hf_folder, field, value, message):
    config = json.loads((hf_folder / "config.json").read_text())
    config[field] = value
    (hf_folder / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "mega"
    assert_refused(lambda: convert.hf_to_mega(hf_folder, dst), re.compile(message, re.S), dst)


def test_a_mega_config_that_disagrees_with_its_weights_is_refused(tmp_path, hf_folder):
    convert.hf_to_mega(hf_folder, tmp_path / "mega")
    config = json.loads((tmp_path / "mega" / "config.json").read_text())
    config["architecture"]["ffn_dim"] = 64
    (tmp_path / "mega" / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "back"
    assert_refused(
        lambda: convert.mega_to_hf(tmp_path / "mega", dst),
        r"blocks\.0\.mlp\.linear_fc1\.weight: \(32, 48\) in the weights, \(64, 48\) from the config",
        dst,
    )


def test_tensor_parallel_that_does_not_divide_the_heads_is_refused(tmp_path, hf_folder):
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(hf_folder, dst, tensor_parallel=3),
        r"tensor parallel size 3 does not divide the 4 attention heads",
        dst,
    )


def test_unknown_layout_is_refused(tmp_path):
    src = tmp_path / "weights"
    src.mkdir()
    save_file({"a": torch.zeros(1)}, str(src / "model.safetensors"))
    dst = tmp_path / "mega"
    assert_refused(lambda: convert.hf_to_mega(src, dst), r"cannot tell the layout of .*weights", dst)
    (src / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel"}))
    assert_refused(lambda: convert.hf_to_mega(src, dst), r"neither a diffusers WanTransformer3DModel config", dst)


def test_ambiguous_layout_is_refused(tmp_path, hf_folder):
    (hf_folder / "model_index.json").write_text("{}")
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(hf_folder, dst),
        r"layout of .*hf is ambiguous: it has config\.json and model_index\.json",
        dst,
    )


def test_index_naming_an_absent_shard_is_refused(tmp_path):
    src = save_original(tmp_path / "orig")
    (src / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(src, dst),
        r"names shards that are not in .*diffusion_pytorch_model-00002-of-00002",
        dst,
        DamagedFileError,
    )


def convert_cli(*args) -> int:
    return cli.main(["convert", *map(str, args)])


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("direction", ["hf-to-mega", "mega-to-hf"])
def test_a_damaged_safetensors_file_fails_the_command_in_one_line(tmp_path, capsys, direction, how):
    src = save_diffusers(tmp_path / "hf")
    if direction == "mega-to-hf":
        src = convert.hf_to_mega(src, tmp_path / "mega", max_shard_bytes=parse_size(SMALL_SHARDS))
    file = damage(last_file(src), how)
    capsys.readouterr()
    status = convert_cli(direction, "--src", src, "--dst", tmp_path / "out")
    assert_failed_on(status, capsys.readouterr().err, file, DAMAGE_MESSAGES[how])
    assert_nothing_left(tmp_path / "out")


def test_a_shard_missing_from_its_index_fails_the_command_in_one_line(tmp_path, capsys):
    src = save_diffusers(tmp_path / "hf")
    index = src / "diffusion_pytorch_model.safetensors.index.json"
    gone = last_file(src)
    gone.unlink()
    status = convert_cli("hf-to-mega", "--src", src, "--dst", tmp_path / "out")
    assert_failed_on(status, capsys.readouterr().err, index, rf"names shards that are not in .*{gone.name}")
    assert_nothing_left(tmp_path / "out")


def test_a_tensor_read_from_a_file_damaged_after_its_header_names_the_tensor(tmp_path):
    src = save_diffusers(tmp_path / "hf", shards="10GB")
    reader = TensorReader(src)
    truncate(src / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DamagedFileError, match=r"truncated: .*\(reading tensor 'proj_out\.weight'\)$"):
        reader.read("proj_out.weight")


def test_preset_that_does_not_match_the_config_is_refused(tmp_path, hf_folder):
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(hf_folder, dst, expect="tiny"), r"is not preset 'tiny': dim 48 \(preset 64\)", dst
    )


def test_wrong_direction_is_refused(tmp_path, hf_folder):
    convert.hf_to_mega(hf_folder, tmp_path / "mega")
    assert_refused(
        lambda: convert.mega_to_hf(hf_folder, tmp_path / "x"),
        r"is a diffusers checkpoint, not phased-dmd-mega",
        tmp_path / "x",
    )
    assert_refused(
        lambda: convert.hf_to_mega(tmp_path / "mega", tmp_path / "x"),
        r"already in the trainer's format",
        tmp_path / "x",
    )


def test_existing_destination_needs_overwrite(tmp_path, hf_folder):
    dst = tmp_path / "mega"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"already exists; pass --overwrite"):
        convert.hf_to_mega(hf_folder, dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    convert.hf_to_mega(hf_folder, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mega"]  # no staging leftovers


@pytest.mark.parametrize("experts", [False, True], ids=["one_model", "two_experts"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_conversion_failing_partway_leaves_no_destination_and_the_replaced_one_intact(
    tmp_path, monkeypatch, existing, experts
):
    """The first shard (or the first expert) is written, the next write fails (a full disk)."""
    src = save_diffusers_pipeline(tmp_path / "pipe", 0.875) if experts else save_diffusers(tmp_path / "hf")
    dst = tmp_path / "mega"
    if existing:
        convert.hf_to_mega(save_diffusers(tmp_path / "other", seed=5), dst)
    before = folder_contents(dst) if existing else None
    write = failing_after(shards._write_file, 1)
    monkeypatch.setattr(shards, "_write_file", write)
    with pytest.raises(WriteFailed):
        convert.hf_to_mega(src, dst, max_shard_bytes=parse_size(SMALL_SHARDS), overwrite=existing)
    assert written_in_staging(write.done, dst)
    assert_left_as_before(dst, before)


def test_destination_inside_the_source_is_refused(tmp_path, hf_folder):
    with pytest.raises(CheckpointError, match="overlaps the source"):
        convert.hf_to_mega(hf_folder, hf_folder / "mega")
    assert not (hf_folder / "mega").exists()


# ----------------------------------------------------------------------------- command line


def test_cli_converts_and_round_trips(tmp_path, hf_folder):
    script = Path(sys.executable).parent / "phased-dmd"
    run = subprocess.run(
        [
            str(script),
            "convert",
            "hf-to-mega",
            "--expect",
            "wan",
            "--src",
            str(hf_folder),
            "--dst",
            str(tmp_path / "mega"),
            "--tp",
            "2",
            "--max-shard-size",
            "40KB",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote model-00001-of-" in run.stderr  # progress, one line per shard
    assert json.loads((tmp_path / "mega" / "config.json").read_text())["tensor_parallel"] == 2
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert.py"),
            "mega-to-hf",
            "--src",
            str(tmp_path / "mega"),
            "--dst",
            str(tmp_path / "back"),
            "--layout",
            "diffusers",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert_bitwise_equal(read_folder(tmp_path / "back"), read_folder(hf_folder))


def test_cli_reports_a_bad_tp_with_exit_code_2(tmp_path, hf_folder):
    script = Path(sys.executable).parent / "phased-dmd"
    run = subprocess.run(
        [
            str(script),
            "convert",
            "hf-to-mega",
            "--expect",
            "wan",
            "--src",
            str(hf_folder),
            "--dst",
            str(tmp_path / "mega"),
            "--tp",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    expected = "phased-dmd convert hf-to-mega: error: tensor parallel size 3 does not divide the 4 attention heads"
    assert expected in run.stderr
    assert not (tmp_path / "mega").exists()
