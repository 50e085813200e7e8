"""``phased-dmd export``: distilled generators -> Hugging Face folders that diffusers loads.

Every run here is the real Trainer on a tiny teacher saved with diffusers' own save_pretrained
(tiny_runs.py); the references are the trainer's own generators, evaluated before its run ended.
The exports are read back by diffusers only: ``WanTransformer3DModel`` /
``QwenImageTransformer2DModel.from_pretrained``, the pipelines' ``load_lora_weights`` (PEFT,
alpha from the file's metadata), and a ``WanPipeline`` built from an exported two-transformer
folder, whose own boundary routing must reproduce the project's sampler.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from phased_dmd_mega import cli, parallel
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.distill.phased import sample
from phased_dmd_mega.export import EXPORT_INFO, export_generators, pipeline_boundary_ratio, plan_slots
from phased_dmd_mega.models.architectures import registry
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
from helpers.parity import qwen_diffusers_velocity
from helpers.tiny_runs import save_a14b_teacher, save_qwen_teacher, save_wan_teacher, table_scheduler, train_tiny

TOLERANCE = 1e-5  # fp32, a different implementation of the same maths
TRAINED = 1e-4  # an exported generator must be this far (10x TOLERANCE) from its teacher: training moved it


def export(*args) -> int:
    return cli.main(["export", *map(str, args)])


def read_info(folder):
    return json.loads((folder / EXPORT_INFO).read_text())


@torch.no_grad()
def wan_velocity(model, inputs):
    return model(inputs["latents"], inputs["timestep"], inputs["context"], return_dict=False)[0]


def diffusers_wan(folder, inputs):
    from diffusers import WanTransformer3DModel

    return wan_velocity(WanTransformer3DModel.from_pretrained(folder).eval(), inputs)


@torch.no_grad()
def qwen_velocity(model, inputs):
    return qwen_diffusers_velocity(
        model, inputs["latents"], inputs["timestep"], inputs["context"], inputs["context_mask"]
    )


def wan_pipeline(transformer, transformer_2, boundary_ratio, scheduler=None):
    """A WanPipeline of two transformers only (no text encoder or VAE: embeddings and latents in)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio,
    )


# ----------------------------------------------------------------------------- tiny runs


def _sampled(trainer, seed=5, shape=(1, 4, 2, 4, 6)):
    """The project's few-step sampler with the trainer's generators: noise and prompt for a
    pipeline to reproduce."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    context = trainer.prompts.rows([1]).context
    latents = sample([role.model for role in trainer.generators], trainer.layout, noise, Condition(context))
    return {"noise": noise, "context": context, "latents": latents}


@pytest.fixture(scope="module")
def wan_full(tmp_path_factory):
    """Wan2.1-style teacher, full fine-tune, 2 phases, with an EMA that lags the generators."""
    tmp = tmp_path_factory.mktemp("wan_full")
    return train_tiny(tmp, "run", save_wan_teacher(tmp / "teacher"), ["optimizer.ema_decay=0.5"])


@pytest.fixture(scope="module")
def wan_lora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wan_lora")
    return train_tiny(tmp, "run", save_wan_teacher(tmp / "teacher"), ["model.lora.rank=4", "model.lora.alpha=8"])


@pytest.fixture(scope="module")
def a14b_lora(tmp_path_factory):
    """Two teacher experts split at 0.875; shift 7 puts the phase boundary on it (the Wan2.2
    A14B setting), so phase 0's adapters sit on the high-noise expert, phase 1's on the low."""
    tmp = tmp_path_factory.mktemp("a14b")
    teacher = save_a14b_teacher(tmp / "teacher", boundary_ratio=0.875)
    return train_tiny(
        tmp, "run", teacher, ["model.lora.rank=4", "model.lora.alpha=2", "phases.shift=7"], extra=_sampled
    )


@pytest.fixture(scope="module")
def qwen_lora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen_lora")
    return train_tiny(
        tmp, "run", save_qwen_teacher(tmp / "teacher"), ["model.lora.rank=4", "phases.shift=3"], family="qwen_image"
    )


@pytest.fixture(scope="module")
def qwen_one_phase(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen_one")
    return train_tiny(
        tmp,
        "run",
        save_qwen_teacher(tmp / "teacher"),
        ["phases.method=dmd_sgts", "phases.shift=3"],
        family="qwen_image",
    )


# ----------------------------------------------------------------------------- the step table


@pytest.mark.parametrize(
    "num_steps, split, shift",
    [(4, (2, 2), 5.0), (4, (2, 2), 7.0), (4, (1, 3), 3.0), (6, (2, 4), 5.0), (8, (4, 4), 5.0)],
)
def test_boundary_ratio_routes_every_step_to_the_expert_of_its_phase(num_steps, split, shift):
    layout = PhaseLayout.build(num_steps, steps_per_phase=split, shift=shift)
    boundary_timestep = pipeline_boundary_ratio(layout) * 1000  # diffusers: boundary_ratio * num_train_timesteps
    for step, phase in enumerate(layout.phase_of_step):
        timestep = torch.tensor(1000 * layout.times[step], dtype=torch.float32)  # the scheduler's timestep
        assert bool(timestep >= boundary_timestep) == (phase == 0), (step, phase)


def test_boundary_ratio_for_wan_four_steps():
    ratio = pipeline_boundary_ratio(PhaseLayout.build(4, num_phases=2, shift=5.0))
    assert 0.8333334 < ratio <= 0.9375 and ratio == pytest.approx((0.9375 + 5 / 6) / 2)
    # Why not the teacher's 0.875: at shift 7 phase 1 starts at exactly 0.875, which t >= 0.875 misroutes.
    shift_7 = PhaseLayout.build(4, num_phases=2, shift=7.0)
    assert shift_7.times[2] == pytest.approx(0.875) and shift_7.phase_of_step[2] == 1
    assert pipeline_boundary_ratio(shift_7) > 0.875
    with pytest.raises(ValueError, match="holds 2 phases, not 4"):
        pipeline_boundary_ratio(PhaseLayout.build(4, num_phases=4, shift=5.0))


def test_where_each_phase_is_written():
    wan, qwen = registry()["wan"], registry()["qwen_image"]
    assert [s.folder for s in plan_slots(1, wan)] == ["."]
    assert [s.folder for s in plan_slots(2, wan)] == ["transformer", "transformer_2"]
    assert [s.folder for s in plan_slots(2, wan, "original")] == ["high_noise_model", "low_noise_model"]
    assert [s.lora_file for s in plan_slots(2, wan)] == [
        "transformer_lora.safetensors",
        "transformer_2_lora.safetensors",
    ]
    assert [s.folder for s in plan_slots(2, qwen)] == ["phase_0", "phase_1"]
    assert [s.folder for s in plan_slots(4, wan)] == ["phase_0", "phase_1", "phase_2", "phase_3"]
    assert plan_slots(1, qwen)[0].lora_file == "pytorch_lora_weights.safetensors"
    assert [s.lora_file for s in plan_slots(2, wan, "original")] == [
        "high_noise_model_lora.safetensors",
        "low_noise_model_lora.safetensors",
    ]
    assert plan_slots(1, wan, "original")[0].lora_file == "lora.safetensors"


# ----------------------------------------------------------------------------- full weights


def test_full_wan_generators_load_in_diffusers_as_a_two_transformer_pipeline(wan_full, tmp_path):
    dst = tmp_path / "out"
    assert export("--checkpoint", wan_full.checkpoints, "--dst", dst, "--max-shard-size", "100KB") == 0
    for k, sub in enumerate(("transformer", "transformer_2")):
        got = diffusers_wan(dst / sub, wan_full.inputs)
        assert rel_error(got, wan_full.outputs[f"generator{k}"]) < TOLERANCE, sub
        assert rel_error(got, wan_full.teacher_outputs["high"]) > TRAINED, sub
        assert len(list((dst / sub).glob("*.safetensors"))) > 1  # sharded, with an index
        assert json.loads((dst / sub / "config.json").read_text())["rope_max_seq_len"] == 32  # kept from the teacher
    layout = PhaseLayout.build(4, num_phases=2, shift=5.0)
    index = json.loads((dst / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["boundary_ratio"] == pytest.approx(
        pipeline_boundary_ratio(layout)
    )
    info = read_info(dst)
    assert info["weights"] == "full" and info["timesteps"] == pytest.approx([1000, 937.5, 833.33333, 625])
    assert [p["model"] for p in info["phases"]] == ["transformer", "transformer_2"] and info["source"]["iteration"] == 3


def test_ema_export_holds_the_ema_copies(wan_full, tmp_path):
    assert export("--checkpoint", wan_full.checkpoints / "iter_0000003", "--dst", tmp_path / "ema", "--ema") == 0
    for k, sub in enumerate(("transformer", "transformer_2")):
        got = diffusers_wan(tmp_path / "ema" / sub, wan_full.inputs)
        assert rel_error(got, wan_full.outputs[f"generator{k}_ema"]) < TOLERANCE
        assert rel_error(got, wan_full.outputs[f"generator{k}"]) > TRAINED  # not the generator itself
    assert read_info(tmp_path / "ema")["source"]["ema"] is True


def test_original_layout_writes_the_wan_expert_folders(wan_full, tmp_path):
    from phased_dmd_mega.models import load_pretrained

    assert export("--checkpoint", wan_full.checkpoints, "--dst", tmp_path / "orig", "--layout", "original") == 0
    assert not (tmp_path / "orig" / "model_index.json").exists()
    assert read_info(tmp_path / "orig")["boundary_ratio"] == pytest.approx(0.8854166)  # recorded here instead
    parallel.initialize()
    try:
        for k, sub in enumerate(("high_noise_model", "low_noise_model")):
            assert json.loads((tmp_path / "orig" / sub / "config.json").read_text())["_class_name"] == "WanModel"
            model = load_pretrained(tmp_path / "orig" / sub, attention_backend="sdpa")
            with torch.no_grad():
                got = model(wan_full.inputs["latents"], wan_full.inputs["timestep"], wan_full.inputs["context"])
            assert rel_error(got, wan_full.outputs[f"generator{k}"]) < TOLERANCE
    finally:
        parallel.destroy()


def test_one_phase_qwen_image_exports_one_diffusers_transformer_folder(qwen_one_phase, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    dst = tmp_path / "qwen"
    assert export("--checkpoint", qwen_one_phase.checkpoints, "--dst", dst) == 0
    got = qwen_velocity(QwenImageTransformer2DModel.from_pretrained(dst).eval(), qwen_one_phase.inputs)
    assert rel_error(got, qwen_one_phase.outputs["generator0"]) < TOLERANCE
    assert rel_error(got, qwen_one_phase.teacher_outputs["high"]) > TRAINED
    assert [p["model"] for p in read_info(dst)["phases"]] == ["."]


# ----------------------------------------------------------------------------- LoRA


def lora_into(pipeline, folder, weight_name, **kwargs):
    pipeline.load_lora_weights(folder, weight_name=weight_name, **kwargs)
    return pipeline


def assert_pipeline_reproduces_the_generators(run, dst, info, high_file, low_file):
    """The teacher in a two-transformer WanPipeline, each LoRA file loaded by diffusers into its
    transformer: the velocities of the trained generators, away from the teacher's."""
    from diffusers import WanTransformer3DModel

    teacher = run.config.model.teacher_path
    pipe = wan_pipeline(
        WanTransformer3DModel.from_pretrained(teacher).eval(),
        WanTransformer3DModel.from_pretrained(teacher).eval(),
        info["boundary_ratio"],
    )
    lora_into(pipe, dst, high_file)
    lora_into(pipe, dst, low_file, load_into_transformer_2=True)
    for k, model in enumerate((pipe.transformer, pipe.transformer_2)):
        got = wan_velocity(model, run.inputs)
        assert rel_error(got, run.outputs[f"generator{k}"]) < TOLERANCE
        assert rel_error(got, run.teacher_outputs["high"]) > TRAINED


def test_wan_lora_files_load_through_the_pipeline_and_reproduce_the_lora_generators(wan_lora, tmp_path):
    from safetensors import safe_open

    dst = tmp_path / "lora"
    assert export("--checkpoint", wan_lora.checkpoints, "--dst", dst) == 0
    info = read_info(dst)
    assert info["weights"] == "lora" and info["lora"] == {
        "rank": 4,
        "alpha": 8.0,
        "base": str(wan_lora.config.model.teacher_path),
    }
    with safe_open(str(dst / "transformer_lora.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 8.0
    assert {
        "transformer.blocks.0.attn1.to_q.lora_A.weight",
        "transformer.blocks.0.attn1.to_v.lora_B.weight",
        "transformer.blocks.1.attn2.to_k.lora_B.weight",
        "transformer.blocks.1.ffn.net.2.lora_A.weight",
    } <= keys
    assert_pipeline_reproduces_the_generators(
        wan_lora, dst, info, "transformer_lora.safetensors", "transformer_2_lora.safetensors"
    )


def test_wan_lora_in_original_names_loads_through_diffusers_conversion(wan_lora, tmp_path):
    """Wan-Video / ComfyUI keys (diffusion_model.<module>.lora_down / lora_up / alpha): diffusers
    recognises them and converts them with its own code, and the pipeline reproduces the
    trained generators."""
    from safetensors import safe_open

    dst = tmp_path / "lora_original"
    assert export("--checkpoint", wan_lora.checkpoints, "--dst", dst, "--layout", "original") == 0
    info = read_info(dst)
    assert info["weights"] == "lora" and info["layout"] == "original"
    assert [phase["lora"] for phase in info["phases"]] == [
        "high_noise_model_lora.safetensors",
        "low_noise_model_lora.safetensors",
    ]
    with safe_open(str(dst / "high_noise_model_lora.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        alpha = handle.get_tensor("diffusion_model.blocks.0.self_attn.q.alpha")
    assert {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
        "diffusion_model.blocks.0.self_attn.o.lora_up.weight",
        "diffusion_model.blocks.1.cross_attn.k.lora_up.weight",
        "diffusion_model.blocks.1.ffn.2.lora_down.weight",
    } <= keys
    assert not any(key.startswith("transformer.") for key in keys) and float(alpha) == 8.0
    assert_pipeline_reproduces_the_generators(
        wan_lora, dst, info, "high_noise_model_lora.safetensors", "low_noise_model_lora.safetensors"
    )


def test_merged_lora_equals_the_lora_generators(wan_lora, tmp_path):
    assert export("--checkpoint", wan_lora.checkpoints, "--dst", tmp_path / "merged", "--merge") == 0
    assert read_info(tmp_path / "merged")["weights"] == "merged"
    for k, sub in enumerate(("transformer", "transformer_2")):
        got = diffusers_wan(tmp_path / "merged" / sub, wan_lora.inputs)
        assert rel_error(got, wan_lora.outputs[f"generator{k}"]) < TOLERANCE


def test_a14b_lora_sits_on_each_expert_and_the_merged_pipeline_reproduces_the_sampler(a14b_lora, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    teacher = a14b_lora.root.parent / "teacher"
    assert export("--checkpoint", a14b_lora.checkpoints, "--dst", tmp_path / "lora") == 0
    info = read_info(tmp_path / "lora")
    assert [p["base_expert"] for p in info["phases"]] == ["high", "low"]
    pipe = wan_pipeline(
        WanTransformer3DModel.from_pretrained(teacher / "transformer").eval(),
        WanTransformer3DModel.from_pretrained(teacher / "transformer_2").eval(),
        info["boundary_ratio"],
    )
    lora_into(pipe, tmp_path / "lora", "transformer_lora.safetensors")
    lora_into(pipe, tmp_path / "lora", "transformer_2_lora.safetensors", load_into_transformer_2=True)
    for k, model in enumerate((pipe.transformer, pipe.transformer_2)):
        assert rel_error(wan_velocity(model, a14b_lora.inputs), a14b_lora.outputs[f"generator{k}"]) < TOLERANCE

    # Merged: a pipeline root diffusers loads, whose boundary routing gives the project's samples.
    merged = tmp_path / "merged"
    assert export("--checkpoint", a14b_lora.checkpoints, "--dst", merged, "--merge") == 0
    info = read_info(merged)
    pipe = WanPipeline.from_pretrained(
        merged, tokenizer=None, text_encoder=None, vae=None, scheduler=table_scheduler(info["sigmas"])
    )
    assert pipe.config.boundary_ratio == pytest.approx(info["boundary_ratio"]) and info["boundary_ratio"] > 0.875
    reference = a14b_lora.extra
    _, _, frames, height, width = reference["noise"].shape
    latents = pipe(
        prompt_embeds=reference["context"],
        latents=reference["noise"],
        guidance_scale=1.0,
        num_inference_steps=4,
        num_frames=4 * (frames - 1) + 1,
        height=8 * height,
        width=8 * width,
        output_type="latent",
    ).frames
    assert rel_error(latents, reference["latents"]) < 1e-4  # float32 step table vs float64 times
    swapped = WanPipeline.from_pretrained(
        merged,
        tokenizer=None,
        text_encoder=None,
        vae=None,
        boundary_ratio=0.99,
        scheduler=table_scheduler(info["sigmas"]),
    )
    wrong = swapped(
        prompt_embeds=reference["context"],
        latents=reference["noise"],
        guidance_scale=1.0,
        num_inference_steps=4,
        num_frames=4 * (frames - 1) + 1,
        height=8 * height,
        width=8 * width,
        output_type="latent",
    ).frames
    assert rel_error(wrong, reference["latents"]) > TRAINED  # the routing matters


def test_a_lora_trained_on_the_other_expert_is_refused_for_its_pipeline_slot(a14b_lora, tmp_path):
    from phased_dmd_mega.distill.generators import open_generators

    parallel.initialize()
    try:
        opened = open_generators(a14b_lora.checkpoints)
        moved = dataclasses.replace(opened, base_experts=["low", "low"])  # what shift 5 with b = 0.875 gives
        with pytest.raises(ValueError, match="phase 0's LoRA was trained on the teacher's low-noise expert.*--merge"):
            export_generators(moved, tmp_path / "refused")
        assert export_generators(moved, tmp_path / "merged", merge=True) == tmp_path / "merged"
    finally:
        parallel.destroy()
    assert not (tmp_path / "refused").exists()


def test_qwen_image_lora_per_phase_loads_through_the_pipeline(qwen_lora, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    assert export("--checkpoint", qwen_lora.checkpoints, "--dst", tmp_path / "lora") == 0
    info = read_info(tmp_path / "lora")
    assert [p["lora"] for p in info["phases"]] == ["phase_0_lora.safetensors", "phase_1_lora.safetensors"]
    for k, phase in enumerate(info["phases"]):
        transformer = QwenImageTransformer2DModel.from_pretrained(qwen_lora.config.model.teacher_path).eval()
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            transformer=transformer,
        )
        lora_into(pipe, tmp_path / "lora", phase["lora"])
        got = qwen_velocity(pipe.transformer, qwen_lora.inputs)
        assert rel_error(got, qwen_lora.outputs[f"generator{k}"]) < TOLERANCE
        assert rel_error(got, qwen_lora.teacher_outputs["high"]) > TRAINED

    assert export("--checkpoint", qwen_lora.checkpoints, "--dst", tmp_path / "merged", "--merge") == 0
    for k in range(2):
        merged = QwenImageTransformer2DModel.from_pretrained(tmp_path / "merged" / f"phase_{k}").eval()
        assert rel_error(qwen_velocity(merged, qwen_lora.inputs), qwen_lora.outputs[f"generator{k}"]) < TOLERANCE


# ----------------------------------------------------------------------------- refusals


def test_bad_requests_are_refused_and_leave_nothing_behind(wan_full, wan_lora, qwen_lora, tmp_path, capsys):
    cases = [
        (wan_full, ["--merge"], "--merge folds LoRA adapters into the weights, but .* holds full generators"),
        (wan_lora, ["--ema"], "holds no generator EMA .*drop --ema"),
        (qwen_lora, ["--layout", "original"], "Qwen-Image has no 'original' layout"),
        (qwen_lora, ["--merge", "--layout", "original"], "Qwen-Image has no 'original' layout"),
        (wan_full, ["model.lora.rank=x"], "model.lora.rank: expected an integer"),
    ]
    for run, extra, message in cases:
        assert export("--checkpoint", run.checkpoints, "--dst", tmp_path / "out", *extra) == 2
        assert __import__("re").search(message, capsys.readouterr().err), message
    assert export("--checkpoint", tmp_path, "--dst", tmp_path / "out") == 2
    assert "is not a training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    (tmp_path / "out").mkdir()
    assert export("--checkpoint", wan_full.checkpoints, "--dst", tmp_path / "out") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert export("--checkpoint", wan_full.checkpoints, "--dst", tmp_path / "out", "--overwrite") == 0
    assert (tmp_path / "out" / "transformer_2" / "config.json").is_file()


@pytest.mark.parametrize(
    "run_name, how", [("wan_full", "truncated"), ("wan_lora", "corrupt_header"), ("wan_lora", "missing_shard")]
)
def test_a_damaged_teacher_file_fails_the_export_in_one_line(request, tmp_path, capsys, run_name, how):
    """A full fine-tune reads the teacher's headers (its shapes), a LoRA run its weights too."""
    run = request.getfixturevalue(run_name)
    teacher = Path(shutil.copytree(run.config.model.teacher_path, tmp_path / "teacher"))
    if how == "missing_shard":
        last_file(teacher).unlink()
        file, message = teacher / "diffusion_pytorch_model.safetensors.index.json", "names shards that are not in"
    else:
        file, message = damage(last_file(teacher), how), DAMAGE_MESSAGES[how]
    capsys.readouterr()
    status = export("--checkpoint", run.checkpoints, "--dst", tmp_path / "out", f"model.teacher_path={teacher}")
    assert_failed_on(status, capsys.readouterr().err, file, message)
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("run_name", ["wan_full", "wan_lora"])
def test_an_export_failing_partway_leaves_no_destination_and_the_replaced_one_intact(
    request, tmp_path, monkeypatch, run_name, existing
):
    """Phase 0's folder (full weights) or LoRA file is written, phase 1's write fails."""
    import safetensors.torch

    from phased_dmd_mega.models import shards

    run = request.getfixturevalue(run_name)
    dst = tmp_path / "out"
    if existing:
        dst.mkdir()
        (dst / "notes.txt").write_text("the export this one replaces")
    before = folder_contents(dst) if existing else None
    module, name = (shards, "_write_file") if run_name == "wan_full" else (safetensors.torch, "save_file")
    write = failing_after(getattr(module, name), 1)
    monkeypatch.setattr(module, name, write)
    with pytest.raises(WriteFailed):
        export("--checkpoint", run.checkpoints, "--dst", dst, *(["--overwrite"] if existing else []))
    assert written_in_staging(write.done, dst)
    assert_left_as_before(dst, before)
