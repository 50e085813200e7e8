"""Image-conditioned (I2V) distillation of Wan2.2-I2V-A14B-like teachers, on tiny random models:

- the image condition that `encode-prompts --vae` stores and the cache reader rebuilds is exactly
  what diffusers' WanImageToVideoPipeline concatenates to the noisy latents of both CFG branches
  (a tiny random AutoencoderKLWan and two-expert 36-channel transformer saved to disk, images
  written by the test);
- the trainer trains a two-expert I2V teacher on such a cache: every role (teacher experts, fake
  models, generators, EMA, sampling) sees 36 input channels whose last 20 are the cache's
  condition, and the generators' samples change with the image;
- a cache encoded at several resolutions holds the pipeline's condition at each; the trainer draws
  the resolution mixture from it, and `phased-dmd sample` samples an I2V checkpoint at any of them;
  a cache of the older one-resolution layout still reads;
- `phased-dmd sample --teacher` of an I2V run gives both CFG branches of each expert the row's
  first-frame condition (against an Euler loop on the diffusers experts);
- refusals: a teacher and a prompt source that disagree about the image condition, a resolution
  that the cache lacks, and bad encoder inputs;
- (slow) an I2V training step at tensor parallel 2 with sequence parallelism gives the losses and
  gradient norms of the one-process step.
"""

import json
from pathlib import Path

import pytest
import torch

from phased_dmd_mega.prompt_cache.command import EncodeOptions, encode_prompts
from phased_dmd_mega.prompt_cache.errors import PromptEncodingError
from phased_dmd_mega.prompt_cache.reader import PromptCache

from helpers.tiny_models import WAN_TINY, save_image
from helpers.tiny_runs import run_image_pipeline
from helpers.tiny_text_encoders import save_wan_text_encoder

FRAMES, HEIGHT, WIDTH = 5, 16, 32  # -> latents 2 x 2 x 4 (4 tokens of the tiny DiT)
RESOLUTION = f"{FRAMES}x{HEIGHT}x{WIDTH}"
PORTRAIT = (FRAMES, WIDTH, HEIGHT)  # the mixture's second resolution: latents 2 x 4 x 2
BOUNDARY = 0.9  # Wan2.2-I2V-A14B
I2V_TINY = {**WAN_TINY, "in_channels": 36, "out_channels": 16}  # 16 noisy + 4 mask + 16 first-frame latents


def save_vae(folder: Path) -> Path:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(3)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).save_pretrained(folder)
    return folder


def save_i2v_teacher(root: Path) -> Path:
    """A Wan2.2-I2V-A14B-shaped diffusers pipeline root: two 36-channel experts, boundary 0.9."""
    from diffusers import WanTransformer3DModel

    for seed, sub in ((1, "transformer"), (2, "transformer_2")):
        torch.manual_seed(seed)
        WanTransformer3DModel(**I2V_TINY).save_pretrained(root / sub)
    index = {
        "_class_name": "WanImageToVideoPipeline",
        "_diffusers_version": "0.42.1",
        "boundary_ratio": BOUNDARY,
        "expand_timesteps": False,
        "image_encoder": [None, None],
        "image_processor": [None, None],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v")
    (root / "images").mkdir()
    rows = [  # the same prompt with two images, and another prompt
        {"prompt": "a red cat sitting on the beach", "image": "images/first.png"},
        {"prompt": "a red cat sitting on the beach", "image": str(save_image(root / "images" / "second.png", 2))},
        {"prompt": "a dog running in the snow", "image": "images/first.png"},
    ]
    save_image(root / "images" / "first.png", 1)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "root": root,
        "rows": rows,
        "prompts": root / "prompts.jsonl",
        "vae": save_vae(root / "vae"),
        "text": save_wan_text_encoder(root / "text", d_model=16),
        "teacher": save_i2v_teacher(root / "teacher"),
    }


def encode(assets, out: Path, **options) -> Path:
    options = {
        "prompts": str(assets["prompts"]),
        "vae": str(assets["vae"]),
        "resolution": RESOLUTION,
        "max_sequence_length": 16,
        "batch_size": 2,
        "shard_size": 2,
        "dtype": "fp32",
        "negative_prompt": "blurry",
        **options,
    }
    return encode_prompts(EncodeOptions(family="wan", text_encoder=str(assets["text"]), out=str(out), **options))


@pytest.fixture(scope="module")
def cache(assets):
    return PromptCache(encode(assets, assets["root"] / "cache"))


@pytest.fixture(scope="module")
def mixed(assets):
    """The same rows encoded at two resolutions (landscape and portrait)."""
    return PromptCache(
        encode(assets, assets["root"] / "mixed", resolution=f"{RESOLUTION},{'x'.join(map(str, PORTRAIT))}")
    )


# ----------------------------------------------------------------------------- against the pipeline


def pipeline_transformer_inputs(assets, row, guidance_scale=3.0, height=HEIGHT, width=WIDTH):
    """What WanImageToVideoPipeline feeds its transformers ([latents, condition] per call, both CFG
    branches) for the row's image and prompt embeddings."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )

    experts = [
        WanTransformer3DModel.from_pretrained(assets["teacher"] / sub) for sub in ("transformer", "transformer_2")
    ]
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=AutoencoderKLWan.from_pretrained(assets["vae"]),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=experts[0],
        transformer_2=experts[1],
        boundary_ratio=BOUNDARY,
    )
    assert pipe.config.expand_timesteps is False and pipe.image_encoder is None  # as Wan2.2-I2V-A14B
    seen = []
    for expert in experts:
        expert.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True
        )
    run_image_pipeline(pipe, assets["root"] / assets["rows"][row]["image"], FRAMES, height, width, guidance_scale)
    return seen


@pytest.mark.parametrize("row", [0, 1])
def test_the_condition_is_what_the_i2v_pipeline_concatenates_in_both_cfg_branches(assets, cache, row):
    seen = pipeline_transformer_inputs(assets, row)
    assert len(seen) == 4  # 2 steps (one per expert at boundary 0.9) x (conditional, unconditional)
    positive, negative = cache.conditions([row])
    assert positive.concat_latents.shape == (1, 20, 2, 2, 4)
    for hidden in seen:
        assert hidden.shape == (1, 36, 2, 2, 4)
        assert torch.equal(positive.concat_latents, hidden[:, 16:])
    # The unconditional branch keeps the image condition; only the text differs.
    assert torch.equal(negative.concat_latents, positive.concat_latents)
    mask = positive.concat_latents[0, :4]
    assert torch.equal(mask[:, 0], torch.ones_like(mask[:, 0])) and not mask[:, 1:].any()


def test_bf16_rows_round_the_pipelines_condition(assets, cache, tmp_path):
    bf16 = PromptCache(encode(assets, tmp_path / "bf16", dtype="bf16"))
    assert bf16.image_latents(1).dtype == torch.bfloat16
    assert torch.equal(bf16.image_latents(1), cache.image_latents(1).to(torch.bfloat16))
    index = json.loads((tmp_path / "bf16" / "prompts.json").read_text())
    assert index["image_conditions"] == [
        {
            "resolution": [FRAMES, HEIGHT, WIDTH],
            "latent_shape": [16, 2, 2, 4],
            "mask_channels": 4,
            "spatial": 8,
            "tensor": f"image_latents.{RESOLUTION}",
            "kind": "channels",
            "temporal": 4,
        }
    ]


@pytest.mark.parametrize("resolution", [(FRAMES, HEIGHT, WIDTH), PORTRAIT])
def test_a_cache_of_several_resolutions_holds_the_pipelines_condition_at_each(assets, cache, mixed, resolution):
    seen = pipeline_transformer_inputs(assets, 1, height=resolution[1], width=resolution[2])
    positive, negative = mixed.conditions([1], resolution)
    latent_size = (resolution[1] // 8, resolution[2] // 8)
    assert positive.concat_latents.shape == (1, 20, 2, *latent_size)
    for hidden in seen:
        assert torch.equal(positive.concat_latents, hidden[:, 16:])
    assert torch.equal(negative.concat_latents, positive.concat_latents)
    # Each resolution is encoded on its own: the landscape latents are the one-resolution cache's.
    if resolution == (FRAMES, HEIGHT, WIDTH):
        assert torch.equal(mixed.image_latents(1, resolution), cache.image_latents(1))


def test_a_cache_of_several_resolutions_must_be_told_which_and_names_what_it_has(mixed):
    with pytest.raises(ValueError, match=r"first frames at several resolutions \(5x16x32, 5x32x16\): say which one"):
        mixed.rows([0])
    with pytest.raises(
        ValueError,
        match=r"holds no first-frame latents at 5x16x16 .* it has 5x16x32, 5x32x16: "
        r"encode that resolution too",
    ):
        mixed.rows([0], (5, 16, 16))


def test_a_cache_of_the_one_resolution_layout_still_reads(cache, tmp_path):
    """Caches written before several resolutions: one ``image_latents`` tensor, ``image_condition``."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    legacy = tmp_path / "legacy"
    shutil.copytree(cache.folder, legacy)
    for shard in legacy.glob("shard-*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            tensors = {name.split(".")[0]: handle.get_tensor(name) for name in handle.keys()}
            metadata = handle.metadata()
        save_file(tensors, str(shard), metadata=metadata)
    index = json.loads((legacy / "prompts.json").read_text())
    entry = index.pop("image_conditions")[0]
    del entry["tensor"]
    index["image_condition"] = entry
    (legacy / "prompts.json").write_text(json.dumps(index))
    old = PromptCache(legacy)
    for row in range(len(cache)):
        assert torch.equal(old.rows([row]).concat_latents, cache.rows([row]).concat_latents)


def test_rows_with_one_image_share_its_latents(cache):
    assert torch.equal(cache.image_latents(0), cache.image_latents(2))
    assert not torch.equal(cache.image_latents(0), cache.image_latents(1))
    rows = cache.rows([2, 1])
    assert torch.equal(rows.concat_latents[0, 4:], cache.image_latents(2))


# ----------------------------------------------------------------------------- training


def i2v_config(tmp_path: Path, cache_folder, **data):
    import yaml

    config = {
        "run": {"seed": 0, "output_dir": str(tmp_path / "run")},
        "model": {"family": "wan", "dtype": "float32", "attention_backend": "sdpa"},
        "phases": {
            "num_steps": 4,
            "num_phases": 2,
            "iterations_per_phase": 2,
            "fake_updates_per_generator_update": 1,
            "guidance_scale": 3.0,
            "weight_clamp": 10.0,
        },
        "optimizer": {"generator": {"lr": 1e-3}, "fake": {"lr": 1e-3}, "ema_decay": 0.5},
        "data": {
            "prompt_cache": str(cache_folder),
            "batch_size": 2,
            "resolutions": [{"frames": FRAMES, "height": HEIGHT, "width": WIDTH}],
            **data,
        },
        "checkpoint": {"dir": str(tmp_path / "run" / "checkpoints"), "save_every": 100},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "run.yaml"


def record_inputs(models: dict):
    """Forward pre-hooks on each model: name -> the latents it was given."""
    seen = {name: [] for name in models}
    for name, model in models.items():
        model.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach()))
    return seen


def role_models(trainer, teacher) -> dict:
    models = {"teacher_high": teacher.high, "teacher_low": teacher.low}
    for k, (generator, fake, ema) in enumerate(zip(trainer.generators, trainer.fakes, trainer.ema)):
        models[f"generator{k}"] = generator.model.high
        models[f"generator{k}_ema"] = ema.high
        models[f"fake{k}_high"] = fake.model.high
        if fake.model.low is not None:
            models[f"fake{k}_low"] = fake.model.low
    return models


def test_a_two_expert_i2v_teacher_trains_on_a_resolution_mixture_and_every_role_sees_the_image_condition(
    assets, mixed, tmp_path
):
    from phased_dmd_mega import parallel
    from phased_dmd_mega.cli import main
    from phased_dmd_mega.config import load_config
    from phased_dmd_mega.distill.build import build_prompts, build_teacher, latent_geometry
    from phased_dmd_mega.distill.phased import sample
    from phased_dmd_mega.distill.trainer import Trainer
    from phased_dmd_mega.sample import sample_noise

    mixture = [
        {"frames": FRAMES, "height": HEIGHT, "width": WIDTH, "probability": 0.5},
        {"frames": PORTRAIT[0], "height": PORTRAIT[1], "width": PORTRAIT[2], "probability": 0.5},
    ]
    cfg = load_config(
        i2v_config(tmp_path, mixed.folder, resolutions=mixture), [f"model.teacher_path={assets['teacher']}"]
    )
    parallel.initialize(seed=cfg.run.seed)
    try:
        teacher = build_teacher(cfg)
        assert teacher.boundary == BOUNDARY and teacher.high.dims.in_channels == 36
        prompts = build_prompts(cfg, teacher.high.dims)
        geometry = latent_geometry(teacher.high.dims, prompts)
        assert geometry.channels == 16
        trainer = Trainer(cfg, teacher, prompts, geometry)
        models = role_models(trainer, teacher)
        assert {"fake0_low", "teacher_low"} <= set(models)  # phase 0 re-noises across the boundary
        seen = record_inputs(models)
        assert trainer.run() == 4
        # Sampling with the EMA generators, the same noise, one prompt with its two images.
        conditions = [mixed.conditions([row], PORTRAIT)[0] for row in (0, 1, 0)]
        noise = torch.randn(1, 16, 2, 4, 2, generator=torch.Generator().manual_seed(5))
        samples = [sample(trainer.sampling_generators(), trainer.layout, noise, c) for c in conditions]
        in_process = sample(
            trainer.sampling_generators(),
            trainer.layout,
            sample_noise((16, 2, 4, 2), [5, 6]),
            mixed.rows([0, 1], PORTRAIT),
        )
    finally:
        parallel.destroy()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["dmd_loss"] > 0 and r["fake_loss"] > 0 for r in records)
    rows_at = {
        (h // 8, w // 8): [mixed.rows([i], (f, h, w)).concat_latents[0] for i in range(len(mixed))]
        for f, h, w in ((FRAMES, HEIGHT, WIDTH), PORTRAIT)
    }
    trained_at = {tuple(x.shape[3:]) for name, inputs in seen.items() if not name.endswith("_ema") for x in inputs}
    assert trained_at == set(rows_at)  # the steps drew both resolutions of the mixture
    for name, inputs in seen.items():
        assert inputs, f"{name} was never called"
        for latents in inputs:
            assert latents.shape[1:3] == (36, 2), name
            for condition in latents[:, 16:]:  # each sample's condition is a cache row at the step's resolution
                assert any(torch.equal(condition, row) for row in rows_at[tuple(latents.shape[3:])]), name
    assert sum(len(seen[f"generator{k}_ema"]) for k in range(2)) == 3 * 4 + 4  # sampling: 4 calls per batch
    assert not torch.equal(samples[0], samples[1])  # the image changes the generator's output
    assert torch.equal(samples[0], samples[2])

    # `phased-dmd sample` of the checkpoint: the run's cache, the portrait resolution's first frames.
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tmp_path / "run" / "checkpoints"),
                "--ema",
                "-o",
                str(tmp_path / "s"),
                "--indices",
                "0,1",
                "--seed",
                "5",
                "--resolution",
                "x".join(map(str, PORTRAIT)),
            ]
        )
        == 0
    )
    from safetensors.torch import load_file

    torch.testing.assert_close(
        load_file(str(tmp_path / "s" / "latents.safetensors"))["latents"], in_process, rtol=1e-5, atol=1e-5
    )


def test_teacher_samples_of_an_i2v_run_feed_both_cfg_branches_the_first_frame(assets, cache, tmp_path):
    """``sample --teacher`` reads only a checkpoint's config.yaml, so the run is its config alone.
    The reference: the two diffusers experts (by t >= 0.9) in an Euler loop over shift(1 - i/3),
    [latents, the row's condition] in both branches, the cache's negative prompt in the other."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from phased_dmd_mega.cli import main
    from phased_dmd_mega.config import dump_yaml, load_config

    checkpoint = tmp_path / "iter_0000001"
    checkpoint.mkdir()
    cfg = load_config(i2v_config(tmp_path, cache.folder), [f"model.teacher_path={assets['teacher']}"])
    (checkpoint / "config.yaml").write_text(dump_yaml(cfg))
    args = [
        "--checkpoint",
        checkpoint,
        "--teacher",
        "--steps",
        3,
        "--indices",
        "1,2",
        "--seed",
        5,
        "-o",
        tmp_path / "s",
    ]
    assert main(["sample", *map(str, args)]) == 0
    high, low = (
        WanTransformer3DModel.from_pretrained(assets["teacher"] / s).eval() for s in ("transformer", "transformer_2")
    )
    times = [5 * u / (1 + 4 * u) for u in (1, 2 / 3, 1 / 3, 0)]  # 1 and 0.909: high; 0.714: low
    expected = []
    for i, row in enumerate((1, 2)):
        positive, negative = cache.conditions([row])
        x = torch.randn(1, 16, 2, 2, 4, generator=torch.Generator().manual_seed(5 + i))
        with torch.no_grad():
            for t, t_next in zip(times[:-1], times[1:]):
                model, timestep = (high if t >= BOUNDARY else low), torch.tensor([1000.0 * t])
                inputs = torch.cat([x, positive.concat_latents], 1)
                cond, uncond = (model(inputs, timestep, c.context, return_dict=False)[0] for c in (positive, negative))
                x = x + (t_next - t) * (uncond + 3.0 * (cond - uncond))  # the run's phases.guidance_scale
        expected.append(x)
    saved = load_file(str(tmp_path / "s" / "latents.safetensors"))["latents"]
    torch.testing.assert_close(saved, torch.cat(expected), rtol=1e-5, atol=1e-5)
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert record["experts"] == 2 and record["boundary"] == BOUNDARY and record["guidance"] == 3.0


# ----------------------------------------------------------------------------- refusals


def test_the_teacher_and_the_prompt_source_must_agree_on_the_image_condition(assets, cache, tmp_path):
    from phased_dmd_mega import parallel
    from phased_dmd_mega.config import load_config
    from phased_dmd_mega.data import SyntheticPrompts
    from phased_dmd_mega.distill.build import build_teacher, latent_geometry
    from phased_dmd_mega.distill.trainer import Trainer

    i2v = load_config(i2v_config(tmp_path, cache.folder), [f"model.teacher_path={assets['teacher']}"])
    t2v = load_config(i2v_config(tmp_path, cache.folder), ["model.preset=tiny"])
    parallel.initialize(seed=0)
    try:
        teacher = build_teacher(i2v)
        with pytest.raises(
            ValueError,
            match=r"takes 36 input channels for 16 output channels: its 20 extra channels "
            r"are an image condition .* the prompt source has none; .*--vae",
        ):
            latent_geometry(teacher.high.dims, SyntheticPrompts(2, 4, 16))
        with pytest.raises(
            ValueError,
            match=r"image condition has 20 channels \(4 mask \+ 16 latent\); the teacher "
            r"takes 16 input channels .* it takes no extra channels \(a text-to-video teacher",
        ):
            latent_geometry(build_teacher(t2v).high.dims, cache)
        wrong = load_config(
            i2v_config(tmp_path, cache.folder),
            [f"model.teacher_path={assets['teacher']}", "data.resolutions=[{frames: 1, height: 16, width: 32}]"],
        )
        with pytest.raises(
            ValueError,
            match=rf"data.resolutions 1x16x32 disagree with the prompt cache .*cache, "
            rf"whose first-frame latents were encoded at {RESOLUTION} \(frames x "
            rf"height x width\) only: remove them .* or encode",
        ):
            Trainer(wrong, teacher, cache, latent_geometry(teacher.high.dims, cache))
    finally:
        parallel.destroy()


def test_bad_image_inputs_name_the_row_file_or_option(assets, tmp_path):
    root = assets["root"]
    missing = tmp_path / "missing.jsonl"
    missing.write_text(
        json.dumps({"prompt": "a cat", "image": str(root / "images/first.png")})
        + "\n"
        + json.dumps({"prompt": "a dog", "image": str(tmp_path / "nowhere.png")})
        + "\n"
    )
    with pytest.raises(PromptEncodingError, match=r"missing.jsonl line 2: image .*nowhere.png does not exist"):
        encode(assets, tmp_path / "a", prompts=str(missing))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "first.png").write_text("not a picture")
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.write_text(json.dumps({"prompt": "a cat", "image": "images/first.png"}) + "\n")
    with pytest.raises(
        PromptEncodingError,
        match=r"row 1 of --prompts .*unreadable.jsonl: cannot read image "
        r".*images/first.png",
    ):
        encode(assets, tmp_path / "b", prompts=str(unreadable))
    partly = tmp_path / "partly.jsonl"
    partly.write_text(json.dumps({"prompt": "a cat", "image": str(root / "images/first.png")}) + '\n"a dog"\n')
    with pytest.raises(PromptEncodingError, match=r"partly.jsonl line 2: no 'image' image, but other rows name one"):
        encode(assets, tmp_path / "c", prompts=str(partly))
    for resolution, message in (
        ("5x20x32", "5x20x32.*height and width multiples of 8"),
        ("6x16x32", "6x16x32.*frames must be 4k \\+ 1"),
        ("5x16", "5x16.*expected FRAMESxHEIGHTxWIDTH"),
        ("5x16x32,5x32x16,5x16x32", "5x16x32 is given twice"),
    ):
        with pytest.raises(PromptEncodingError, match=rf"--resolution .*{message}"):
            encode(assets, tmp_path / "d", resolution=resolution)
    with pytest.raises(PromptEncodingError, match=r"name first-frame images \(field 'image'\) but no --vae is given"):
        encode(assets, tmp_path / "e", vae=None, resolution=None)
    (tmp_path / "text.txt").write_text("a cat\n")
    with pytest.raises(PromptEncodingError, match=r"--vae is given but no row of --prompts .*text.txt names"):
        encode(assets, tmp_path / "f", prompts=str(tmp_path / "text.txt"))
    with pytest.raises(PromptEncodingError, match=r"--vae .*text_encoder is a None .*need an AutoencoderKLWan"):
        encode(assets, tmp_path / "g", vae=str(assets["text"] / "text_encoder"))
    assert not any((tmp_path / name).exists() for name in "acdefg")  # refused before anything is written


def test_a_cache_of_other_images_or_resolution_is_refused_and_the_same_inputs_resume(
    assets, cache, mixed, tmp_path, capsys
):
    from phased_dmd_mega.cli import main

    args = [
        "encode-prompts",
        "--family",
        "wan",
        "--text-encoder",
        str(assets["text"]),
        "--prompts",
        str(assets["prompts"]),
        "--out",
        str(cache.folder),
        "--vae",
        str(assets["vae"]),
        "--resolution",
        RESOLUTION,
        "--max-sequence-length",
        "16",
        "--batch-size",
        "2",
        "--shard-size",
        "2",
        "--dtype",
        "fp32",
        "--negative-prompt",
        "blurry",
    ]
    assert main(args) == 0
    assert "resuming: 2 of 2 shards are already written" in capsys.readouterr().err
    assert main([*args, "--resolution", "1x16x32"]) == 2
    assert "holds a prompt cache of other inputs (differing: images)" in capsys.readouterr().err
    assert main([*args, "--resize-mode", "crop"]) == 2
    assert "differing: images" in capsys.readouterr().err
    # --resolution repeated is the comma-separated list the mixed cache was written with.
    repeated = [*args, "--resolution", "x".join(map(str, PORTRAIT))]
    repeated[repeated.index(str(cache.folder))] = str(mixed.folder)
    assert main(repeated) == 0
    assert "resuming: 2 of 2 shards are already written" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tensor parallel


def train_on_rank(config: str, overrides):
    from phased_dmd_mega.config import load_config
    from phased_dmd_mega.distill.trainer import train

    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    train(cfg)
    return [json.loads(line) for line in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_an_i2v_step_at_tensor_parallel_2_with_sequence_parallel_is_the_one_process_step(assets, cache, tmp_path):
    from phased_dmd_mega.testing import run_distributed

    config = str(i2v_config(tmp_path, cache.folder))
    common = [f"model.teacher_path={assets['teacher']}", "phases.iterations_per_phase=1"]
    runs = {}
    for name, processes, parallel_options in (
        ("tp1", 1, []),
        ("tp2", 2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
    ):
        overrides = [
            *common,
            *parallel_options,
            f"run.output_dir={tmp_path / name}",
            f"checkpoint.dir={tmp_path / name / 'checkpoints'}",
        ]
        runs[name] = run_distributed(train_on_rank, processes, config, overrides, timeout_s=600)[0]
    assert len(runs["tp1"]) == len(runs["tp2"]) == 2
    for reference, split in zip(runs["tp1"], runs["tp2"]):
        for key in ("dmd_loss", "fake_loss", "real_fake_gap", "generator_grad_norm", "fake_grad_norm"):
            assert split[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-7), key
