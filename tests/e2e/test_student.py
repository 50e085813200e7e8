"""A student of another size (``model.student_path``): a tiny diffusers Wan teacher of dim 48
and a student of dim 24 (same channels, patch and text width). The roles start from the
student's weights, never the teacher's (diffusers' own student model is the reference); a run
trains, resumes bit for bit, samples from its checkpoint and exports student-sized diffusers
folders; a student that disagrees with the teacher is refused before anything loads."""

import json
import re
import shutil

import pytest
import torch

from phased_dmd_mega import cli, parallel
from phased_dmd_mega.config import load_config
from phased_dmd_mega.distill.build import build_prompts, build_student, build_teacher, latent_geometry
from phased_dmd_mega.distill.phased import sample
from phased_dmd_mega.distill.trainer import Trainer
from phased_dmd_mega.export import EXPORT_INFO
from phased_dmd_mega.sample import sample_noise

from helpers import rel_error
from helpers.tiny_runs import (
    SHORT,
    forbid_loading,
    save_a14b_teacher,
    save_wan_student,
    save_wan_teacher,
    train_tiny,
    velocity,
    velocity_inputs,
    write_config,
)

TOLERANCE = 1e-5  # fp32, the project's model against diffusers'
APART = 1e-2  # the student and the teacher are other models
STUDENT_DIM, TEACHER_DIM = 24, 48


@torch.no_grad()
def diffusers_velocity(folder, inputs):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(folder).eval()
    return model(inputs["latents"], inputs["timestep"], inputs["context"], return_dict=False)[0]


def student_config(tmp_path, teacher, student, *overrides):
    return load_config(
        write_config(tmp_path),
        [f"model.teacher_path={teacher}", f"model.student_path={student}", "model.preset=null", *SHORT, *overrides],
    )


def roles_before_training(cfg):
    """Every role of a fresh Trainer (generators, fake experts, EMA), its velocity on fixed
    inputs, and its width."""
    parallel.initialize(seed=cfg.run.seed)
    try:
        teacher = build_teacher(cfg)
        dims = teacher.high.dims
        trainer = Trainer(cfg, teacher, build_prompts(cfg, dims), latent_geometry(dims), build_student(cfg))
        inputs = velocity_inputs(dims)
        models = {f"generator{k}": role.model for k, role in enumerate(trainer.generators)}
        models.update({f"fake{k}": role.model for k, role in enumerate(trainer.fakes)})
        models.update({f"generator{k}_ema": ema for k, ema in enumerate(trainer.ema or [])})
        experts = {
            f"{name}_{which}": getattr(experts, which)
            for name, experts in models.items()
            for which in ("high", "low")
            if getattr(experts, which) is not None
        }
        return inputs, {name: (velocity(m, inputs), m.dims.dim) for name, m in experts.items()}
    finally:
        parallel.destroy()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("two_experts", [False, True], ids=["one-model-teacher", "a14b-teacher"])
def test_every_role_starts_from_the_student(tmp_path, lora, two_experts):
    """Generators, fake models (both experts of a two-expert teacher's) and EMA copies: the
    student's velocity, at the student's width; not the teacher's."""
    student = save_wan_student(tmp_path / "student")
    if two_experts:
        teacher = save_a14b_teacher(tmp_path / "teacher", boundary_ratio=0.875)
        teacher_model = teacher / "transformer"
    else:
        teacher = teacher_model = save_wan_teacher(tmp_path / "teacher")
    extra = ["model.lora.rank=4"] if lora else []
    cfg = student_config(tmp_path, teacher, student, "optimizer.ema_decay=0.9", "phases.shift=7", *extra)
    inputs, roles = roles_before_training(cfg)
    expected = diffusers_velocity(student, inputs)
    teacher_velocity = diffusers_velocity(teacher_model, inputs)
    assert rel_error(expected, teacher_velocity) > APART
    names = {"generator0_high", "generator1_high", "fake0_high", "fake1_high", "generator0_ema_high"}
    assert names <= set(roles)
    if two_experts:
        assert "fake1_low" in roles  # phase 1 re-noises below the teacher's boundary: two fake experts
    for name, (got, dim) in roles.items():
        assert dim == STUDENT_DIM, name
        assert rel_error(got, expected) < TOLERANCE, name
        assert rel_error(got, teacher_velocity) > APART, name


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    """A full fine-tune from the student, saving every iteration, with an EMA and the
    in-process sampler's latents for prompt 1 with seed 7."""
    tmp = tmp_path_factory.mktemp("student_run")
    teacher, student = save_wan_teacher(tmp / "teacher"), save_wan_student(tmp / "student")

    def sampled(trainer):
        noise = sample_noise((4, 1, 4, 6), [7])
        condition = trainer.prompts.rows([1])
        return sample([role.model for role in trainer.generators], trainer.layout, noise, condition)

    overrides = ["optimizer.ema_decay=0.5", "checkpoint.save_every=1"]
    run = train_tiny(tmp, "run", teacher, overrides, extra=sampled, student=student)
    return run, teacher, student


def test_training_moves_the_student_sized_generators(student_run):
    run, _, student = student_run
    before = diffusers_velocity(student, run.inputs)
    for k in range(2):
        assert rel_error(run.outputs[f"generator{k}"], before) > 1e-4  # trained away from the student


def test_a_student_run_resumes_bit_for_bit(student_run, tmp_path):
    run, teacher, student = student_run
    resumed_dir = tmp_path / "again" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(run.checkpoints / "iter_0000001", resumed_dir / "iter_0000001")
    (resumed_dir / "latest").write_text(json.dumps({"checkpoint": "iter_0000001"}))
    again = train_tiny(tmp_path, "again", teacher, ["optimizer.ema_decay=0.5"], student=student)
    metrics = (again.root / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in metrics] == [2, 3]  # continued, not restarted
    for name, output in run.outputs.items():
        assert torch.equal(again.outputs[name], output), name


def test_resuming_with_another_student_is_refused(student_run, tmp_path, capsys):
    run, _, _ = student_run
    other = save_wan_student(tmp_path / "other", seed=9)
    saved = run.checkpoints / "iter_0000003" / "config.yaml"
    assert cli.main(["train", "--config", str(saved), f"model.student_path={other}"]) == 2
    err = capsys.readouterr().err
    assert "model.student_path (checkpoint" in err and str(other) in err, err


def test_sampling_from_the_checkpoint_runs_the_student_sized_generators(student_run, tmp_path):
    from safetensors.torch import load_file

    run, _, _ = student_run
    out = tmp_path / "s"
    args = ["sample", "--checkpoint", str(run.checkpoints), "-o", str(out), "--indices", "1", "--seed", "7"]
    assert cli.main(args) == 0
    got = load_file(str(out / "latents.safetensors"))["latents"]
    torch.testing.assert_close(got, run.extra, rtol=1e-6, atol=1e-6)


def test_the_export_is_a_student_sized_diffusers_pipeline(student_run, tmp_path):
    run, _, student = student_run
    dst = tmp_path / "out"
    assert cli.main(["export", "--checkpoint", str(run.checkpoints), "--dst", str(dst)]) == 0
    for k, sub in enumerate(("transformer", "transformer_2")):
        config = json.loads((dst / sub / "config.json").read_text())
        assert config["num_attention_heads"] * config["attention_head_dim"] == STUDENT_DIM
        assert config["ffn_dim"] == 20
        got = diffusers_velocity(dst / sub, run.inputs)
        assert rel_error(got, run.outputs[f"generator{k}"]) < TOLERANCE, sub
    info = json.loads((dst / EXPORT_INFO).read_text())
    assert info["source"]["student_path"] == str(student)


def test_a_lora_student_exports_adapters_on_the_student(tmp_path):
    """LoRA on the student: the exported files load into diffusers' student (not the teacher)
    and reproduce the trained generators."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    teacher, student = save_wan_teacher(tmp_path / "teacher"), save_wan_student(tmp_path / "student")
    run = train_tiny(tmp_path, "run", teacher, ["model.lora.rank=4", "model.lora.alpha=8"], student=student)
    dst = tmp_path / "lora"
    assert cli.main(["export", "--checkpoint", str(run.checkpoints), "--dst", str(dst)]) == 0
    info = json.loads((dst / EXPORT_INFO).read_text())
    assert info["lora"]["base"] == str(student) and [p["base_expert"] for p in info["phases"]] == ["model", "model"]
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=WanTransformer3DModel.from_pretrained(student).eval(),
        transformer_2=WanTransformer3DModel.from_pretrained(student).eval(),
        boundary_ratio=info["boundary_ratio"],
    )
    pipe.load_lora_weights(dst, weight_name="transformer_lora.safetensors")
    pipe.load_lora_weights(dst, weight_name="transformer_2_lora.safetensors", load_into_transformer_2=True)
    before = diffusers_velocity(student, run.inputs)
    for k, model in enumerate((pipe.transformer, pipe.transformer_2)):
        with torch.no_grad():
            got = model(run.inputs["latents"], run.inputs["timestep"], run.inputs["context"], return_dict=False)[0]
        assert rel_error(got, run.outputs[f"generator{k}"]) < TOLERANCE
        assert rel_error(got, before) > 1e-4  # the adapters moved it


# ----------------------------------------------------------------------------- refusals

MISMATCHES = [
    ({"in_channels": 8, "out_channels": 8}, "in_channels", 8, 4),
    ({"patch_size": (1, 1, 1)}, "patch_size", r"\(1, 1, 1\)", r"\(1, 2, 2\)"),
    ({"text_dim": 24}, "text_dim", 24, 16),
]


@pytest.mark.parametrize("change, field, mine, theirs", MISMATCHES, ids=[m[1] for m in MISMATCHES])
def test_a_student_of_another_latent_space_is_refused_before_anything_loads(
    tmp_path, capsys, monkeypatch, change, field, mine, theirs
):
    teacher = save_wan_teacher(tmp_path / "teacher")
    student = save_wan_student(tmp_path / "student", **change)
    config = write_config(tmp_path, model={"preset": None, "teacher_path": str(teacher), "student_path": str(student)})
    forbid_loading(monkeypatch)
    capsys.readouterr()
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    pattern = rf"model\.student_path \({re.escape(str(student))}\): the student's {field} is {mine}, the teacher's "
    assert re.search(pattern + rf"\(model\.teacher_path\) is {theirs}", err), err
    assert not (tmp_path / "run").exists()


def test_a_student_whose_heads_do_not_split_over_the_ranks_is_refused(tmp_path):
    from phased_dmd_mega.config import ConfigError
    from phased_dmd_mega.distill.build import open_inputs

    teacher = save_wan_teacher(tmp_path / "teacher")  # 4 heads: TP 4 splits them
    student = save_wan_student(tmp_path / "student", num_attention_heads=3, ffn_dim=24)
    cfg = student_config(tmp_path, teacher, student, "parallel.tensor_parallel=4", "data.synthetic_prompts=2")
    with pytest.raises(ConfigError, match=r"model\.student_path .*does not divide the 3 attention heads"):
        open_inputs(cfg)


def test_a_student_preset_without_a_student_path_is_refused(tmp_path):
    from phased_dmd_mega.config import ConfigError
    from phased_dmd_mega.distill.build import open_inputs

    cfg = load_config(write_config(tmp_path), ["model.student_preset=wan2.1-t2v-1.3b"])
    with pytest.raises(ConfigError, match=r"model\.student_preset is 'wan2\.1-t2v-1\.3b' but model\.student_path"):
        open_inputs(cfg)
