"""``phased-dmd sample`` and the trainer's periodic samples.

The references: ``distill.phased.sample`` run in the training process on the trainer's own
generators (tiny_runs.py), and diffusers' own VAEs and post-processing for the decoded frames,
with the latents denormalised by the formula of the diffusers pipelines.
"""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from phased_dmd_mega import cli
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.distill.phased import sample
from phased_dmd_mega.prompt_cache.writer import write_embeddings_cache
from phased_dmd_mega.sample import decode, load_vae, sample_noise
from phased_dmd_mega.schedule import PhaseLayout

from helpers import rel_error
from helpers.damaged_files import (
    DAMAGE_MESSAGES,
    WriteFailed,
    assert_failed_on,
    assert_left_as_before,
    assert_nothing_left,
    damage,
    failing_after,
    folder_contents,
    last_file,
    written_in_staging,
)
from helpers.tiny_models import save_tiny_wan_vae
from helpers.tiny_runs import save_wan_teacher, train_tiny

RESOLUTION = (5, 32, 48)  # pixels: 5 frames -> 2 latent frames of 4 x 6
INDICES, SEED = [2, 0, 3], 7
TOLERANCE = 1e-6


def run_sample(*args) -> int:
    return cli.main(["sample", *map(str, args)])


def read_latents(folder):
    return load_file(str(folder / "latents.safetensors"))


def _references(trainer):
    """What the sampler gives for prompts INDICES with noise seeded SEED + i (one call per sample),
    with the generators and with their EMA copies; and the periodic samples' own inputs."""
    shape = (4, 2, 4, 6)
    noise = sample_noise(shape, [SEED + i for i in range(len(INDICES))])
    condition = trainer.prompts.rows(INDICES)

    def run(generators):
        return torch.cat(
            [
                sample(generators, trainer.layout, noise[i : i + 1], condition.select(torch.tensor([i])))
                for i in range(len(INDICES))
            ]
        )

    periodic = trainer.samples
    return {
        "generators": run([role.model for role in trainer.generators]),
        "ema": run(trainer.ema),
        "periodic": sample(trainer.sampling_generators(), trainer.layout, periodic.noise, periodic.condition),
        "context": trainer.prompts.context.clone(),
    }


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wan_sample")
    frames, height, width = RESOLUTION
    overrides = [
        "optimizer.ema_decay=0.5",
        "logging.sample_every=3",
        "logging.sample_count=2",
        f"data.resolutions=[{{frames: {frames}, height: {height}, width: {width}}}]",
    ]
    return train_tiny(tmp, "run", save_wan_teacher(tmp / "teacher"), overrides, extra=_references)


@pytest.fixture(scope="module")
def wan_vae(tmp_path_factory):
    return save_tiny_wan_vae(tmp_path_factory.mktemp("vae"))


# ----------------------------------------------------------------------------- the sampler


def test_every_step_runs_the_generator_of_its_phase():
    layout = PhaseLayout.build(4, steps_per_phase=(1, 3), shift=5.0)
    calls = []

    def generator(phase):
        def velocity(x, t, condition):
            calls.append((phase, float(t[0])))
            return torch.zeros_like(x)

        return velocity

    sample([generator(0), generator(1)], layout, torch.zeros(1, 2), Condition(torch.zeros(1, 1, 1)))
    assert [phase for phase, _ in calls] == [0, 1, 1, 1]
    assert [t for _, t in calls] == pytest.approx(layout.times[:-1])


# ----------------------------------------------------------------------------- from a checkpoint


def test_sample_from_a_checkpoint_equals_the_in_process_sampler(wan_run, tmp_path):
    indices = ",".join(map(str, INDICES))
    assert (
        run_sample(
            "--checkpoint",
            wan_run.checkpoints,
            "-o",
            tmp_path / "s",
            "--indices",
            indices,
            "--seed",
            SEED,
            "--batch-size",
            2,
        )
        == 0
    )
    saved = read_latents(tmp_path / "s")
    torch.testing.assert_close(saved["latents"], wan_run.extra["generators"], rtol=TOLERANCE, atol=TOLERANCE)
    assert saved["prompt_index"].tolist() == INDICES and saved["seed"].tolist() == [7, 8, 9]
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert (
        record["iteration"] == 3 and record["resolution"] == list(RESOLUTION) and record["latent_shape"] == [4, 2, 4, 6]
    )

    assert (
        run_sample(
            "--checkpoint", wan_run.checkpoints, "-o", tmp_path / "ema", "--indices", indices, "--seed", SEED, "--ema"
        )
        == 0
    )
    ema = read_latents(tmp_path / "ema")["latents"]
    torch.testing.assert_close(ema, wan_run.extra["ema"], rtol=TOLERANCE, atol=TOLERANCE)
    assert rel_error(ema, saved["latents"]) > 1e-4  # the EMA copies are other generators


def test_sampling_from_a_checkpoint_uses_the_runs_float32_precision(wan_run, tmp_path, float32_precision):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    assert (
        run_sample("--checkpoint", wan_run.checkpoints, "-o", tmp_path / "s", "--indices", "0", "run.tf32=false") == 0
    )
    assert float32_precision() == (False, False, "ieee")


def test_exported_generators_and_a_prompt_cache_give_the_same_latents(wan_run, tmp_path):
    assert cli.main(["export", "--checkpoint", str(wan_run.checkpoints), "--dst", str(tmp_path / "exported")]) == 0
    # The trainer's synthetic prompts (4, seed 0), as a prompt cache on disk.
    context = wan_run.extra["context"]
    cache = write_embeddings_cache(
        tmp_path / "cache", list(context), torch.zeros_like(context[0]), pad_to=context.shape[1]
    )
    indices, resolution = ",".join(map(str, INDICES)), "x".join(map(str, RESOLUTION))
    assert (
        run_sample(
            "--exported",
            tmp_path / "exported",
            "-o",
            tmp_path / "a",
            "--indices",
            indices,
            "--seed",
            SEED,
            "--prompts",
            cache,
            "--resolution",
            resolution,
            "--attention-backend",
            "sdpa",
        )
        == 0
    )
    torch.testing.assert_close(
        read_latents(tmp_path / "a")["latents"], wan_run.extra["generators"], rtol=1e-5, atol=1e-5
    )
    assert (
        run_sample(
            "--exported",
            tmp_path / "exported",
            "-o",
            tmp_path / "b",
            "--indices",
            indices,
            "--seed",
            SEED,
            "--synthetic-prompts",
            4,
            "--resolution",
            resolution,
        )
        == 0
    )
    torch.testing.assert_close(
        read_latents(tmp_path / "b")["latents"], wan_run.extra["generators"], rtol=1e-5, atol=1e-5
    )


def test_the_trainer_writes_samples_every_sample_every_iterations(wan_run):
    folders = sorted(p.name for p in (wan_run.root / "samples").iterdir())
    assert folders == ["iter_0000002", "iter_0000003"]  # every 3 iterations, and the last
    last = read_latents(wan_run.root / "samples" / "iter_0000003")
    torch.testing.assert_close(last["latents"], wan_run.extra["periodic"], rtol=TOLERANCE, atol=TOLERANCE)
    assert last["prompt_index"].tolist() == [0, 1]
    assert json.loads((wan_run.root / "samples" / "iter_0000003" / "samples.json").read_text())["iteration"] == 3


# ----------------------------------------------------------------------------- decoding


def pipeline_decode(vae, latents):
    """What diffusers' Wan and Qwen-Image pipelines do after the denoising loop (output_type pil)."""
    from diffusers.video_processor import VideoProcessor

    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
        latents.device, latents.dtype
    )
    with torch.no_grad():
        video = vae.decode(latents / std + mean, return_dict=False)[0]
    return VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="pil")


def test_decoded_frames_are_the_vaes_own_decode(wan_run, wan_vae, tmp_path, caplog):
    from diffusers import AutoencoderKLWan

    assert run_sample("--checkpoint", wan_run.checkpoints, "-o", tmp_path / "s", "-n", 2, "--vae", wan_vae) == 0
    latents = read_latents(tmp_path / "s")["latents"]
    vae = AutoencoderKLWan.from_pretrained(wan_vae).eval()
    # One sample per decode, as sample.decode does (a batch of two rounds a few pixels differently).
    expected = [frames for one in latents.split(1) for frames in pipeline_decode(vae, one)]
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    for i, frames in enumerate(expected):
        assert len(frames) == 5 and record["samples"][i]["num_frames"] == 5
        for j, frame in enumerate(frames):
            written = np.array(Image.open(tmp_path / "s" / f"sample_{i:04d}" / f"frame_{j:04d}.png"))
            assert written.shape == (32, 48, 3) and np.array_equal(written, np.array(frame)), (i, j)
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        assert "mp4 files not written" in caplog.text and "video" not in record["samples"][0]


def test_qwen_image_latents_decode_like_the_pipeline(tmp_path):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(4)
    AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).save_pretrained(
        tmp_path / "vae"
    )
    vae = load_vae(tmp_path / "vae", "qwen_image")
    latents = torch.randn(2, 16, 1, 4, 6, generator=torch.Generator().manual_seed(0))
    frames = decode(vae, latents)
    assert frames.shape == (2, 1, 32, 48, 3) and frames.dtype == torch.uint8
    for got, (want,) in zip(frames, [frames for one in latents.split(1) for frames in pipeline_decode(vae, one)]):
        assert np.array_equal(got[0].numpy(), np.array(want))


# ----------------------------------------------------------------------------- refusals


def test_bad_sampling_requests_are_refused(wan_run, tmp_path, capsys):
    cases = [
        (["--checkpoint", wan_run.checkpoints, "--indices", "1,9"], "prompt indices \\[9\\] are outside the 4 prompts"),
        (["--checkpoint", wan_run.checkpoints, "--vae", tmp_path], "is neither a VAE folder"),
        (["--exported", wan_run.checkpoints], "phased_dmd.json is missing"),
        (["--exported", tmp_path, "model.dtype=float32"], "overrides change a checkpoint's config"),
    ]
    for args, message in cases:
        assert run_sample(*args, "-o", tmp_path / "out") == 2
        assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    lora_export = tmp_path / "lora"
    lora_export.mkdir()
    (lora_export / "phased_dmd.json").write_text(
        json.dumps(
            {
                "format": "phased-dmd-export",
                "format_version": 1,
                "weights": "lora",
                "source": {"checkpoint": "/run/iter_1"},
            }
        )
    )
    assert run_sample("--exported", lora_export, "-o", tmp_path / "out") == 2
    assert "holds LoRA files, which need their base model" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["exported", "prompts", "teacher"])
def test_a_damaged_weights_or_prompt_file_fails_sampling_in_one_line(wan_run, tmp_path, capsys, source):
    """An export's weights, a prompt cache's shard, the teacher whose shapes a checkpoint's
    generators are built from: each refused before any sample is drawn."""
    args = ["--checkpoint", wan_run.checkpoints, "--indices", "0"]
    if source == "exported":
        assert cli.main(["export", "--checkpoint", str(wan_run.checkpoints), "--dst", str(tmp_path / "exported")]) == 0
        file = damage(tmp_path / "exported" / "transformer_2" / "diffusion_pytorch_model.safetensors", "truncated")
        args = ["--exported", tmp_path / "exported", "--resolution", "x".join(map(str, RESOLUTION))]
    elif source == "prompts":
        context = wan_run.extra["context"]
        cache = write_embeddings_cache(
            tmp_path / "cache", list(context), torch.zeros_like(context[0]), pad_to=context.shape[1]
        )
        file = damage(cache / "shard-00000.safetensors", "corrupt_header")
        args += ["--prompts", cache]
    else:
        teacher = shutil.copytree(wan_run.config.model.teacher_path, tmp_path / "teacher")
        file = damage(last_file(teacher), "truncated")
        args += [f"model.teacher_path={teacher}"]
    capsys.readouterr()
    status = run_sample(*args, "-o", tmp_path / "out")
    how = "corrupt_header" if source == "prompts" else "truncated"
    assert_failed_on(status, capsys.readouterr().err, file, DAMAGE_MESSAGES[how])
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_sampling_failing_partway_leaves_no_output_and_the_replaced_one_intact(
    wan_run, tmp_path, monkeypatch, existing
):
    """latents.safetensors is written, samples.json fails."""
    from phased_dmd_mega import sample as sampling

    out = tmp_path / "out"
    if existing:
        assert run_sample("--checkpoint", wan_run.checkpoints, "-o", out, "--indices", "1") == 0
    before = folder_contents(out) if existing else None
    latents = failing_after(sampling.write_latents, 1)
    monkeypatch.setattr(sampling, "write_latents", latents)
    monkeypatch.setattr(sampling, "write_json", failing_after(sampling.write_json, 0))
    with pytest.raises(WriteFailed):
        run_sample(
            "--checkpoint", wan_run.checkpoints, "-o", out, "--indices", "0", *(["--overwrite"] if existing else [])
        )
    assert written_in_staging(latents.done, out)
    assert_left_as_before(out, before)


# ----------------------------------------------------------------------------- tensor parallel


@pytest.mark.slow
def test_sampling_at_tensor_parallel_2_under_torchrun_matches_one_process(wan_run, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "phased_dmd_mega",
        "sample",
        "--checkpoint",
        str(wan_run.checkpoints),
        "-o",
        str(tmp_path / "tp2"),
        "--tp",
        "2",
        "--indices",
        ",".join(map(str, INDICES)),
        "--seed",
        str(SEED),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    torch.testing.assert_close(
        read_latents(tmp_path / "tp2")["latents"], wan_run.extra["generators"], rtol=1e-5, atol=1e-5
    )
