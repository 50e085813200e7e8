"""The memory estimate (phased_dmd_mega/memory_estimate.py) against independent counts.

- Parameters: the meta-device counts equal diffusers' own models of the full-size presets
  (built on the meta device too) and the project's models built for real; LoRA adapter counts
  per rank equal the adapters a tensor-parallel run really creates.
- Activations: the per-token formulas equal what autograd really saves (counted with
  saved-tensor hooks, each storage once) for one block of a real bf16 model, at TP 1, at TP 2
  with sequence parallelism and at Ulysses 2, with and without recompute.
- Optimizer: the bytes per rank the estimate gives a role equal, within megatron's padding,
  what the distributed optimizer and per-rank AdamW allocate at DP 2.
- The tool's arithmetic: tensor parallel divides the sharded part only; the README's table is
  the tool's current output.
"""

import re
import subprocess
import sys

import pytest
import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.config import ConfigError, load_config
from phased_dmd_mega.memory_estimate import (
    DTYPE_BYTES,
    GIB,
    ParameterCount,
    estimate,
    markdown_table,
    optimizer_items,
    parameter_counts,
    roles_of,
)
from phased_dmd_mega.models import ModelParallelOptions, QwenImageDims, QwenImageModel, WanDims, WanModel
from phased_dmd_mega.models.architectures import registry
from phased_dmd_mega.testing import run_distributed, with_parallel_state

from helpers import RECIPES, REPO_ROOT

ROOT = REPO_ROOT
LORA_TARGETS = ("linear_qkv", "linear_q", "linear_kv", "linear_proj", "linear_fc1", "linear_fc2")


# ----------------------------------------------------------------------------- parameters

DIFFUSERS_CONFIGS = {
    "wan2.1-t2v-1.3b": (
        "WanTransformer3DModel",
        dict(
            num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16
        ),
    ),
    "wan2.1-t2v-14b": (
        "WanTransformer3DModel",
        dict(
            num_attention_heads=40,
            attention_head_dim=128,
            ffn_dim=13824,
            num_layers=40,
            in_channels=16,
            out_channels=16,
        ),
    ),
    "wan2.2-i2v-a14b": (
        "WanTransformer3DModel",
        dict(
            num_attention_heads=40,
            attention_head_dim=128,
            ffn_dim=13824,
            num_layers=40,
            in_channels=36,
            out_channels=16,
        ),
    ),
    "qwen-image": ("QwenImageTransformer2DModel", {}),
}


@pytest.mark.parametrize("preset", list(DIFFUSERS_CONFIGS))
def test_parameter_counts_equal_diffusers_models(preset):
    import diffusers

    class_name, kwargs = DIFFUSERS_CONFIGS[preset]
    with torch.device("meta"):
        reference = getattr(diffusers, class_name)(**kwargs)
    expected = sum(p.numel() for p in reference.parameters())
    family = "qwen_image" if preset.startswith("qwen") else "wan"
    model, _ = parameter_counts(family, preset)
    assert model.total == expected


def _real_counts(family, lora_rank):
    from phased_dmd_mega.models.lora import add_adapter

    architecture = registry()[family]
    model = architecture.model_class(architecture.presets["tiny"], ModelParallelOptions())
    base = ParameterCount.of(model.parameters())
    view = add_adapter(model, "g", lora_rank, 8.0, LORA_TARGETS)
    return base, ParameterCount.of(view.parameters())


@pytest.mark.parametrize("family", ["wan", "qwen_image"])
def test_meta_counts_equal_a_real_model(family):
    base, adapters = with_parallel_state(_real_counts, family, 4)
    assert parameter_counts(family, "tiny", 4, LORA_TARGETS) == (base, adapters)


def _local_counts(family, lora_rank):
    base, adapters = _real_counts(family, lora_rank)
    return base.total, adapters.total


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan", "qwen_image"])
def test_per_rank_counts_equal_a_tensor_parallel_run(family):
    model, adapters = parameter_counts(family, "tiny", 4, LORA_TARGETS)
    for base, lora in run_distributed(
        with_parallel_state, 2, _local_counts, family, 4, parallel_sizes={"tensor_parallel": 2}
    ):
        assert base == model.per_rank(2)
        assert lora == adapters.per_rank(2)


def test_tensor_parallel_divides_only_the_sharded_weights():
    cfg1 = load_config(
        ROOT / "examples/wan22_t2v_a14b.yaml", ["parallel.tensor_parallel=1", "parallel.ulysses_parallel=1"]
    )
    cfg2 = load_config(
        ROOT / "examples/wan22_t2v_a14b.yaml", ["parallel.tensor_parallel=2", "parallel.ulysses_parallel=1"]
    )
    model, adapters = parameter_counts("wan", "wan2.2-t2v-a14b", 64, LORA_TARGETS)
    teacher1, teacher2 = estimate(cfg1).item("teacher"), estimate(cfg2).item("teacher")
    assert teacher1 == 2 * model.total * 2  # two bf16 experts
    assert teacher1 - teacher2 == 2 * 2 * model.sharded / 2  # half of the sharded part leaves each rank
    roles = roles_of(cfg1)
    roles1, roles2 = estimate(cfg1).item("trainable"), estimate(cfg2).item("trainable")
    assert roles1 - roles2 == pytest.approx((roles.generators + roles.fakes) * 2 * adapters.sharded / 2)


def _fake_models(cfg):
    from phased_dmd_mega.distill.build import fake_for_phase, phase_layout
    from phased_dmd_mega.distill.roles import Experts

    tiny = lambda: WanModel(WanDims(dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=8, freq_dim=16))  # noqa: E731
    teacher = Experts(tiny(), tiny(), cfg.phases.expert_boundary)
    layout = phase_layout(cfg)
    return [int(fake_for_phase(teacher, layout, k, cfg).low is not None) + 1 for k in range(layout.num_phases)]


@pytest.mark.parametrize(
    "overrides, models",
    [
        ([], [1, 2]),  # 4 steps, shift 5: both steps of phase 0 are high-noise ones (t >= 0.875)
        (["phases.expert_boundary=0.95"], [2, 2]),  # phase 0's second step (0.9375) is a low-noise one
        (["phases.expert_boundary=0.7"], [1, 2]),  # phase 1's last step (0.625) is below b
        (["phases.expert_boundary=0.5"], [1, 1]),  # every step is at t >= b: both phases are high-noise
        (["phases.expert_boundary=0.5", "phases.t_min=0.6"], [1, 1]),  # no re-noise time reaches below b
    ],
)
def test_fake_models_are_the_experts_their_renoise_times_reach(overrides, models):
    cfg = load_config(ROOT / "examples/wan22_t2v_a14b.yaml", ["model.lora.rank=0", *overrides])
    assert with_parallel_state(_fake_models, cfg) == models
    roles = roles_of(cfg)
    assert (roles.generators, roles.fakes, roles.largest) == (2, sum(models), max(models))


def test_full_fine_tuning_counts_optimizer_states_of_every_role():
    cfg = load_config(ROOT / "examples/wan21_t2v_1_3b.yaml")  # float32, full fine-tuning, TP 4
    est = estimate(cfg)
    model, _ = parameter_counts("wan", "wan2.1-t2v-1.3b")
    per_rank = model.per_rank(4) * 4
    assert est.item("teacher") == pytest.approx(per_rank)
    assert est.item("trainable") == pytest.approx(4 * per_rank)
    # The distributed optimizer (the default): fp32 moments split over the replicas, and an fp32
    # gradient buffer that every role keeps whole.
    assert est.item("AdamW") == pytest.approx(4 * 2 * per_rank)
    assert estimate(cfg, data_parallel=4).item("AdamW") == pytest.approx(4 * 2 * per_rank / 4)
    assert est.item("gradients") == pytest.approx(4 * per_rank)
    assert est.item("generator EMA") == pytest.approx(2 * per_rank)
    per_rank_adamw = estimate(load_config(ROOT / "examples/wan21_t2v_1_3b.yaml", ["optimizer.distributed=false"]), 4)
    assert per_rank_adamw.item("AdamW") == pytest.approx(4 * 2 * per_rank)  # whole on every rank
    assert per_rank_adamw.item("gradients") == pytest.approx(per_rank)  # the largest role's, freed after its step


@pytest.mark.parametrize("distributed", [True, False], ids=["distributed", "per_rank_adamw"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_optimizer_items_equal_what_the_optimizers_allocate(distributed, dtype):
    """bench/bench_optimizer_memory.py's measurement (one tiny Wan role, 2 gloo processes at
    DP 2, one real update) against the estimate's bytes per rank for that role."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_optimizer_memory import measure

    cfg = load_config(None, [f"model.dtype={dtype}", f"optimizer.distributed={str(distributed).lower()}"])
    for rank in run_distributed(measure, 2, distributed, dtype, "tiny"):
        (_, states), (_, gradients) = optimizer_items(cfg, 1, 1, rank["parameters"], data_parallel=2)
        # Within 1%: megatron pads its buffers and splits them at bucket boundaries.
        assert rank["state_bytes"] == pytest.approx(states, rel=0.01)
        assert rank["gradient_bytes"] == pytest.approx(gradients, rel=0.01)


def test_estimate_names_a_missing_preset():
    cfg = load_config(ROOT / "examples/wan22_t2v_a14b.yaml", ["model.preset=null"])
    with pytest.raises(ConfigError, match="model.preset: the memory estimate needs"):
        estimate(cfg)


def test_heads_must_divide_by_the_model_parallel_size():
    cfg = load_config(ROOT / "examples/qwen_image.yaml", ["parallel.tensor_parallel=16"])
    with pytest.raises(ConfigError, match="qwen-image has 24 attention heads, not divisible by tensor_parallel 16"):
        estimate(cfg)


# ----------------------------------------------------------------------------- activations

WAN_SMALL = WanDims(dim=256, ffn_dim=768, num_heads=4, num_layers=1, text_dim=32, freq_dim=32)
QWEN_SMALL = QwenImageDims(num_heads=4, head_dim=64, num_layers=1, text_dim=24, axes_dims_rope=(16, 24, 24))
TEXT = {"wan": 512, "qwen_image": 64}


def _inputs(family):
    gen = torch.Generator().manual_seed(0)
    if family == "wan":  # 4 x 16 x 32 latents: 2 x 8 x 16 = 256 tokens
        latents, tokens = torch.randn(1, 16, 4, 16, 32, generator=gen), 4 * 8 * 16
        context = torch.randn(1, TEXT["wan"], WAN_SMALL.text_dim, generator=gen)
    else:  # 32 x 32 latents packed 2x2: 256 tokens
        latents, tokens = torch.randn(1, 16, 32, 32, generator=gen), 16 * 16
        context = torch.randn(1, TEXT["qwen_image"], QWEN_SMALL.text_dim, generator=gen)
    return latents, torch.tensor([500.0]), context, tokens


def _saved_bytes(model, *inputs) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward (the
    model's own parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(seen.values())


def _block_bytes(family, recompute):
    """Bytes saved by one block: a 2-block model minus a 1-block one (same inputs)."""
    from dataclasses import replace

    base = WAN_SMALL if family == "wan" else QWEN_SMALL
    model_class = WanModel if family == "wan" else QwenImageModel
    latents, t, context, _ = _inputs(family)
    par = ModelParallelOptions(
        dtype=torch.bfloat16,
        attention_backend="sdpa",
        recompute=recompute,
        sequence_parallel=parallel.layout().sequence_parallel,
    )
    sizes = []
    for layers in (1, 2):
        torch.manual_seed(0)
        sizes.append(_saved_bytes(model_class(replace(base, num_layers=layers), par), latents, t, context))
    return sizes[1] - sizes[0]


def _expected_block_bytes(family, tp, ulysses, sp, recompute):
    dims = WAN_SMALL if family == "wan" else QWEN_SMALL
    blocks = registry()[family].block_activations(dims, DTYPE_BYTES["bfloat16"])
    _, _, _, tokens = _inputs(family)
    streamed = tokens + (TEXT["qwen_image"] if family == "qwen_image" else 0)
    if recompute == "full":
        return streamed / ulysses * blocks.block_input / (tp if sp else 1)
    fixed = TEXT["wan"] * blocks.text_fixed / tp if family == "wan" else 0
    return streamed / ulysses * blocks.per_token(tp, sp) + fixed


@pytest.mark.parametrize("recompute", ["none", "full"])
@pytest.mark.parametrize("family", ["wan", "qwen_image"])
def test_block_activations_equal_what_autograd_saves(family, recompute):
    measured = with_parallel_state(_block_bytes, family, recompute)
    expected = _expected_block_bytes(family, 1, 1, False, recompute)
    assert measured == pytest.approx(expected, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("tp, ulysses", [(2, 1), (1, 2)])
@pytest.mark.parametrize("family", ["wan", "qwen_image"])
def test_block_activations_per_rank_under_tensor_and_sequence_parallelism(family, tp, ulysses):
    for recompute in ("none", "full"):
        expected = _expected_block_bytes(family, tp, ulysses, tp > 1, recompute)
        sizes = {"tensor_parallel": tp, "ulysses_parallel": ulysses, "sequence_parallel": tp > 1}
        for measured in run_distributed(with_parallel_state, 2, _block_bytes, family, recompute, parallel_sizes=sizes):
            assert measured == pytest.approx(expected, rel=0.05), recompute


# ----------------------------------------------------------------------------- the tool


def test_recipes_fit_an_h100_by_the_estimate():
    for name in RECIPES:
        est = estimate(load_config(ROOT / f"examples/{name}.yaml"))
        assert est.fits, f"{name}: {est.total / GIB:.1f} GiB"


def test_readme_table_is_the_tools_output():
    readme = (ROOT / "README.md").read_text()
    table = markdown_table([f"examples/{name}.yaml" for name in RECIPES])
    assert table in readme, (
        "README's memory table is stale: regenerate it with\n"
        "python -m phased_dmd_mega.memory_estimate --markdown " + " ".join(f"examples/{n}.yaml" for n in RECIPES)
    )


def test_recipe_comments_state_the_estimate():
    for name in RECIPES:
        text = (ROOT / f"examples/{name}.yaml").read_text()
        stated = re.search(r"about (\d+) GiB of 80", text)
        assert stated, f"{name}.yaml does not state its memory estimate"
        total = estimate(load_config(ROOT / f"examples/{name}.yaml")).total / GIB
        assert abs(int(stated.group(1)) - total) <= 1.5, f"{name}.yaml says {stated.group(1)} GiB, the tool {total:.1f}"


def test_command_line_prints_the_breakdown_and_reports_errors():
    def run(*args):
        command = [sys.executable, "-m", "phased_dmd_mega.memory_estimate", *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)

    ok = run("--config", "examples/qwen_image.yaml", "data.batch_size=1")
    assert ok.returncode == 0, ok.stderr
    assert "batch 1 per data-parallel rank at 1x1328x1328" in ok.stdout and "total (estimate)" in ok.stdout
    bad = run("--config", "examples/qwen_image.yaml", "model.preset=qwen-huge")
    assert bad.returncode == 2
    assert "model.preset: 'qwen-huge' is not a qwen_image preset" in bad.stderr
    split = run("--config", "examples/qwen_image.yaml", "--data-parallel", "4")
    assert split.returncode == 0, split.stderr
    assert "4 data-parallel replicas" in split.stdout and "split over 8 DP x Ulysses ranks" in split.stdout
    assert run("--config", "examples/qwen_image.yaml", "--data-parallel", "0").returncode == 2


def test_a_students_roles_are_counted_at_its_size_and_the_teacher_at_its_own():
    student = load_config(ROOT / "examples/wan21_14b_to_1_3b.yaml")
    alone = estimate(load_config(ROOT / "examples/wan21_14b_to_1_3b.yaml", ["model.student_preset=null"]))
    with_student = estimate(student)
    tp = student.parallel.tensor_parallel
    small, _ = parameter_counts("wan", "wan2.1-t2v-1.3b")
    large, _ = parameter_counts("wan", "wan2.1-t2v-14b")
    assert with_student.item("teacher weights") == alone.item("teacher weights") == large.per_rank(tp) * 2
    assert with_student.item("trainable roles") == 4 * small.per_rank(tp) * 2  # 2 generators + 2 fakes, bf16
    assert alone.item("trainable roles") == 4 * large.per_rank(tp) * 2
    assert with_student.item("generator EMA") == 2 * small.per_rank(tp) * 2
    assert with_student.item("activations") < alone.item("activations")  # the student's blocks keep less
    assert with_student.item("working") == alone.item("working")  # the teacher's guided block
    assert "wan2.1-t2v-14b -> wan2.1-t2v-1.3b" in markdown_table(["examples/wan21_14b_to_1_3b.yaml"])


def test_a_lora_student_counts_its_shared_weights_and_a_student_needs_its_preset():
    lora = estimate(load_config(ROOT / "examples/wan21_14b_to_1_3b.yaml", ["model.lora.rank=64"]))
    small, adapters = parameter_counts("wan", "wan2.1-t2v-1.3b", 64, tuple(lora.config.model.lora.target_modules))
    assert lora.item("student weights") == small.per_rank(4) * 2
    assert lora.item("trainable roles") == 4 * adapters.per_rank(4) * 2
    unnamed = ["model.student_preset=null", "model.student_path=/somewhere/Wan2.1-T2V-1.3B"]
    with pytest.raises(ConfigError, match=r"model\.student_preset: .*student's preset name"):
        estimate(load_config(ROOT / "examples/wan21_14b_to_1_3b.yaml", unnamed))
    with pytest.raises(ConfigError, match=r"parallel: wan2\.1-t2v-1\.3b has 12 attention heads"):
        estimate(load_config(ROOT / "examples/wan21_14b_to_1_3b.yaml", ["parallel.tensor_parallel=8"]))
