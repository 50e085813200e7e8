"""Wan2.2-TI2V-5B distillation on tiny random models of its architecture (48 latent channels from
the Wan2.2 VAE, which compresses 16x, per-token timesteps with ``expand_timesteps``):

- text to video: the real Trainer trains the 5B-shaped teacher; `phased-dmd sample` gives the
  in-process sampler's latents; the export is a pipeline root with ``expand_timesteps`` that
  diffusers' own WanPipeline loads and runs, on the distilled step table, to the same latents;
- image to video: the first-frame latents that `encode-prompts --vae` stores with a (tiny) Wan2.2
  VAE, the model input with the first latent frame replaced and the per-token timesteps (0 on the
  conditioning frame's tokens) are what WanImageToVideoPipeline (``expand_timesteps``) feeds its
  transformer in both CFG branches, and our model's velocity on them is diffusers';
- the conditioning frame stays exactly the image's latents through a rollout, and neither loss
  (the DMD gradient, the fake model's subinterval flow matching) sends it any gradient;
- training on such a cache: every role sees the clean frame at timestep 0, the samples keep it,
  `phased-dmd sample` of the checkpoint gives the in-process samples.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from phased_dmd_mega import cli, parallel
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.distill.phased import sample
from phased_dmd_mega.prompt_cache.command import EncodeOptions, encode_prompts
from phased_dmd_mega.prompt_cache.reader import PromptCache
from phased_dmd_mega.sample import sample_noise

from helpers import rel_error
from helpers.parity import load_rank_model
from helpers.tiny_models import save_image, save_tiny_wan22_vae
from helpers.tiny_runs import run_image_pipeline, save_wan_teacher, table_scheduler, train_tiny
from helpers.tiny_text_encoders import save_wan_text_encoder

FRAMES, HEIGHT, WIDTH = 5, 32, 64  # -> latents 48 x 2 x 2 x 4: 2 tokens per latent frame
LATENT = (48, 2, 2, 4)
TI2V_5B = {"in_channels": 48, "out_channels": 48}  # the 5B's channels (its VAE's), no extra ones
RESOLUTIONS = f"data.resolutions=[{{frames: {FRAMES}, height: {HEIGHT}, width: {WIDTH}}}]"


def read_latents(folder: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(folder / "latents.safetensors"))["latents"]


def metrics(run_root: Path):
    return [json.loads(line) for line in (run_root / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- text to video


def _t2v_references(trainer):
    noise = sample_noise(LATENT, [5])
    context = trainer.prompts.rows([1]).context
    return {
        "noise": noise,
        "context": context,
        "latents": sample(trainer.sampling_generators(), trainer.layout, noise, Condition(context)),
    }


@pytest.fixture(scope="module")
def t2v_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ti2v_t2v")
    return train_tiny(tmp, "run", save_wan_teacher(tmp / "teacher", **TI2V_5B), [RESOLUTIONS], extra=_t2v_references)


def test_text_to_video_at_the_5b_architecture_samples_and_exports_a_pipeline_diffusers_runs(t2v_run, tmp_path):
    from diffusers import WanPipeline

    run, reference = t2v_run, t2v_run.extra
    assert all(r["dmd_loss"] > 0 and r["fake_loss"] > 0 for r in metrics(run.root))
    args = ["sample", "--checkpoint", run.checkpoints, "-o", tmp_path / "s", "--indices", "1", "--seed", "5"]
    assert cli.main(list(map(str, args))) == 0
    torch.testing.assert_close(read_latents(tmp_path / "s"), reference["latents"], rtol=1e-5, atol=1e-5)

    dst = tmp_path / "out"
    assert cli.main(["export", "--checkpoint", str(run.checkpoints), "--dst", str(dst)]) == 0
    assert json.loads((dst / "model_index.json").read_text())["expand_timesteps"] is True
    info = json.loads((dst / "phased_dmd.json").read_text())
    pipe = WanPipeline.from_pretrained(
        dst, tokenizer=None, text_encoder=None, vae=None, scheduler=table_scheduler(info["sigmas"])
    )
    assert pipe.config.expand_timesteps is True  # per-token timesteps, as the 5B's own pipeline
    latents = pipe(
        prompt_embeds=reference["context"],
        latents=reference["noise"],
        guidance_scale=1.0,
        num_inference_steps=4,
        num_frames=FRAMES,
        height=16,  # no VAE: the pipeline checks the size at its default 8x, the latents are given
        width=32,
        output_type="latent",
    ).frames
    assert rel_error(latents, reference["latents"]) < 1e-4  # float32 step table vs float64 times


# ----------------------------------------------------------------------------- image to video


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two images, three rows (two share an image), a tiny Wan2.2 VAE, text encoder and 5B-shaped teacher."""
    root = tmp_path_factory.mktemp("ti2v")
    (root / "images").mkdir()
    images = [save_image(root / "images" / f"{k}.png", seed=k) for k in (1, 2)]
    rows = [
        {"prompt": "a red cat sitting on the beach", "image": str(images[0])},
        {"prompt": "a red cat sitting on the beach", "image": str(images[1])},
        {"prompt": "a dog running in the snow", "image": str(images[0])},
    ]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "root": root,
        "rows": rows,
        "vae": save_tiny_wan22_vae(root / "vae"),
        "text": save_wan_text_encoder(root / "text", d_model=16),
        "teacher": save_wan_teacher(root / "teacher", seed=1, **TI2V_5B),
    }


@pytest.fixture(scope="module")
def cache(assets):
    options = EncodeOptions(
        family="wan",
        text_encoder=str(assets["text"]),
        out=str(assets["root"] / "cache"),
        prompts=str(assets["root"] / "prompts.jsonl"),
        vae=str(assets["vae"]),
        resolution=f"{FRAMES}x{HEIGHT}x{WIDTH}",
        max_sequence_length=16,
        batch_size=2,
        shard_size=2,
        dtype="fp32",
        negative_prompt="blurry",
    )
    return PromptCache(encode_prompts(options))


def pipeline_transformer_calls(assets, row, guidance_scale=3.0):
    """What WanImageToVideoPipeline with ``expand_timesteps`` (Wan2.2-TI2V-5B) gives its
    transformer per call (both CFG branches), and what the transformer returns."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )

    transformer = WanTransformer3DModel.from_pretrained(assets["teacher"]).eval()
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=AutoencoderKLWan.from_pretrained(assets["vae"]),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=transformer,
        expand_timesteps=True,
    )
    calls = []
    transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append({**kwargs, "out": out[0].clone()}), with_kwargs=True
    )
    run_image_pipeline(pipe, assets["rows"][row]["image"], FRAMES, HEIGHT, WIDTH, guidance_scale)
    return calls


class Spy(torch.nn.Module):
    """A stand-in DiT that records what ``call_dit`` gives it."""

    def __init__(self, dims):
        super().__init__()
        self.dims, self.seen = dims, []

    def forward(self, latents, timestep, context):
        self.seen.append((latents, timestep))
        return torch.zeros_like(latents)


@pytest.mark.parametrize("row", [0, 1])
def test_the_first_frame_and_per_token_timesteps_are_what_the_ti2v_pipeline_gives_its_transformer(assets, cache, row):
    from phased_dmd_mega.distill.roles import call_dit
    from phased_dmd_mega.models.wan import WanDims

    calls = pipeline_transformer_calls(assets, row)
    assert len(calls) == 4  # 2 steps x (conditional, unconditional)
    positive, negative = cache.conditions([row])
    assert positive.concat_latents is None and positive.first_frame.shape == (1, 48, 1, 2, 4)
    assert torch.equal(negative.first_frame, positive.first_frame)  # both CFG branches: the image
    spy = Spy(WanDims(**TI2V_5B))
    parallel.initialize(seed=0)
    try:
        ours = load_rank_model(assets["teacher"], "wan").eval()
        for call in calls:
            hidden, timestep = call["hidden_states"], call["timestep"]
            t = timestep.max().reshape(1)
            assert hidden.shape == (1, *LATENT) and timestep.shape == (1, 4)
            # The pipeline's latents with any first frame in: call_dit builds its transformer input.
            noisy = torch.cat([torch.randn(1, 48, 1, 2, 4), hidden[:, :, 1:]], dim=2)
            call_dit(spy, noisy, t / 1000, positive)
            latents, ours_t = spy.seen[-1]
            assert torch.equal(latents, hidden) and torch.equal(latents[:, :, :1], positive.first_frame)
            torch.testing.assert_close(ours_t, timestep, rtol=0, atol=1e-4)  # 1000 * (t / 1000)
            assert torch.equal(ours_t[:, :2], torch.zeros(1, 2)) and bool((ours_t[:, 2:] > 0).all())
            with torch.no_grad():
                velocity = ours(hidden, timestep, call["encoder_hidden_states"])
            assert rel_error(velocity, call["out"]) < 1e-5
    finally:
        parallel.destroy()


def test_the_cache_stores_the_image_alone_encoded_by_the_wan22_vae(assets, cache):
    from diffusers import AutoencoderKLWan
    from diffusers.utils import load_image
    from diffusers.video_processor import VideoProcessor

    index = json.loads((cache.folder / "prompts.json").read_text())
    (entry,) = index["image_conditions"]
    assert entry["kind"] == "first_frame" and entry["latent_shape"] == [48, 1, 2, 4] and entry["spatial"] == 16
    vae = AutoencoderKLWan.from_pretrained(assets["vae"])
    pixels = VideoProcessor(vae_scale_factor=16).preprocess(load_image(assets["rows"][1]["image"]), HEIGHT, WIDTH)
    with torch.no_grad():
        latents = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 48, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 48, 1, 1, 1)
    torch.testing.assert_close(cache.image_latents(1)[None], (latents - mean) / std, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.image_latents(0), cache.image_latents(2))


# ----------------------------------------------------------------------------- rollouts and losses


def ti2v_roles(seed=0):
    """A 5B-shaped generator, fake model and teacher of our own (random, different weights)."""
    from phased_dmd_mega.distill.roles import Experts, GuidedTeacher
    from phased_dmd_mega.models.options import ModelParallelOptions
    from phased_dmd_mega.models.wan import WAN_PRESETS, WanModel

    from helpers.tiny_models import randomize_

    dims = dataclasses.replace(WAN_PRESETS["tiny"], **TI2V_5B)
    par = ModelParallelOptions(attention_backend="sdpa")
    generator, fake, teacher = (Experts(randomize_(WanModel(dims, par), seed + k)) for k in range(3))
    return generator, fake, GuidedTeacher(teacher, guidance_scale=3.0)


def test_the_conditioning_frame_stays_the_image_through_a_rollout_and_gets_no_gradient_from_either_loss():
    from phased_dmd_mega.distill.loss_shard import LossShard
    from phased_dmd_mega.distill.objectives import fake_score_loss, generator_dmd_loss, renoise
    from phased_dmd_mega.distill.rollout import rollout_to_phase_end
    from phased_dmd_mega.schedule import PhaseLayout

    gen = torch.Generator().manual_seed(3)
    image = torch.randn(2, 48, 1, 2, 4, generator=gen)
    condition = Condition(torch.randn(2, 5, 32, generator=gen), first_frame=image)
    negative = Condition(torch.zeros(2, 5, 32), first_frame=image)
    layout = PhaseLayout.build(4, num_phases=2, shift=5.0)
    parallel.initialize(seed=0)
    try:
        generator, fake, teacher = ti2v_roles()
        noise = torch.randn(2, *LATENT, generator=gen)
        anchor = rollout_to_phase_end([generator, generator], layout, 1, noise, condition, 2, with_grad=True)
        assert torch.equal(anchor.x_s[:, :, :1], image)  # exactly the image's latents, after 4 steps
        assert not torch.equal(anchor.x_s[:, :, 1:], noise[:, :, 1:])
        generated = sample([generator, generator], layout, noise, condition)
        assert torch.equal(generated[:, :, :1], image)

        shard = LossShard.for_model(teacher.experts.high, anchor.x_s.shape, condition.given_frames)
        anchor.x_s.retain_grad()
        noised = renoise(anchor.x_s, anchor.s, torch.tensor([0.9, 0.6]), generator=gen)
        out = generator_dmd_loss(anchor, noised, teacher, fake, condition, negative, shard=shard)
        out["loss"].backward()
        assert not anchor.x_s.grad[:, :, :1].any() and anchor.x_s.grad[:, :, 1:].abs().sum() > 0

        outputs = []

        def keep(module, args, out):
            out.retain_grad()
            outputs.append(out)

        fake.high.register_forward_hook(keep)
        loss, _ = fake_score_loss(fake, anchor.x_s, anchor.s, noised, condition, 10.0, shard)
        loss.backward()
        (velocity,) = outputs
        assert not velocity.grad[:, :, :1].any() and velocity.grad[:, :, 1:].abs().sum() > 0
    finally:
        parallel.destroy()


# ----------------------------------------------------------------------------- training


def record_inputs(trainer, calls):
    """Forward pre-hooks on the teacher and every generator and fake model: (latents, timestep) per call."""
    models = [trainer.phased.teacher.experts.high] + [role.model.high for role in trainer.generators + trainer.fakes]
    for model in models:
        model.register_forward_pre_hook(lambda m, args: calls.append((args[0].detach(), args[1].detach())))


@pytest.fixture(scope="module")
def ti2v_run(assets, cache, tmp_path_factory):
    """A TI2V run on the cache: the roles' inputs recorded, the samples of rows 0 and 1 (seeds 5, 6)."""
    calls = []
    overrides = [
        RESOLUTIONS,
        f"data.prompt_cache={cache.folder}",
        "data.synthetic_prompts=0",
        "phases.guidance_scale=3.0",
    ]
    run = train_tiny(
        tmp_path_factory.mktemp("ti2v_run"),
        "run",
        assets["teacher"],
        overrides,
        before_run=lambda trainer: record_inputs(trainer, calls),
        extra=lambda trainer: sample(
            trainer.sampling_generators(), trainer.layout, sample_noise(LATENT, [5, 6]), cache.rows([0, 1])
        ),
    )
    return run, calls


def test_a_ti2v_run_gives_every_role_the_clean_first_frame_at_timestep_0_and_samples_keep_it(cache, ti2v_run, tmp_path):
    run, calls = ti2v_run
    assert all(r["dmd_loss"] > 0 and r["fake_loss"] > 0 for r in metrics(run.root))
    images = [cache.image_latents(i) for i in range(len(cache))]
    calls = [call for call in calls if call[0].shape[2:] == LATENT[1:]]  # not train_tiny's own velocity probes
    assert len(calls) > 10
    for latents, timestep in calls:
        assert latents.shape[1] == 48 and timestep.shape == (latents.shape[0], 4)
        for x, t in zip(latents, timestep):
            assert any(torch.equal(x[:, :1], image) for image in images)  # the row's image, clean
            assert not t[:2].any() and bool((t[2:] > 0).all())  # its tokens at 0, the others at the step's
    samples = run.extra
    for k in (0, 1):
        assert torch.equal(samples[k, :, :1], cache.image_latents(k))
    assert not torch.equal(samples[0, :, 1:], samples[1, :, 1:])  # the image changes the generated frames
    args = ["sample", "--checkpoint", run.checkpoints, "-o", tmp_path / "s", "--indices", "0,1", "--seed", "5"]
    assert cli.main(list(map(str, args))) == 0
    torch.testing.assert_close(read_latents(tmp_path / "s"), samples, rtol=1e-5, atol=1e-5)


def test_the_ti2v_export_runs_in_diffusers_image_to_video_pipeline_to_the_samplers_latents(
    assets, cache, ti2v_run, tmp_path
):
    """WanImageToVideoPipeline with expand_timesteps encodes the image itself, replaces the first
    latent frame at every step and at the end: on the exported transformers and the distilled step
    table it gives our sampler's latents."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel

    run, _ = ti2v_run
    dst = tmp_path / "out"
    assert cli.main(["export", "--checkpoint", str(run.checkpoints), "--dst", str(dst)]) == 0
    index = json.loads((dst / "model_index.json").read_text())
    info = json.loads((dst / "phased_dmd.json").read_text())
    assert index["expand_timesteps"] is True
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=AutoencoderKLWan.from_pretrained(assets["vae"]),
        scheduler=table_scheduler(info["sigmas"]),
        transformer=WanTransformer3DModel.from_pretrained(dst / "transformer").eval(),
        transformer_2=WanTransformer3DModel.from_pretrained(dst / "transformer_2").eval(),
        boundary_ratio=index["boundary_ratio"],
        expand_timesteps=True,
    )
    from diffusers.utils import load_image

    for k in (0, 1):
        with torch.no_grad():
            latents = pipe(
                image=load_image(assets["rows"][k]["image"]),
                prompt_embeds=cache.rows([k]).context,
                latents=sample_noise(LATENT, [5 + k]),
                guidance_scale=1.0,
                num_inference_steps=4,
                num_frames=FRAMES,
                height=HEIGHT,
                width=WIDTH,
                output_type="latent",
            ).frames
        assert rel_error(latents, run.extra[k : k + 1]) < 1e-4, k  # the VAE's encoding in the pipeline vs the cache's
