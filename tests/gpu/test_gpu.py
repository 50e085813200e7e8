"""The CUDA paths, run by `pytest -m gpu` on a GPU machine (conftest keeps CUDA hidden in every
other run, so that the CPU suite runs the same on a GPU host). `bench/gpu_check.py` runs them.

Each test names its reference: float64 formulas for the compiled Triton kernels, the local layer
spec for the Transformer Engine spec, bf16 for FP8, SDPA for flash-attn and TE attention, and an
uninterrupted run for a resumed one. Tests that need TE or flash-attn skip where it is absent.
Only this project, torch, triton, megatron-core and deepspeed are imported (no diffusers), so the
file runs on a bare machine given `bench/gpu_check.py --wheels`.
"""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from phased_dmd_mega import losses, parallel
from phased_dmd_mega.config import load_config
from phased_dmd_mega.distill.build import build_prompts, build_teacher, latent_geometry
from phased_dmd_mega.distill.trainer import Trainer
from phased_dmd_mega.models import QWEN_IMAGE_PRESETS, ModelParallelOptions, QwenImageModel, WanModel
from phased_dmd_mega.models.attention import AttentionCore, KeyMask, sdpa_attention
from phased_dmd_mega.models.wan import WAN_PRESETS

from helpers.tiny_runs import write_config

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16
# TE's FP8 GEMMs take widths that are multiples of 16: the tiny presets, widened a little.
WAN = replace(WAN_PRESETS["tiny"], dim=128, ffn_dim=256, num_heads=2, text_dim=64)
QWEN = replace(QWEN_IMAGE_PRESETS["tiny"], num_heads=4, head_dim=32, axes_dims_rope=(8, 12, 12), text_dim=64)


def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} is not installed")


needs_te = needs("transformer_engine")


@pytest.fixture
def one_gpu():
    parallel.initialize(seed=0)
    yield
    parallel.destroy()


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def cosine(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return F.cosine_similarity(actual.double().flatten(), expected.double().flatten(), dim=0).item()


# ----------------------------------------------------------------------------- compiled kernels


def _randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_compiled_subinterval_loss_matches_its_float64_formula(dtype):
    from phased_dmd_mega.kernels import is_interpreted

    assert not is_interpreted() and losses.resolve_backend(_randn(1)) == "triton"
    v, x_s, eps = (_randn(3, 16, 3, 30, 52, dtype=dtype, seed=i).requires_grad_(i == 0) for i in range(3))
    s = torch.tensor([0.0, 0.6, 0.2], device="cuda")
    t = torch.tensor([0.3, 0.61, 0.99], device="cuda")
    loss = losses.subinterval_flow_loss(v, x_s, eps, s, t, weight_clamp=4.0)
    loss.sum().backward()
    # Spec section 3: psi* = c_eps eps - x_s / alpha_s, weight min(1, C sigma_{t|s}^2).
    s64, t64 = s.double()[:, None, None, None, None], t.double()[:, None, None, None, None]
    sigma_sq = t64**2 - ((1 - t64) / (1 - s64)) ** 2 * s64**2
    c_eps = ((1 - s64) ** 2 * t64 + (1 - t64) * s64**2) / ((1 - s64) ** 2 * sigma_sq.sqrt())
    diff = v.detach().double() - (c_eps * eps.double() - x_s.double() / (1 - s64))
    weight = (4.0 * sigma_sq).clamp(max=1)
    expected = (weight * diff.square()).flatten(1).mean(1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_error(loss, expected) < tol
    assert rel_error(v.grad, 2 * weight * diff / diff[0].numel()) < tol


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_compiled_dmd_loss_matches_its_float64_formula(dtype):
    student = _randn(2, 16, 3, 30, 52, dtype=dtype, seed=3).requires_grad_(True)
    fake, teacher = _randn(2, 16, 3, 30, 52, dtype=dtype, seed=4), _randn(2, 16, 3, 30, 52, dtype=dtype, seed=5)
    loss = losses.dmd_loss(student, fake, teacher, norm_min=1e-4)
    loss.backward()
    # Spec section 4: g = (fake - real) / mean_b |x_s - real|, loss = 0.5 mean(g^2), grad g / numel.
    norm = (student.detach().double() - teacher.double()).abs().flatten(1).mean(1).clamp(min=1e-4)
    direction = (fake.double() - teacher.double()) / norm[:, None, None, None, None]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - 0.5 * direction.square().mean().item()) < tol * 0.5 * direction.square().mean().item()
    assert rel_error(student.grad, direction / direction.numel()) < tol


# ----------------------------------------------------------------------------- layer specs and FP8


def _wan_inputs(batch=1):
    gen = torch.Generator(device="cuda").manual_seed(1)
    return (
        torch.randn(batch, 16, 2, 16, 16, generator=gen, device="cuda"),
        torch.tensor([500.0] * batch, device="cuda"),
        torch.randn(batch, 16, WAN.text_dim, generator=gen, device="cuda"),
    )


def _qwen_inputs():
    gen = torch.Generator(device="cuda").manual_seed(2)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool, device="cuda")  # holes
    return (
        torch.randn(2, 16, 8, 12, generator=gen, device="cuda"),
        torch.tensor([900.0, 200.0], device="cuda"),
        torch.randn(2, 7, QWEN.text_dim, generator=gen, device="cuda"),
        mask,
    )


MODELS = {"wan": (WanModel, WAN, _wan_inputs), "qwen_image": (QwenImageModel, QWEN, _qwen_inputs)}


def _copy_parameters(source, target):
    """Parameters by name (TE layers add FP8 metadata to state dicts; the weights are the same)."""
    targets = dict(target.named_parameters())
    with torch.no_grad():
        for name, param in source.named_parameters():
            targets.pop(name).copy_(param)
    assert not targets, f"parameters only in the target: {sorted(targets)}"


def _model_pair(name, backend="sdpa", **options):
    """A local-spec model with random weights on the GPU, and a model of the given options with
    the same weights."""
    model_class, dims, _ = MODELS[name]
    torch.manual_seed(0)
    reference = model_class(dims, ModelParallelOptions(dtype=BF16, attention_backend="sdpa")).cuda()
    other = model_class(
        dims, ModelParallelOptions(dtype=BF16, attention_backend=backend, initialize=False, **options)
    ).cuda()
    _copy_parameters(reference, other)
    return reference, other


def _forward_backward(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    out.float().square().mean().backward()
    return out.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None}


@needs_te
@pytest.mark.parametrize("name", sorted(MODELS))
def test_te_spec_matches_the_local_spec_forward_and_backward_in_bf16(one_gpu, name):
    local, te_model = _model_pair(name, transformer_impl="transformer_engine")
    inputs = MODELS[name][2]()
    out_local, grads_local = _forward_backward(local, inputs)
    out_te, grads_te = _forward_backward(te_model, inputs)
    assert rel_error(out_te, out_local) < 2e-2
    assert grads_te.keys() == grads_local.keys()
    worst = max(grads_te, key=lambda n: rel_error(grads_te[n], grads_local[n]))
    assert rel_error(grads_te[worst], grads_local[worst]) < 5e-2, worst


# FP8 (E4M3 forward, E5M2 gradients) against the same TE model in bf16, the stated tolerance: cosine
# similarity of the output, of the whole gradient, and of each parameter's gradient.
FP8_FORWARD_COSINE, FP8_GRADIENT_COSINE, FP8_PARAMETER_COSINE = 0.99, 0.98, 0.9


@needs_te
@pytest.mark.parametrize("recipe", ["delayed", "current"])
@pytest.mark.parametrize("recompute", ["none", "full"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp8_forward_and_backward_stay_within_tolerance_of_bf16(one_gpu, name, recipe, recompute):
    _, bf16 = _model_pair(name, transformer_impl="transformer_engine")
    _, fp8 = _model_pair(name, transformer_impl="transformer_engine", fp8_recipe=recipe, recompute=recompute)
    inputs = MODELS[name][2]()
    out_bf16, grads_bf16 = _forward_backward(bf16, inputs)
    for _ in range(2):  # the second step runs on the scales the first one measured (delayed scaling)
        out_fp8, grads_fp8 = _forward_backward(fp8, inputs)
    assert torch.isfinite(out_fp8).all()
    assert cosine(out_fp8, out_bf16) > FP8_FORWARD_COSINE
    assert grads_fp8.keys() == grads_bf16.keys()
    whole = [torch.cat([g.flatten() for g in grads.values()]) for grads in (grads_fp8, grads_bf16)]
    assert cosine(*whole) > FP8_GRADIENT_COSINE
    for param in grads_fp8:
        assert cosine(grads_fp8[param], grads_bf16[param]) > FP8_PARAMETER_COSINE, param


@needs_te
def test_fp8_uses_the_weights_as_they_are_now_not_a_cast_cached_at_the_first_call(one_gpu):
    _, reference = _model_pair("wan", transformer_impl="transformer_engine")
    _, fp8 = _model_pair("wan", transformer_impl="transformer_engine", fp8_recipe="delayed")
    inputs = _wan_inputs()
    with torch.no_grad():
        before = fp8(*inputs).float()
        for model in (reference, fp8):  # what an optimizer step does: new weights, same modules
            for block in model.blocks:
                block.mlp.linear_fc2.weight.mul_(-1.5)
        fp8(*inputs)  # delayed scaling: the scales follow the new weights' range one call later
        after, expected = fp8(*inputs).float(), reference(*inputs).float()
    assert cosine(after, expected) > FP8_FORWARD_COSINE
    assert rel_error(after, before) > 0.1


@needs_te
def test_mxfp8_is_refused_where_the_gpu_cannot_run_it(one_gpu):
    if torch.cuda.get_device_capability() >= (10, 0):
        pytest.skip("this GPU runs MXFP8")
    with pytest.raises(ValueError, match="fp8_recipe=mxfp8 needs compute capability 10.0 or higher"):
        WanModel(WAN, ModelParallelOptions(dtype=BF16, transformer_impl="transformer_engine", fp8_recipe="mxfp8"))


@needs_te
def test_lora_adapts_the_te_linears_as_it_does_the_local_ones(one_gpu):
    from phased_dmd_mega.models.lora import LoRALinear, add_adapter

    local, te_model = _model_pair("wan", transformer_impl="transformer_engine")
    views = [add_adapter(model, "generator0", 4, 4.0, ["linear_qkv", "linear_fc2"]) for model in (local, te_model)]
    wrapped = [sum(isinstance(m, LoRALinear) for m in model.modules()) for model in (local, te_model)]
    assert wrapped[0] == wrapped[1] == 2 * WAN.num_layers
    with torch.no_grad():  # a non-zero B makes the adapter change the output
        for view in views:
            for pair in view.adapters:
                pair.lora_B.fill_(0.01)
    inputs = _wan_inputs()
    out_local, grads_local = _forward_backward(views[0], inputs)
    out_te, grads_te = _forward_backward(views[1], inputs)
    assert rel_error(out_te, out_local) < 2e-2
    assert grads_te.keys() == grads_local.keys() and len(grads_te) == 2 * 2 * WAN.num_layers
    for param in grads_te:
        assert rel_error(grads_te[param], grads_local[param]) < 5e-2, param


# ----------------------------------------------------------------------------- attention backends


BACKENDS = {"flash": "flash_attn", "te": "transformer_engine"}


def _skip_without(backend):
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        pytest.skip(f"{BACKENDS[backend]} is not installed")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("masked", [False, True])
def test_attention_core_matches_sdpa(one_gpu, backend, masked):
    _skip_without(backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(300, 2, 4, 64, generator=gen, device="cuda", dtype=BF16) for _ in range(3))
    key_mask = None
    if masked:  # holes, and a different count per sample
        mask = torch.rand(2, 300, generator=gen, device="cuda") < 0.7
        key_mask = KeyMask(mask)
    out = AttentionCore(backend, 4, 64, ulysses=False).cuda()(q, k, v, key_mask)
    expected = sdpa_attention(q.float(), k.float(), v.float(), key_mask)
    real = slice(None) if key_mask is None else key_mask.mask.transpose(0, 1)
    assert rel_error(out.float()[real], expected[real]) < 2e-2


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_match_sdpa_with_flash_and_te_attention(one_gpu, name, backend):
    """Wan's video self-attention, and Qwen-Image's joint attention with masked text (holes)."""
    _skip_without(backend)
    impl = "transformer_engine" if backend == "te" else "local"
    if impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("transformer_engine is not installed")
    sdpa, other = _model_pair(name, backend=backend, transformer_impl=impl)
    inputs = MODELS[name][2]()
    out_sdpa, grads_sdpa = _forward_backward(sdpa, inputs)
    out_other, grads_other = _forward_backward(other, inputs)
    assert rel_error(out_other, out_sdpa) < 3e-2
    for param in grads_other:
        assert rel_error(grads_other[param], grads_sdpa[param]) < 6e-2, param


# ----------------------------------------------------------------------------- training on CUDA


GPU_RUN = [
    "model.dtype=bfloat16",
    "model.attention_backend=auto",
    "phases.iterations_per_phase=1",
    "checkpoint.save_every=1",
    "data.batch_size=2",
]
RUNS = {
    "full_ema": ["optimizer.ema_decay=0.9"],
    "full_per_rank_adamw": ["optimizer.distributed=false", "optimizer.ema_decay=0.9"],
    "lora": ["model.lora.rank=4"],
    "te_fp8": ["model.transformer_impl=transformer_engine", "model.fp8_recipe=delayed", "optimizer.ema_decay=0.9"],
    "te_fp8_lora": ["model.transformer_impl=transformer_engine", "model.fp8_recipe=delayed", "model.lora.rank=4"],
}


def _optimizer_state_devices(role) -> set:
    """Devices of a role's AdamW moments (and fp32 main weights); EMA copies have no optimizer."""
    if role.optimizer is None:
        return set()
    role.ensure_state()
    if hasattr(role, "owned_slices"):  # megatron's distributed optimizer
        tensors = [t for owned in role.owned_slices().values() for t in owned.states.values()]
    else:  # torch AdamW keeps its step counters on the CPU by design
        tensors = [t for state in role.optimizer.state.values() for key, t in state.items() if key != "step"]
    return {t.device.type for t in tensors}


def _train(tmp_path: Path, name: str, overrides):
    """Run the trainer in this process; returns its metrics and where every role's tensors were."""
    cfg = load_config(write_config(tmp_path, name), [*GPU_RUN, *overrides])
    parallel.initialize(seed=cfg.run.seed)
    try:
        teacher = build_teacher(cfg)
        trainer = Trainer(cfg, teacher, build_prompts(cfg, teacher.high.dims), latent_geometry(teacher.high.dims))
        modules = [teacher, *(role.model for role in trainer.roles().values())]
        devices = {t.device.type for m in modules for t in (*m.parameters(), *m.buffers())}
        devices |= {d for role in trainer.roles().values() for d in _optimizer_state_devices(role)}
        trainer.run()
        weights = {
            role_name: {n: p.detach().cpu().clone() for n, p in role.model.named_parameters()}
            for role_name, role in trainer.roles().items()
        }
    finally:
        parallel.destroy()
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return records, devices, weights


@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_tiny_run_trains_checkpoints_and_resumes_on_cuda(tmp_path, run):
    if "transformer_engine" in " ".join(RUNS[run]) and importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("transformer_engine is not installed")
    records, devices, weights = _train(tmp_path, "whole", RUNS[run])
    assert devices == {"cuda"}  # every role, EMA copy and buffer on the GPU
    assert [r["iteration"] for r in records] == [0, 1]
    assert all(r["dmd_loss"] > 0 and r["fake_loss"] > 0 and r["peak_memory_gib"] > 0 for r in records)
    assert (tmp_path / "whole" / "checkpoints" / "iter_0000001").is_dir()
    # The same run resumed from its first checkpoint (another folder): iteration 1 again.
    first = tmp_path / "whole" / "checkpoints" / "iter_0000000"
    resumed, _, resumed_weights = _train(tmp_path, "resumed", [*RUNS[run], f"checkpoint.resume={first}"])
    assert [r["iteration"] for r in resumed] == [1]
    for key in ("fake_loss", "dmd_loss"):  # GPU backward kernels are not bitwise deterministic
        assert resumed[0][key] == pytest.approx(records[1][key], rel=2e-2), key
    # Iteration 1 trains phase 1: phase 0's roles are what the checkpoint holds, bit for bit.
    phase0 = [role for role in weights if role.startswith(("generator0", "fake0"))]
    assert phase0
    for role in phase0:
        for param, value in weights[role].items():
            assert torch.equal(resumed_weights[role][param], value), f"{role}.{param}"


def test_the_trainer_runs_under_torchrun_on_nccl(tmp_path):
    config = write_config(tmp_path, phases={"iterations_per_phase": 1})
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "phased_dmd_mega",
        "train",
        "--config",
        str(config),
        *GPU_RUN,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest").read_text())["checkpoint"] == "iter_0000001"


# ----------------------------------------------------------------------------- optimizer


def test_the_distributed_optimizer_counts_steps_per_parameter_on_cuda(one_gpu):
    """With TE installed megatron would pick TE's FusedAdam, whose step counter is per group;
    a two-expert role must keep torch AdamW's per-parameter counts."""
    from phased_dmd_mega.distill.optim import DistributedRoleOptimizer
    from phased_dmd_mega.distill.roles import Experts

    torch.manual_seed(0)
    high = WanModel(WAN, ModelParallelOptions(dtype=BF16)).cuda()
    low = WanModel(WAN, ModelParallelOptions(dtype=BF16)).cuda()
    role = DistributedRoleOptimizer(Experts(high, low, 0.5), 1e-3, (0.0, 0.999), 1e-8, 0.0, 1.0)
    assert all(type(sub.optimizer) is torch.optim.AdamW for sub in role.optimizer.chained_optimizers)
    inputs = _wan_inputs()
    for model in (high, high, low):  # each step reaches one expert only
        role.zero_grad()
        model(*inputs).float().square().mean().backward()
        role.step()
    steps = role.steps()
    assert {steps[n] for n in steps if n.startswith("high.")} == {2.0}
    assert {steps[n] for n in steps if n.startswith("low.")} == {1.0}
