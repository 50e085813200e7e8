"""Qwen-Image checkpoints: conversion (HF <-> mega) and load_pretrained, with Wan's guarantees.

A tiny random diffusers QwenImageTransformer2DModel (tiny_models.QWEN_TINY, the "tiny" preset;
every parameter random, norms included) is saved with save_pretrained, sharded. The round trip
HF -> mega -> HF must be bitwise (keys, tensors, dtypes, config) and load in diffusers with the
same output; load_pretrained must match diffusers from the diffusers folder, a pipeline root and
the mega folder, at TP=1 here and at TP=2 on two gloo processes. Bad input is refused with a
message naming what is wrong, and nothing is left at the destination. diffusers is driven as in
test_qwen_parity (packed tokens).
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phased_dmd_mega import convert, parallel
from phased_dmd_mega.models import QwenImageModel, load_pretrained
from phased_dmd_mega.models.architectures import CheckpointError, registry
from phased_dmd_mega.models.checkpoints import inspect_checkpoint
from phased_dmd_mega.models.qwen_image import QWEN_IMAGE_PRESETS, QwenImageDims
from phased_dmd_mega.models.qwen_image_formats import (
    diffusers_shapes,
    diffusers_weight_rules,
    from_diffusers_config,
    to_diffusers_config,
)
from phased_dmd_mega.models.shards import parse_size
from phased_dmd_mega.testing import run_distributed, with_parallel_state

from helpers.hf_folders import assert_bitwise_equal, assert_refused, read_folder, rewrite_single_file
from helpers.hf_folders import save_diffusers as save_wan_diffusers
from helpers.parity import qwen_diffusers_velocity as diffusers_velocity
from helpers.parity import qwen_inputs as inputs
from helpers.tiny_models import QWEN_TINY, randomize_

SMALL_SHARDS = "150KB"  # several files for the tiny model (about 1.2 MB in fp32)
TOLERANCE = 1e-5


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def diffusers_model(seed=0, dtype=torch.float32):
    from diffusers import QwenImageTransformer2DModel

    model = randomize_(QwenImageTransformer2DModel(**QWEN_TINY).eval(), seed)
    if dtype != torch.float32:  # bf16 with a few fp32 tensors: every tensor keeps its own dtype
        model.to(dtype)
        for name, param in model.named_parameters():
            if name.startswith(("norm_out.", "txt_norm.")):
                param.data = param.data.float()
    return model


def save_diffusers(folder, seed=0, dtype=torch.float32, shards=SMALL_SHARDS):
    diffusers_model(seed, dtype).save_pretrained(folder, max_shard_size=shards)
    return Path(folder)


def save_pipeline(root, seed=0):
    """A pipeline root: model_index.json and transformer/ (the other components are not needed)."""
    save_diffusers(root / "transformer", seed)
    index = {
        "_class_name": "QwenImagePipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def reference_output(folder):
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return diffusers_velocity(model, *inputs())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{diffusers, pipeline, mega: folder} holding the same fp32 weights, and diffusers' output."""
    root = tmp_path_factory.mktemp("qwen")
    folders = {"diffusers": save_diffusers(root / "diffusers"), "pipeline": save_pipeline(root / "pipeline")}
    convert.hf_to_mega(folders["diffusers"], root / "mega", expect="qwen_image")
    folders["mega"] = root / "mega"
    return folders, reference_output(folders["diffusers"])


@pytest.fixture
def hf_folder(tmp_path):
    return save_diffusers(tmp_path / "hf", shards="10GB")


# ----------------------------------------------------------------------------- tables


def test_shape_table_and_rule_table_cover_every_diffusers_tensor():
    from diffusers import QwenImageTransformer2DModel

    model = diffusers_model()
    dims = from_diffusers_config(dict(model.config))
    assert dims == QWEN_IMAGE_PRESETS["tiny"]
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert diffusers_shapes(dims) == expected
    assert {s for rule in diffusers_weight_rules(dims) for s in rule.sources} == set(expected)
    # and at full size, against diffusers' model built on the meta device (no memory)
    full = QWEN_IMAGE_PRESETS["qwen-image"]
    config = {k: v for k, v in to_diffusers_config(full).items() if k != "_class_name"}
    with torch.device("meta"):
        big = QwenImageTransformer2DModel(**config)
    assert diffusers_shapes(full) == {name: tuple(p.shape) for name, p in big.named_parameters()}


def test_registry_names_each_architecture_once():
    assert set(registry()) == {"wan", "qwen_image"}
    qwen = registry()["qwen_image"]
    assert qwen.hf_layouts == ("diffusers",) and qwen.experts is None
    assert qwen.model_class is QwenImageModel and qwen.diffusers_class == "QwenImageTransformer2DModel"
    assert registry()["wan"].hf_layouts == ("diffusers", "original")


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_is_bitwise_and_loads_in_diffusers(tmp_path, dtype):
    from diffusers import QwenImageTransformer2DModel

    src = save_diffusers(tmp_path / "hf", dtype=dtype)
    assert len(list(src.glob("*.safetensors"))) > 1  # the source is sharded too
    convert.hf_to_mega(src, tmp_path / "mega", expect="qwen_image", max_shard_bytes=parse_size(SMALL_SHARDS))
    convert.mega_to_hf(tmp_path / "mega", tmp_path / "back", expect="qwen_image")
    assert len(list((tmp_path / "mega").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "mega" / "model.safetensors.index.json").is_file()
    source = read_folder(src)
    assert_bitwise_equal(read_folder(tmp_path / "back"), source)
    assert {t.dtype for t in source.values()} == (
        {torch.float32} if dtype == torch.float32 else {torch.bfloat16, torch.float32}
    )
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    if dtype == torch.float32:  # the export is a working diffusers model with the same output
        with torch.no_grad():
            want = diffusers_velocity(QwenImageTransformer2DModel.from_pretrained(src).eval(), *inputs())
            got = diffusers_velocity(QwenImageTransformer2DModel.from_pretrained(tmp_path / "back").eval(), *inputs())
        assert torch.equal(got, want)


def test_mega_format_holds_full_fused_tensors_under_own_names(saved):
    folders, _ = saved
    config = json.loads((folders["mega"] / "config.json").read_text())
    assert config["format"] == "phased-dmd-mega" and config["family"] == "qwen_image"
    assert (
        QwenImageDims(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["architecture"].items()})
        == QWEN_IMAGE_PRESETS["tiny"]
    )
    assert config["provenance"]["source_layout"] == "diffusers"
    mega, hf = read_folder(folders["mega"]), read_folder(folders["diffusers"])
    assert set(mega) == {rule.own for rule in diffusers_weight_rules(QWEN_IMAGE_PRESETS["tiny"])}
    # megatron's fused qkv of the text stream: per head [q_h, k_h, v_h], 16 rows each
    q, k, v = (hf[f"transformer_blocks.1.attn.add_{p}_proj.weight"].reshape(4, 16, 64) for p in "qkv")
    assert torch.equal(mega["blocks.1.attention.txt.linear_qkv.weight"], torch.stack([q, k, v], 1).reshape(192, 64))


def test_pipeline_root_and_a_preset_name(tmp_path, saved):
    """A pipeline root converts like its transformer/; "tiny" is resolved among Qwen-Image's
    presets for a Qwen-Image folder (Wan has a "tiny" preset too)."""
    folders, _ = saved
    convert.hf_to_mega(folders["pipeline"], tmp_path / "mega", expect="tiny")
    assert json.loads((tmp_path / "mega" / "config.json").read_text())["family"] == "qwen_image"
    assert_bitwise_equal(read_folder(tmp_path / "mega"), read_folder(folders["mega"]))


# ----------------------------------------------------------------------------- load_pretrained


def load_and_run(folder, expect="qwen_image", **options):
    model = load_pretrained(folder, expect=expect, attention_backend="sdpa", **options).eval()
    assert isinstance(model, QwenImageModel)
    with torch.no_grad():
        return model(*inputs()), model.par


in_process = with_parallel_state


@pytest.mark.parametrize("fmt, expect", [("diffusers", "qwen_image"), ("pipeline", "qwen_image"), ("mega", None)])
def test_tp1_load_pretrained_matches_diffusers(saved, fmt, expect):
    folders, reference = saved
    out, par = in_process(load_and_run, folders[fmt], expect=expect, recompute="full")
    assert rel_error(out, reference) < TOLERANCE
    assert par.recompute == "full" and par.sequence_parallel is False and par.initialize is False


def _tp2_outputs(folders):
    parallel.initialize(tensor_parallel=2, sequence_parallel=True)
    try:
        return {fmt: load_and_run(folders[fmt]) for fmt in ("diffusers", "mega")}
    finally:
        parallel.destroy()


@pytest.mark.slow
def test_tp2_load_pretrained_matches_diffusers(saved):
    """Each rank reads its slices; sequence parallelism comes from the parallel layout."""
    folders, reference = saved
    for outputs in run_distributed(_tp2_outputs, 2, folders):
        for fmt, (out, par) in outputs.items():
            assert rel_error(out, reference) < TOLERANCE, fmt
            assert par.sequence_parallel is True


def test_load_pretrained_expecting_the_wrong_family_is_refused(saved):
    folders, _ = saved
    with pytest.raises(
        CheckpointError,
        match=r"is a phased-dmd-mega 'qwen_image' config \(Qwen-Image\).* as expected "
        r"\('wan'\); expect 'qwen_image'",
    ):
        in_process(load_pretrained, folders["mega"], expect="wan")


# ----------------------------------------------------------------------------- bad input


def test_missing_keys_are_listed(tmp_path, hf_folder):
    rewrite_single_file(hf_folder, lambda s: s.pop("transformer_blocks.1.attn.add_k_proj.bias"))
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(hf_folder, dst, expect="qwen_image"),
        r"missing keys \(1\): transformer_blocks\.1\.attn\.add_k_proj\.bias$",
        dst,
    )


def test_unexpected_keys_are_listed(tmp_path, hf_folder):
    rewrite_single_file(hf_folder, lambda s: s.update({"pos_embed.freqs": torch.zeros(2)}))
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(hf_folder, dst, expect="qwen_image"), r"unexpected keys \(1\): pos_embed\.freqs", dst
    )


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, hf_folder):
    rewrite_single_file(hf_folder, lambda s: s.update({"transformer_blocks.0.img_mod.1.weight": torch.zeros(380, 64)}))
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(hf_folder, dst, expect="qwen_image"),
        r"transformer_blocks\.0\.img_mod\.1\.weight: \(380, 64\) in the weights, "
        r"\(384, 64\) from the config",
        dst,
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_layers", 3, r"do not match .*config\.json \(.*3 layers.*missing keys \(\d+\): transformer_blocks\.2\."),
        ("joint_attention_dim", 32, r"txt_norm\.weight: \(24,\) in the weights, \(32,\) from the config"),
        ("attention_head_dim", 8, r"config\.json: axes_dims_rope \(4, 6, 6\) must be even and sum to head_dim 8"),
        ("zero_cond_t", True, r"config\.json: unsupported Qwen-Image variant: zero_cond_t=True"),
    ],
)
def test_a_config_that_disagrees_with_the_weights_is_refused(tmp_path, hf_folder, field, value, message):
    config = json.loads((hf_folder / "config.json").read_text())
    config[field] = value
    (hf_folder / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "mega"
    assert_refused(lambda: convert.hf_to_mega(hf_folder, dst, expect="qwen_image"), re.compile(message, re.S), dst)


def test_tensor_parallel_that_does_not_divide_the_heads_is_refused(tmp_path, hf_folder):
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(hf_folder, dst, expect="qwen_image", tensor_parallel=3),
        r"tensor parallel size 3 does not divide the 4 attention heads of this Qwen-Image model",
        dst,
    )


@pytest.mark.parametrize(
    "expect, message",
    [
        (
            "wan",
            r"hf/config\.json is a diffusers QwenImageTransformer2DModel config \(Qwen-Image\), neither a diffusers "
            r"WanTransformer3DModel config, an original Wan config .* nor a phased-dmd-mega 'wan' config as expected "
            r"\('wan'\); expect 'qwen_image' or a Qwen-Image preset \(qwen-image, tiny\)",
        ),
        ("wan2.1-t2v-1.3b", r"\(Qwen-Image\), neither .* as expected \('wan2\.1-t2v-1\.3b', a Wan preset\);"),
        ("qwen-image", r"is not preset 'qwen-image': num_heads 4 \(preset 24\), head_dim 16 \(preset 128\)"),
        ("flux", r"unknown family or preset 'flux': expected 'wan' or 'qwen_image' or a preset \(wan: "),
    ],
)
def test_an_expected_name_that_does_not_match_the_folder_is_refused(tmp_path, hf_folder, expect, message):
    dst = tmp_path / "mega"
    assert_refused(lambda: convert.hf_to_mega(hf_folder, dst, expect=expect), message, dst)


def test_a_wan_folder_converted_as_qwen_image_is_refused(tmp_path):
    src = save_wan_diffusers(tmp_path / "wan")
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(src, dst, expect="qwen_image"),
        r"is a diffusers WanTransformer3DModel config \(Wan\), neither a diffusers "
        r"QwenImageTransformer2DModel config nor a phased-dmd-mega 'qwen_image' config "
        r"as expected \('qwen_image'\); expect 'wan'",
        dst,
    )


def test_mega_to_hf_refuses_the_wrong_family_and_the_original_layout(tmp_path, saved):
    folders, _ = saved
    dst = tmp_path / "back"
    assert_refused(
        lambda: convert.mega_to_hf(folders["mega"], dst, expect="wan"),
        r"is a phased-dmd-mega 'qwen_image' config \(Qwen-Image\), neither",
        dst,
    )
    assert_refused(
        lambda: convert.mega_to_hf(folders["mega"], dst, expect="qwen_image", layout="original"),
        r"is Qwen-Image, which has no original layout \(it has diffusers, mega\)",
        dst,
    )


def test_a_mega_config_that_disagrees_with_its_weights_is_refused(tmp_path, saved):
    folders, _ = saved
    mega = Path(shutil.copytree(folders["mega"], tmp_path / "mega"))
    config = json.loads((mega / "config.json").read_text())
    config["architecture"]["text_dim"] = 32
    (mega / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "back"
    assert_refused(
        lambda: convert.mega_to_hf(mega, dst, expect="qwen_image"),
        r"txt_norm\.weight: \(24,\) in the weights, \(32,\) from the config",
        dst,
    )


def test_a_pipeline_with_a_second_transformer_is_refused(tmp_path):
    root = save_pipeline(tmp_path / "pipe")
    save_diffusers(root / "transformer_2", seed=1)
    dst = tmp_path / "mega"
    assert_refused(
        lambda: convert.hf_to_mega(root, dst, expect="qwen_image"),
        r"laid out as two experts \(high and low noise\), but a Qwen-Image checkpoint holds one model",
        dst,
    )
    assert not inspect_checkpoint(tmp_path / "pipe" / "transformer").has_experts


# ----------------------------------------------------------------------------- command line


def test_cli_converts_expecting_qwen_image(tmp_path, hf_folder):
    script = Path(sys.executable).parent / "phased-dmd"
    run = subprocess.run(
        [
            str(script),
            "convert",
            "hf-to-mega",
            "--expect",
            "qwen_image",
            "--src",
            str(hf_folder),
            "--dst",
            str(tmp_path / "mega"),
            "--tp",
            "2",
            "--max-shard-size",
            SMALL_SHARDS,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote model-00001-of-" in run.stderr  # progress, one line per shard
    config = json.loads((tmp_path / "mega" / "config.json").read_text())
    assert config["family"] == "qwen_image" and config["tensor_parallel"] == 2
    convert.mega_to_hf(tmp_path / "mega", tmp_path / "back", expect="qwen_image")
    assert_bitwise_equal(read_folder(tmp_path / "back"), read_folder(hf_folder))
