"""Bad input that `phased-dmd train` refuses before any model loads (a deterministic failure found
only at the step that first touches it would come back after minutes of loading at every
requeue): mixture resolutions that the VAE or the token patch cannot take, for a teacher folder
and for a preset; the refusal names data.resolutions[i], loads nothing and writes nothing."""

import re

import pytest

from phased_dmd_mega import cli

from helpers.tiny_runs import forbid_loading, save_qwen_teacher, save_wan_teacher, write_config

GOOD = {"frames": 1, "height": 32, "width": 48, "probability": 0.5}

WAN_REFUSALS = [
    (
        {"frames": 80, "height": 32, "width": 48},
        r"frames 80 is not 1 or 4k\+1 \(the VAE compresses 4 frames into one latent frame after the first\): 77 or 81",
    ),
    (
        {"frames": 5, "height": 40, "width": 48},
        r"height 40 is not a multiple of 16 \(the VAE's 8x compression times the 2-latent token patch\): 32 or 48",
    ),
    ({"frames": 1, "height": 32, "width": 36}, r"width 36 is not a multiple of 16 .*: 32 or 48"),
]


def assert_refused_before_loading(tmp_path, capsys, monkeypatch, config, index, resolution, message):
    forbid_loading(monkeypatch)
    capsys.readouterr()
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    text = "x".join(str(resolution[k]) for k in ("frames", "height", "width"))
    assert re.search(rf"data\.resolutions\[{index}\] \({text}\): {message}", err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad, message", WAN_REFUSALS)
def test_a_resolution_the_vae_or_patch_cannot_take_is_refused_before_the_teacher_loads(
    tmp_path, capsys, monkeypatch, bad, message
):
    teacher = save_wan_teacher(tmp_path / "teacher")
    resolutions = [GOOD, {**bad, "probability": 0.5}]
    config = write_config(
        tmp_path, model={"preset": None, "teacher_path": str(teacher)}, data={"resolutions": resolutions}
    )
    assert_refused_before_loading(tmp_path, capsys, monkeypatch, config, 1, bad, message)


def test_a_preset_run_checks_its_resolutions_too(tmp_path, capsys, monkeypatch):
    bad, message = WAN_REFUSALS[1]
    config = write_config(tmp_path, data={"resolutions": [{**bad, "probability": 1.0}]})
    assert_refused_before_loading(tmp_path, capsys, monkeypatch, config, 0, bad, message)


# Wan2.2-TI2V-5B's geometry: the 48-channel Wan2.2 VAE compresses 16x, a token covers 32 x 32 pixels.
TI2V_5B_TINY = {"in_channels": 48, "out_channels": 48}


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"frames": 5, "height": 48, "width": 64},
            r"height 48 is not a multiple of 32 \(the VAE's 16x compression times the 2-latent token patch\): 32 or 64",
        ),
        ({"frames": 1, "height": 32, "width": 80}, r"width 80 is not a multiple of 32 .*: 64 or 96"),
    ],
)
def test_a_ti2v_5b_teacher_takes_multiples_of_32_pixels(tmp_path, capsys, monkeypatch, bad, message):
    teacher = save_wan_teacher(tmp_path / "teacher", **TI2V_5B_TINY)
    good = {"frames": 5, "height": 32, "width": 64, "probability": 0.5}
    config = write_config(
        tmp_path,
        model={"preset": None, "teacher_path": str(teacher)},
        data={"resolutions": [good, {**bad, "probability": 0.5}]},
    )
    assert_refused_before_loading(tmp_path, capsys, monkeypatch, config, 1, bad, message)


def test_the_5b_presets_geometry_is_the_wan22_vaes():
    from phased_dmd_mega.distill.build import latent_geometry
    from phased_dmd_mega.models.wan import WAN_PRESETS

    geometry = latent_geometry(WAN_PRESETS["wan2.2-ti2v-5b"])
    assert (geometry.channels, geometry.temporal, geometry.spatial) == (48, 4, 16)
    assert geometry.latent_shape(121, 704, 1280) == (48, 31, 44, 80)  # the 5B's 720p
    assert latent_geometry(WAN_PRESETS["wan2.1-t2v-14b"]).spatial == 8


def test_an_image_model_refuses_a_video_resolution(tmp_path, capsys, monkeypatch):
    teacher = save_qwen_teacher(tmp_path / "teacher")
    bad = {"frames": 5, "height": 32, "width": 48}
    config = write_config(
        tmp_path,
        model={"family": "qwen_image", "preset": None, "teacher_path": str(teacher)},
        data={"resolutions": [GOOD, {**bad, "probability": 0.5}]},
    )
    assert_refused_before_loading(tmp_path, capsys, monkeypatch, config, 1, bad, r"frames 5: the model takes at most 1")
