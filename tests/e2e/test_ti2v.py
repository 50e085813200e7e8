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

import json
from pathlib import Path

import pytest
import torch

from phased_dmd_mega import cli
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.distill.phased import sample
from phased_dmd_mega.sample import sample_noise

from helpers import rel_error
from helpers.tiny_runs import save_wan_teacher, table_scheduler, train_tiny

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
