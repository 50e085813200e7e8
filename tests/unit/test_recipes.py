"""The cluster recipes (examples/*.yaml): real config keys, the published settings (spec
phased_dmd.md sections 6 and 7), shapes the models accept, parallel sizes that fit an 8-GPU
node, and the two trainer guards they rely on (the teacher must be the recipe's preset; the
I2V recipe is refused without image conditions, never run as text-to-video)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phased_dmd_mega.config import config_from_dict, load_config
from phased_dmd_mega.models.architectures import registry
from phased_dmd_mega.testing import with_parallel_state

from helpers import RECIPES, REPO_ROOT

ROOT = REPO_ROOT
GPUS_PER_NODE = 8

# Spec section 7.
WAN_VIDEO = [(81, 720, 1280, 0.1), (81, 1280, 720, 0.1), (81, 480, 832, 0.4), (81, 832, 480, 0.4)]
# 1382 x 1382 of the spec is not a multiple of 16 (8x VAE, 2x2 packing): Qwen-Image's own 1328.
QWEN_IMAGE = [
    (1, 1328, 1328),
    (1, 1664, 928),
    (1, 928, 1664),
    (1, 1472, 1104),
    (1, 1104, 1472),
    (1, 1584, 1056),
    (1, 1056, 1584),
]


def recipe(name, *overrides):
    return load_config(ROOT / f"examples/{name}.yaml", overrides)


def resolutions(cfg):
    return [(r.frames, r.height, r.width, r.probability) for r in cfg.data.resolutions]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_with_the_cli_dry_run(name):
    script = shutil.which("phased-dmd", path=str(Path(sys.executable).parent))
    result = subprocess.run(
        [script, "train", "--config", f"examples/{name}.yaml", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"name: {name}" in result.stdout


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_uses_the_published_settings(name):
    cfg = recipe(name)
    phases, opt = cfg.phases, cfg.optimizer
    assert (phases.method, phases.num_steps, phases.num_phases) == ("phased_dmd", 4, 2)
    assert phases.fake_updates_per_generator_update == 5
    assert 4.0 <= phases.guidance_scale <= 6.0
    for adam in (opt.generator, opt.fake):
        assert adam.betas == [0.0, 0.999] and adam.weight_decay == 0.01
    assert opt.fake.lr == 4e-7 and opt.grad_clip == 1.0 and opt.ema_decay == 0.99
    if cfg.model.lora.rank:
        assert (cfg.model.lora.rank, cfg.model.lora.alpha, opt.generator.lr) == (64, 8.0, 5e-5)
    else:
        assert opt.generator.lr == 2e-6
    assert cfg.model.preset in registry()[cfg.model.family].presets


def test_model_specific_settings():
    assert recipe("wan22_t2v_a14b").phases.expert_boundary == 0.875
    assert recipe("wan22_i2v_a14b").phases.expert_boundary == 0.9
    for name in ("wan21_t2v_14b", "wan21_t2v_1_3b", "wan21_14b_to_1_3b", "wan22_ti2v_5b", "qwen_image"):
        assert recipe(name).phases.expert_boundary is None
    for name in ("wan22_t2v_a14b", "wan22_i2v_a14b", "wan21_t2v_14b", "wan21_t2v_1_3b", "wan21_14b_to_1_3b"):
        assert recipe(name).phases.shift == 5.0
    # The 5B's 720p in both orientations, multiples of 32 pixels (its 16x VAE, 2x2 token patch).
    assert resolutions(recipe("wan22_ti2v_5b")) == [(121, 704, 1280, 0.5), (121, 1280, 704, 0.5)]
    assert recipe("qwen_image").phases.shift == 3.0
    for name in ("wan22_t2v_a14b", "wan22_i2v_a14b", "wan21_t2v_14b"):
        assert resolutions(recipe(name)) == WAN_VIDEO
    for name in ("wan21_t2v_1_3b", "wan21_14b_to_1_3b"):
        assert resolutions(recipe(name)) == [(81, 480, 832, 0.5), (81, 832, 480, 0.5)]
    qwen = resolutions(recipe("qwen_image"))
    assert [r[:3] for r in qwen] == QWEN_IMAGE
    assert all(abs(r[3] - 1 / 7) < 1e-6 for r in qwen)


@pytest.mark.parametrize("name", RECIPES)
def test_every_resolution_makes_whole_patches(name):
    cfg = recipe(name)
    dims = registry()[cfg.model.family].presets[cfg.model.preset]
    patch = dims.patch_size if cfg.model.family == "wan" else (1, dims.patch_size, dims.patch_size)
    geometry = registry()[cfg.model.family].latent_geometry(dims)
    for r in cfg.data.resolutions:
        _, frames, height, width = geometry.latent_shape(r.frames, r.height, r.width)
        assert frames % patch[0] == 0 and height % patch[1] == 0 and width % patch[2] == 0, r


@pytest.mark.parametrize("name", RECIPES)
def test_parallel_sizes_fit_an_eight_gpu_node(name):
    cfg = recipe(name)
    presets = registry()[cfg.model.family].presets
    replica = cfg.parallel.tensor_parallel * cfg.parallel.ulysses_parallel
    assert GPUS_PER_NODE % replica == 0
    for preset in filter(None, (cfg.model.preset, cfg.model.student_preset)):  # the teacher's and the student's
        assert presets[preset].num_heads % replica == 0, preset
    assert cfg.parallel.sequence_parallel and cfg.model.recompute == "full"


@pytest.mark.parametrize("name", RECIPES)
def test_every_resolution_of_a_recipe_fits_its_vae_and_token_patch(name):
    """No false refusal: the recipes' mixtures pass the check run before the teacher loads."""
    from phased_dmd_mega.distill.build import check_resolutions

    cfg = recipe(name)
    architecture = registry()[cfg.model.family]
    dims = architecture.presets[cfg.model.preset]
    check_resolutions(cfg, dims, architecture.latent_geometry(dims))


def test_i2v_recipe_is_refused_without_image_conditions():
    """The I2V teacher takes 36 channels; without first-frame latents in the prompt cache the
    trainer must refuse it rather than train T2V."""
    from phased_dmd_mega.distill.build import latent_geometry

    cfg = recipe("wan22_i2v_a14b")
    dims = registry()["wan"].presets[cfg.model.preset]
    assert (dims.in_channels, dims.out_channels) == (36, 16)
    with pytest.raises(ValueError, match="extra channels are an image condition .* the prompt source has none"):
        latent_geometry(dims)


@pytest.fixture(scope="module")
def tiny_wan_folder(tmp_path_factory):
    import torch
    from diffusers import WanTransformer3DModel

    from helpers.tiny_models import WAN_TINY

    folder = tmp_path_factory.mktemp("wan_tiny")
    torch.manual_seed(0)
    WanTransformer3DModel(**WAN_TINY).save_pretrained(folder)
    return folder


def _teacher_dims(cfg):
    from phased_dmd_mega.distill.build import build_teacher

    return with_parallel_state(lambda: build_teacher(cfg).high.dims)


def test_teacher_must_be_the_recipes_preset(tiny_wan_folder):
    from phased_dmd_mega.models.architectures import CheckpointError

    model = {"family": "wan", "teacher_path": str(tiny_wan_folder), "dtype": "float32", "attention_backend": "sdpa"}
    assert _teacher_dims(config_from_dict({"model": model})).dim == 48  # no preset: the folder decides
    with pytest.raises(CheckpointError, match=r"is not preset 'wan2.1-t2v-1.3b': dim 48 \(preset 1536\)"):
        _teacher_dims(config_from_dict({"model": {**model, "preset": "wan2.1-t2v-1.3b"}}))


def test_the_student_recipe_distils_14b_into_1_3b_of_the_same_latent_space():
    from phased_dmd_mega.distill.build import SHARED_WITH_TEACHER

    cfg = recipe("wan21_14b_to_1_3b")
    presets = registry()["wan"].presets
    assert (cfg.model.preset, cfg.model.student_preset) == ("wan2.1-t2v-14b", "wan2.1-t2v-1.3b")
    teacher, student = presets[cfg.model.preset], presets[cfg.model.student_preset]
    assert student.dim < teacher.dim
    for field in SHARED_WITH_TEACHER:
        assert getattr(student, field) == getattr(teacher, field), field
    assert cfg.model.lora.rank == 0 and cfg.data.batch_size % cfg.data.micro_batch_size == 0
