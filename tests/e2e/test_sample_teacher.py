"""``phased-dmd sample --teacher``: the run's teacher as a many-step guided Euler sampler.

The reference: the teacher loaded by diffusers (``WanTransformer3DModel``, the experts of a
Wan2.2-A14B-style pipeline root), run in an explicit Euler loop written here over the shifted
table ``shift(1 - i/N)``, with ``uncond + g * (cond - uncond)`` and, for two experts, the expert
chosen by ``t >= boundary``; the noise of sample i drawn here with seed ``seed + i``.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from phased_dmd_mega import cli
from phased_dmd_mega.prompt_cache.writer import write_embeddings_cache

from helpers import rel_error
from helpers.parity import qwen_diffusers_velocity
from helpers.tiny_runs import save_a14b_teacher, save_qwen_teacher, save_wan_teacher, train_tiny

RESOLUTION = (5, 32, 48)  # pixels: 5 frames -> 2 latent frames of 4 x 6
LATENT_SHAPE = (4, 2, 4, 6)
INDICES, SEED = [2, 0], 7
SHIFT = 5.0  # the tiny run's phases.shift (the default)
BOUNDARY = 0.875
TOLERANCE = 1e-5  # diffusers' Wan against the project's, over every step (about 1e-6 seen)


def run_sample(*args) -> int:
    return cli.main(["sample", *map(str, args)])


def read_latents(folder):
    return load_file(str(folder / "latents.safetensors"))


def read_record(folder):
    return json.loads((folder / "samples.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher_sample")
    frames, height, width = RESOLUTION
    resolutions = f"data.resolutions=[{{frames: {frames}, height: {height}, width: {width}}}]"
    return train_tiny(tmp, "run", save_wan_teacher(tmp / "teacher"), [resolutions])


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """A pipeline root of two experts of different weights (high: transformer/, low: transformer_2/)."""
    return save_a14b_teacher(tmp_path_factory.mktemp("a14b") / "teacher", boundary_ratio=BOUNDARY)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Three prompts and a non-zero negative prompt, as a cache of the tiny Wan's 16-dim embeddings."""
    gen = torch.Generator().manual_seed(5)
    context, negative = torch.randn(3, 16, 16, generator=gen), torch.randn(16, 16, generator=gen)
    folder = write_embeddings_cache(tmp_path_factory.mktemp("prompts") / "cache", list(context), negative, pad_to=16)
    return folder, context, negative


def diffusers_wan(folder):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(folder).eval()


def seeded_noise(count, seed):
    return torch.stack(
        [torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)]
    )


def always(model):
    """One model for every time (a one-expert teacher)."""
    return lambda t: model


@torch.no_grad()
def euler_cfg(expert_at, noise, context, negative, steps, guidance):
    """The reference sampler, one sample at a time: ``expert_at(t)`` is the model for time t;
    ``negative`` None: the conditional velocity alone."""
    times = [SHIFT * u / (1 + (SHIFT - 1) * u) for u in ((steps - i) / steps for i in range(steps + 1))]
    out = []
    for x, c in zip(noise, context):
        x = x[None]
        for t, t_next in zip(times[:-1], times[1:]):
            model, timestep = expert_at(t), torch.tensor([1000.0 * t], dtype=torch.float32)
            velocity = model(x, timestep, c[None], return_dict=False)[0]
            if negative is not None:
                unconditional = model(x, timestep, negative[None], return_dict=False)[0]
                velocity = unconditional + guidance * (velocity - unconditional)
            x = x + (t_next - t) * velocity
        out.append(x[0])
    return torch.stack(out)


def teacher_sample(run, out, *args):
    indices = ",".join(map(str, INDICES))
    return run_sample(
        "--checkpoint", run.checkpoints, "--teacher", "-o", out, "--indices", indices, "--seed", SEED, *args
    )


def test_teacher_samples_are_the_guided_euler_ode_of_the_teacher(run, prompts, tmp_path):
    cache, context, negative = prompts
    assert teacher_sample(run, tmp_path / "t", "--steps", 6, "--guidance", 3.5, "--prompts", cache) == 0
    teacher = diffusers_wan(run.config.model.teacher_path)
    expected = euler_cfg(always(teacher), seeded_noise(2, SEED), context[INDICES], negative, 6, 3.5)
    saved = read_latents(tmp_path / "t")
    assert rel_error(saved["latents"], expected) < TOLERANCE
    record = read_record(tmp_path / "t")
    assert record["teacher"] is True and record["steps"] == 6 and record["num_steps"] == 6
    assert record["guidance"] == 3.5 and record["shift"] == SHIFT and record["experts"] == 1
    assert record["step_rule"] == "euler" and record["timesteps"][:2] == pytest.approx([1000.0, 1000.0 * 25 / 26])
    # Guidance matters: the conditional loop alone is another sample.
    unguided = euler_cfg(always(teacher), seeded_noise(2, SEED), context[INDICES], None, 6, 1.0)
    assert rel_error(saved["latents"], unguided) > 1e-2


def test_guidance_1_is_the_conditional_teacher_alone(run, prompts, tmp_path):
    cache, context, _ = prompts
    assert teacher_sample(run, tmp_path / "t", "--steps", 5, "--guidance", 1, "--prompts", cache) == 0
    teacher = diffusers_wan(run.config.model.teacher_path)
    expected = euler_cfg(always(teacher), seeded_noise(2, SEED), context[INDICES], None, 5, 1.0)
    assert rel_error(read_latents(tmp_path / "t")["latents"], expected) < TOLERANCE


def test_teacher_and_generator_folders_pair_the_same_prompts_and_seeds(run, tmp_path):
    """The defaults: 40 steps, the run's guidance (2 in the tiny run) and its own prompts."""
    assert teacher_sample(run, tmp_path / "teacher", "--batch-size", 2) == 0
    indices = ",".join(map(str, INDICES))
    assert (
        run_sample("--checkpoint", run.checkpoints, "-o", tmp_path / "gen", "--indices", indices, "--seed", SEED) == 0
    )
    teacher, generator = read_latents(tmp_path / "teacher"), read_latents(tmp_path / "gen")
    assert teacher["prompt_index"].tolist() == generator["prompt_index"].tolist() == INDICES
    assert teacher["seed"].tolist() == generator["seed"].tolist() == [SEED, SEED + 1]
    assert teacher["latents"].shape == generator["latents"].shape == (2, *LATENT_SHAPE)
    record = read_record(tmp_path / "teacher")
    assert record["num_steps"] == 40 and record["guidance"] == 2.0 and record["resolution"] == list(RESOLUTION)
    # The run's synthetic prompts (4 of 16 tokens, data.seed 0) with their zero negative.
    context = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0))[INDICES]
    model = diffusers_wan(run.config.model.teacher_path)
    expected = euler_cfg(always(model), seeded_noise(2, SEED), context, torch.zeros(16, 16), 40, 2.0)
    assert rel_error(teacher["latents"], expected) < TOLERANCE


def test_a_two_expert_teacher_runs_the_expert_that_owns_each_step(run, a14b, prompts, tmp_path):
    cache, context, negative = prompts
    # 6 steps at shift 5: t = 1, 0.962, 0.909 on the high-noise expert, 0.833, 0.714, 0.5 on the low.
    args = ["--steps", 6, "--guidance", 3, "--prompts", cache, f"model.teacher_path={a14b}"]
    assert teacher_sample(run, tmp_path / "t", *args) == 0
    high, low = diffusers_wan(a14b / "transformer"), diffusers_wan(a14b / "transformer_2")
    noise, rows = seeded_noise(2, SEED), context[INDICES]
    expected = euler_cfg(lambda t: high if t >= BOUNDARY else low, noise, rows, negative, 6, 3.0)
    saved = read_latents(tmp_path / "t")["latents"]
    assert rel_error(saved, expected) < TOLERANCE
    for one in (high, low):  # both experts take part
        assert rel_error(saved, euler_cfg(always(one), noise, rows, negative, 6, 3.0)) > 1e-2
    record = read_record(tmp_path / "t")
    assert record["experts"] == 2 and record["boundary"] == BOUNDARY and record["teacher_path"] == str(a14b)


def test_a_qwen_image_teacher_pads_both_branches_to_one_masked_length(run, tmp_path):
    """Prompts of 5 and 7 tokens and a negative of 3 are padded to 7 and masked (one CFG batch);
    the reference feeds each unpadded. The Wan run's config is pointed at a tiny Qwen-Image teacher."""
    from diffusers import QwenImageTransformer2DModel

    teacher = save_qwen_teacher(tmp_path / "qwen")
    gen = torch.Generator().manual_seed(6)
    rows, negative = [torch.randn(n, 24, generator=gen) for n in (5, 7)], torch.randn(3, 24, generator=gen)
    cache = write_embeddings_cache(tmp_path / "cache", rows, negative, family="qwen_image", masked=True)
    qwen = ["model.family=qwen_image", f"model.teacher_path={teacher}", "phases.shift=3"]
    args = ["--indices", "1,0", "--seed", SEED, "--steps", 4, "--guidance", 4, "--prompts", cache, "--batch-size", 2]
    out = tmp_path / "t"
    assert (
        run_sample("--checkpoint", run.checkpoints, "--teacher", "-o", out, "--resolution", "32x48", *args, *qwen) == 0
    )
    model = QwenImageTransformer2DModel.from_pretrained(teacher).eval()

    def velocity(x, t, context):
        return qwen_diffusers_velocity(
            model, x, torch.tensor([1000.0 * t]), context, torch.ones(context.shape[:2], dtype=torch.long)
        )

    times = [3 * u / (1 + 2 * u) for u in (1, 0.75, 0.5, 0.25, 0)]
    expected = []
    for i, row in enumerate((1, 0)):
        x = torch.randn(16, 1, 4, 6, generator=torch.Generator().manual_seed(SEED + i))[None, :, 0]
        with torch.no_grad():
            for t, t_next in zip(times[:-1], times[1:]):
                cond, uncond = velocity(x, t, rows[row][None]), velocity(x, t, negative[None])
                x = x + (t_next - t) * (uncond + 4 * (cond - uncond))
        expected.append(x[:, :, None])
    saved = read_latents(out)["latents"]
    assert saved.shape == (2, 16, 1, 4, 6) and rel_error(saved, torch.cat(expected)) < TOLERANCE
    assert read_record(out)["shift"] == 3.0


def test_teacher_options_are_refused_where_they_do_not_apply(run, tmp_path, capsys):
    cases = [
        (["--checkpoint", run.checkpoints, "--steps", "8"], "--steps sets the teacher's sampler: add --teacher"),
        (["--checkpoint", run.checkpoints, "--guidance", "3"], "--guidance sets the teacher's sampler: add --teacher"),
        (["--exported", tmp_path, "--teacher"], "--teacher samples the teacher of a training run: give --checkpoint"),
        (["--checkpoint", run.checkpoints, "--teacher", "--ema"], "--ema picks the generators' EMA copies"),
        (["--checkpoint", run.checkpoints, "--teacher", "--guidance", "-1"], "--guidance must be >= 0"),
        (["--checkpoint", run.checkpoints, "--teacher", "model.teacher_path=null"], "had no model.teacher_path"),
    ]
    for args, message in cases:
        assert run_sample(*args, "-o", tmp_path / "out") == 2, message
        assert re.search(re.escape(message), capsys.readouterr().err), message
    with pytest.raises(SystemExit) as exit:
        run_sample("--checkpoint", run.checkpoints, "--teacher", "--steps", "0", "-o", tmp_path / "out")
    assert exit.value.code == 2 and "--steps: '0' is not a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_teacher_sampling_at_tensor_parallel_2_under_torchrun_matches_one_process(run, tmp_path):
    assert teacher_sample(run, tmp_path / "one", "--steps", 4) == 0
    indices = ",".join(map(str, INDICES))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "phased_dmd_mega", "sample", "--checkpoint", str(run.checkpoints), "--teacher", "--steps", "4"]
    command += ["-o", str(tmp_path / "tp2"), "--tp", "2", "--indices", indices, "--seed", str(SEED)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, tp2 = read_latents(tmp_path / "one"), read_latents(tmp_path / "tp2")
    assert rel_error(tp2["latents"], one["latents"]) < TOLERANCE and tp2["seed"].tolist() == [SEED, SEED + 1]
