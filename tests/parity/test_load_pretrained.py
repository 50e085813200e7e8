"""load_pretrained: every checkpoint layout gives diffusers' output (the numerical reference).

A tiny random diffusers WanTransformer3DModel (every parameter random, norms included) is saved
sharded; the original-layout and mega folders are made from it by the converter (whose renames
test_convert.py checks against independent ones). Each is loaded at TP=1 in this process and, for the mega and original
layouts, at TP=2 on two gloo processes where each rank reads only its slices.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from phased_dmd_mega import convert, parallel
from phased_dmd_mega.errors import DamagedFileError
from phased_dmd_mega.models import WanModel, load_pretrained
from phased_dmd_mega.models.checkpoints import inspect_checkpoint, open_model
from phased_dmd_mega.models.wan_formats import CheckpointError
from phased_dmd_mega.models.weights import TensorReader, build_local_tensor
from phased_dmd_mega.testing import run_distributed, with_parallel_state

from helpers.damaged_files import DAMAGE_MESSAGES, DAMAGES, assert_failed_on, damage, last_file
from helpers.tiny_models import WAN_TINY, randomize_

TINY = WAN_TINY
VARIANTS = {
    "t2v": {},
    "i2v": dict(image_dim=8, added_kv_proj_dim=48),
    "ti2v": dict(in_channels=48, out_channels=48),
}
TOLERANCE = 1e-5
FORMATS = ("diffusers", "original", "mega")


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def inputs(in_channels=4, image=False):
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(2, in_channels, 3, 4, 6, generator=gen)  # 18 tokens: padded and masked at TP 2
    context = torch.randn(2, 512, 16, generator=gen)  # diffusers' I2V splits the image off at 512 text tokens
    image = torch.randn(2, 5, 8, generator=gen) if image else None
    return latents, torch.tensor([999.0, 250.0]), context, image


def diffusers_output(folder):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(folder).eval()
    latents, timestep, context, image = inputs(model.config.in_channels, model.config.image_dim is not None)
    with torch.no_grad():
        return model(latents, timestep, context, encoder_hidden_states_image=image).sample


def save_all_formats(root: Path, variant: str, seed: int = 0):
    """{format: folder} holding the same weights in the three layouts."""
    from diffusers import WanTransformer3DModel

    model = randomize_(WanTransformer3DModel(**{**TINY, **VARIANTS[variant]}), seed)
    model.save_pretrained(root / "diffusers", max_shard_size="40KB")
    convert.hf_to_mega(root / "diffusers", root / "mega", max_shard_bytes=40_000)
    convert.mega_to_hf(root / "mega", root / "original", layout="original")
    return {name: root / name for name in FORMATS}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> ({format: folder}, diffusers' output), built once per variant."""
    cache = {}

    def get(variant):
        if variant not in cache:
            folders = save_all_formats(tmp_path_factory.mktemp(f"wan_{variant}"), variant)
            cache[variant] = folders, diffusers_output(folders["diffusers"])
        return cache[variant]

    return get


def load_and_run(folder, expert=None, **options):
    model = load_pretrained(folder, expert=expert, attention_backend="sdpa", **options).eval()
    assert isinstance(model, WanModel)
    latents, timestep, context, image = inputs(model.dims.in_channels, model.dims.image_dim is not None)
    with torch.no_grad():
        return model(latents, timestep, context, image)


in_process = with_parallel_state


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp1_every_format_matches_diffusers(saved, variant, fmt):
    folders, reference = saved(variant)
    assert rel_error(in_process(load_and_run, folders[fmt]), reference) < TOLERANCE


def test_bf16_model_from_a_float32_checkpoint(saved):
    folders, _ = saved("t2v")

    def load():
        model = load_pretrained(folders["mega"], dtype=torch.bfloat16, attention_backend="sdpa")
        return {p.dtype for p in model.parameters()}

    assert in_process(load) == {torch.bfloat16}


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_mega_view_reads_the_rule_tables_slices(saved, variant):
    """The mega layout's direct slice reads equal the rule table's per-rank tensors, and its
    per-source view serves build_local_tensor like a diffusers folder does."""
    folders, _ = saved(variant)
    mega = open_model(folders["mega"], "mega").view
    hf = TensorReader(folders["diffusers"])
    for rank in range(2):
        for rule in mega.rules:
            want = build_local_tensor(rule, hf, rank, 2)
            assert torch.equal(mega.read_local(rule, rank, 2), want), rule.own
            assert torch.equal(build_local_tensor(rule, mega, rank, 2), want), rule.own


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_rank_reads_only_its_slices(saved, fmt, monkeypatch):
    folders, _ = saved("i2v")
    view = open_model(folders[fmt], fmt).view
    reads = []
    real_read = view.files.read

    def spy(name, dim=None, start=0, stop=None):
        reads.append((name, dim, start, stop))
        return real_read(name, dim, start, stop)

    monkeypatch.setattr(view.files, "read", spy)
    for rule in view.rules:
        if rule.split == "replicated":
            continue
        reads.clear()
        view.read_local(rule, 1, 2)
        assert reads, rule.own
        for name, dim, start, stop in reads:
            full = view.files.shape(name)[dim]
            assert dim == (1 if rule.split == "row" else 0) and (start, stop) == (full // 2, full), (rule.own, name)


# ----------------------------------------------------------------------------- two experts


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("a14b")
    pipe = root / "pipe"
    for seed, sub in ((1, "transformer"), (2, "transformer_2")):
        randomize_(WanTransformer3DModel(**{**TINY, "in_channels": 16}), seed).save_pretrained(pipe / sub)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875}))
    convert.hf_to_mega(pipe, root / "mega")
    return pipe, root / "mega"


def _experts_run(folder):
    return {expert: load_and_run(folder, expert) for expert in ("high", "low")}


@pytest.mark.parametrize("fmt", ["diffusers", "mega"])
def test_two_expert_checkpoints_load_the_chosen_expert(experts, fmt):
    pipe, mega = experts
    outs = in_process(_experts_run, pipe if fmt == "diffusers" else mega)
    assert rel_error(outs["high"], diffusers_output(pipe / "transformer")) < TOLERANCE
    assert rel_error(outs["low"], diffusers_output(pipe / "transformer_2")) < TOLERANCE
    assert inspect_checkpoint(mega).boundary_ratio == 0.875


def test_two_expert_checkpoint_needs_an_expert(experts):
    pipe, mega = experts
    with pytest.raises(CheckpointError, match=r"holds two experts .*pass expert='high' or expert='low' \(got None\)"):
        in_process(load_pretrained, mega)
    with pytest.raises(CheckpointError, match=r"holds two experts .*\(got 'middle'\)"):
        in_process(load_pretrained, pipe, expert="middle")


# ----------------------------------------------------------------------------- errors


def test_expert_on_a_single_model_is_refused(saved):
    folders, _ = saved("t2v")
    with pytest.raises(CheckpointError, match=r"expert='high' given, but .* holds a single model"):
        in_process(load_pretrained, folders["mega"], expert="high")


def test_preset_must_match_the_checkpoint(saved):
    folders, _ = saved("t2v")
    with pytest.raises(CheckpointError, match=r"is not preset 'wan2.1-t2v-1.3b': dim 48 \(preset 1536\)"):
        in_process(load_pretrained, folders["original"], expect="wan2.1-t2v-1.3b")


def test_unknown_model_option_is_refused(saved):
    folders, _ = saved("t2v")
    with pytest.raises(TypeError, match=r"unknown model options \['attention'\]"):
        in_process(load_pretrained, folders["diffusers"], attention="sdpa")


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_teacher_file_is_refused_naming_it(tmp_path, saved, how):
    folders, _ = saved("t2v")
    teacher = Path(shutil.copytree(folders["diffusers"], tmp_path / "teacher"))
    file = damage(last_file(teacher), how)
    with pytest.raises(DamagedFileError, match=DAMAGE_MESSAGES[how]) as refused:
        in_process(load_pretrained, teacher)
    assert str(file) in str(refused.value)


@pytest.mark.parametrize("how", [*DAMAGES, "missing_shard"])
def test_train_with_a_damaged_teacher_fails_in_one_line(tmp_path, saved, capsys, how):
    from phased_dmd_mega import cli

    from helpers.tiny_runs import write_config

    folders, _ = saved("t2v")
    teacher = Path(shutil.copytree(folders["mega"], tmp_path / "teacher"))
    if how == "missing_shard":
        last_file(teacher).unlink()
        file, message = teacher / "model.safetensors.index.json", "names shards that are not in"
    else:
        file, message = damage(last_file(teacher), how), DAMAGE_MESSAGES[how]
    config = write_config(tmp_path)
    status = cli.main(["train", "--config", str(config), f"model.teacher_path={teacher}", "model.preset=null"])
    assert_failed_on(status, capsys.readouterr().err, file, message)
    assert not (tmp_path / "run").exists()


def test_needs_the_parallel_state(saved):
    folders, _ = saved("t2v")
    with pytest.raises(RuntimeError, match=r"parallel\.initialize\(\) first"):
        load_pretrained(folders["diffusers"])


# ----------------------------------------------------------------------------- tensor parallel


def _tp2_outputs(folders):
    parallel.initialize(tensor_parallel=2)
    try:
        return {fmt: load_and_run(folders[fmt]) for fmt in ("mega", "original")}
    finally:
        parallel.destroy()


@pytest.mark.slow
def test_tp2_mega_and_original_match_diffusers(saved):
    folders, reference = saved("i2v")  # the richest variant: every rule kind, image branch included
    for outputs in run_distributed(_tp2_outputs, 2, folders):
        for fmt, out in outputs.items():
            assert rel_error(out, reference) < TOLERANCE, fmt
