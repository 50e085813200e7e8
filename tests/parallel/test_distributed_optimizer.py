"""megatron-core's distributed optimizer (``optimizer.distributed``) against torch AdamW on every
rank: the same Phased DMD updates at DP=2 (and TP=2 x DP=2) on rank-dependent data, about half
the optimizer state per rank, and checkpoints that move between data-parallel sizes (and to and
from the per-rank optimizer) with every state value intact."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from phased_dmd_mega import checkpoint, parallel
from phased_dmd_mega.checkpoint import flat_range_boxes
from phased_dmd_mega.condition import Condition
from phased_dmd_mega.config import PhasesConfig
from phased_dmd_mega.distill.optim import (
    MAIN_PARAM,
    DistributedRoleOptimizer,
    RoleOptimizer,
    make_adamw,
    make_role_optimizer,
)
from phased_dmd_mega.distill.phased import Batch, PhasedDMD
from phased_dmd_mega.distill.roles import Experts, GuidedTeacher
from phased_dmd_mega.models import ModelParallelOptions, WanModel
from phased_dmd_mega.schedule import PhaseLayout
from phased_dmd_mega.testing import run_distributed

from helpers.tiny_distill import ARCH, SHAPE

SCHEDULE = ((0, 0), (0, 1), (1, 2), (1, 3))


def _wan(options, state):
    model = WanModel(ARCH, replace(options, initialize=False))
    model.load_state_dict(state)
    return model


def _role(teacher_state, options, distributed, clip, two_experts=False):
    high = _wan(options, teacher_state)
    model = Experts(high, _wan(options, teacher_state), 0.5) if two_experts else Experts(high)
    return make_role_optimizer(model, 1e-3, (0.0, 0.999), 1e-8, 0.01, clip, distributed)


def build(tp, distributed, same_data=False, sequence_parallel=False, ulysses=1):
    """Two phases; fake0 has two experts split at t = 0.5, which its re-noise times never reach
    below: its low expert gets no gradient and must stay untouched. Each data-parallel rank gets
    its own prompts unless ``same_data``."""
    layout = parallel.initialize(
        tensor_parallel=tp, ulysses_parallel=ulysses, sequence_parallel=sequence_parallel, seed=3
    )
    options = ModelParallelOptions(attention_backend="sdpa", sequence_parallel=sequence_parallel)
    teacher = Experts(WanModel(ARCH, options)).requires_grad_(False)
    state = teacher.high.state_dict()
    generators = [_role(state, options, distributed, 1.0) for _ in range(2)]
    fakes = [_role(state, options, distributed, None, two_experts=(k == 0)) for k in range(2)]
    phases = PhasesConfig(fake_updates_per_generator_update=2, weight_clamp=10.0)
    trainer = PhasedDMD(
        PhaseLayout.build(4, num_phases=2, shift=5.0), GuidedTeacher(teacher, 3.0), generators, fakes, phases, seed=5
    )
    if same_data:  # every data-parallel rank draws rank 0's noise too: a DP=2 step is a DP=1 step
        trainer._data_parallel_rank = 0
    gen = torch.Generator().manual_seed(0 if same_data else layout.data_parallel_rank)
    cond = Condition(torch.randn(SHAPE[0], 4, ARCH.text_dim, generator=gen))
    return trainer, Batch(cond, Condition(torch.zeros_like(cond.context)), SHAPE)


def roles_of(trainer):
    roles = {f"generator{k}": role for k, role in enumerate(trainer.generators)}
    roles.update({f"fake{k}": role for k, role in enumerate(trainer.fakes)})
    return roles


def run(trainer, batch, schedule):
    """Iterations with a learning rate that changes every step, set as the trainer sets it."""
    logs = []
    for phase, it in schedule:
        for role in roles_of(trainer).values():
            for group in role.optimizer.param_groups:
                group["lr"] = 1e-3 * (it + 1) / len(SCHEDULE)
        log = trainer.iteration(phase, batch, it)
        logs.append({k: v for k, v in log.items() if k != "step_seconds"})
    return logs


def weights(trainer):
    return {
        f"{role}.{name}": p.detach().clone()
        for role, r in roles_of(trainer).items()
        for name, p in r.model.named_parameters()
    }


def _one_process_group():
    """Several set-ups in one spawned process: parallel.initialize() then joins this group (and
    destroy() leaves it), instead of starting and ending one each time."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")


def _train_both(schedule, parallelism):
    """The per-rank optimizer, then the distributed one, from the same start on the same data."""
    _one_process_group()
    out = []
    for distributed in (False, True):
        trainer, batch = build(distributed=distributed, **parallelism)
        initial = weights(trainer)
        logs = run(trainer, batch, schedule)
        state_bytes = sum(role.state_bytes() for role in roles_of(trainer).values())
        out.append((logs, initial, weights(trainer), state_bytes))
        parallel.destroy()
    return out


def _check_against_per_rank_adamw(world_size, schedule, **parallelism):
    """Returns the optimizer-state bytes of every rank: (per-rank AdamW, distributed)."""
    memory = []
    for reference, got in run_distributed(_train_both, world_size, schedule, parallelism):
        (ref_logs, _, ref_weights, ref_bytes), (logs, initial, trained, got_bytes) = reference, got
        for ref, log in zip(ref_logs, logs):
            assert set(ref) == set(log)
            for key in ref:
                assert log[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
        for name, value in ref_weights.items():
            torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)
        low = [n for n in initial if n.startswith("fake0.low.")]
        assert low and all(torch.equal(initial[n], trained[n]) for n in low), "no gradient, no update"
        assert any(not torch.equal(initial[n], trained[n]) for n in initial if n.startswith("generator0."))
        memory.append((ref_bytes, got_bytes))
    # Every rank holds about half the state (the slices are padded to a multiple of DP).
    assert all(0.45 < got / ref < 0.55 for ref, got in memory), memory
    return memory


@pytest.mark.slow
def test_dp2_matches_per_rank_adamw_with_half_the_state():
    memory = _check_against_per_rank_adamw(2, SCHEDULE, tp=1)
    print(f"optimizer state bytes per rank at DP=2 (per-rank AdamW, distributed): {memory}")


@pytest.mark.slow
def test_tp2_sequence_parallel_dp2_matches_per_rank_adamw():
    # Megatron SP: the norms' gradients are partial sums over TP, summed before the reduce-scatter.
    _check_against_per_rank_adamw(4, SCHEDULE[1:3], tp=2, sequence_parallel=True)  # an iteration per phase


@pytest.mark.slow
def test_ulysses2_shards_the_state_over_the_ulysses_ranks_too():
    _check_against_per_rank_adamw(2, SCHEDULE[1:3], tp=1, ulysses=2)


def _one_rank_goes_non_finite():
    layout = parallel.initialize(seed=0)
    role = make_role_optimizer(
        Experts(WanModel(ARCH, ModelParallelOptions(attention_backend="sdpa"))),
        1e-3,
        (0.0, 0.999),
        1e-8,
        0.01,
        1.0,
        True,
    )
    before = {n: p.detach().clone() for n, p in role.model.named_parameters()}
    norms = []
    for poisoned in (True, False):
        gen = torch.Generator().manual_seed(layout.rank)
        x = torch.randn(SHAPE, generator=gen)
        loss = role.model(x, torch.tensor([700.0, 300.0]), Condition(torch.randn(2, 4, ARCH.text_dim, generator=gen)))
        loss = loss.square().mean() * (float("nan") if poisoned and layout.rank == 1 else 1.0)
        loss.backward()
        norms.append(role.step())
        if poisoned:
            unchanged = all(torch.equal(p, before[n]) for n, p in role.model.named_parameters())
    out = norms, unchanged, {n: p.detach().clone() for n, p in role.model.named_parameters()}
    parallel.destroy()
    return out


@pytest.mark.slow
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank():
    (norms0, unchanged0, after0), (norms1, unchanged1, after1) = run_distributed(_one_rank_goes_non_finite, 2)
    assert torch.isnan(torch.tensor([norms0[0], norms1[0]])).all() and unchanged0 and unchanged1
    assert norms0[1] == norms1[1] and norms0[1] > 0  # then a normal step, the same on both ranks
    for name, value in after0.items():
        assert torch.equal(after1[name], value), name


# ----------------------------------------------------------------------------- checkpoints


def _held_states(role):
    """name -> state -> (start, stop, values) of the slices this rank holds (whole tensors for
    the per-rank optimizer)."""
    if isinstance(role, DistributedRoleOptimizer):
        return {
            name: {s: (o.start, o.stop, t.clone()) for s, t in o.states.items()}
            for name, o in role.owned_slices().items()
        }
    role.ensure_state()
    return {
        name: {s: (0, p.numel(), role.optimizer.state[p][s].reshape(-1).clone()) for s in ("exp_avg", "exp_avg_sq")}
        for name, p in role.model.named_parameters()
    }


def _snapshot(trainer):
    return {role: _held_states(r) for role, r in roles_of(trainer).items()}, weights(trainer)


def _save_half(distributed, folder, tp=1):
    trainer, batch = build(tp, distributed, same_data=True)
    run(trainer, batch, SCHEDULE[:2])
    checkpoint.save_checkpoint(folder, 1, roles_of(trainer), {"phase": 0})
    saved = _snapshot(trainer)
    parallel.destroy()
    return saved


def _resume_half(distributed, folder):
    trainer, batch = build(1, distributed, same_data=True)
    metadata = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(folder), roles_of(trainer))
    loaded = _snapshot(trainer)
    logs = run(trainer, batch, SCHEDULE[2:])
    parallel.destroy()
    return metadata, loaded, logs


def _at_dp1_first(root):
    _one_process_group()
    trainer, batch = build(1, True, same_data=True)
    reference = run(trainer, batch, SCHEDULE)
    parallel.destroy()
    return reference, _save_half(True, root / "dp1"), _save_half(False, root / "dp1_per_rank")


def _split_dims(trainer):
    return {
        f"{role}.{name}": p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        for role, r in roles_of(trainer).items()
        for name, p in r.model.named_parameters()
    }


def _at_world_2(root):
    _one_process_group()
    saved = _save_half(True, root / "dp2")
    resumed = _resume_half(True, root / "dp1"), _resume_half(True, root / "dp1_per_rank")
    trainer, _ = build(2, True)
    split_dims = _split_dims(trainer)
    parallel.destroy()
    return saved, resumed, (_save_half(True, root / "tp2", tp=2), split_dims)


def _at_dp1_last(root):
    _one_process_group()
    return _resume_half(True, root / "dp2"), _resume_half(False, root / "dp2"), _resume_half(True, root / "tp2")


def _assembled(per_rank_states):
    """Whole flattened states from every rank's slices."""
    whole = {}
    for states in per_rank_states:
        for role, params in states.items():
            for name, by_state in params.items():
                for state, (start, stop, values) in by_state.items():
                    whole.setdefault((role, name, state), {})[start] = (stop, values)
    out = {}
    for key, pieces in whole.items():
        starts = sorted(pieces)
        assert all(pieces[a][0] == b for a, b in zip(starts, starts[1:])), key  # slices tile the tensor
        out[key] = torch.cat([pieces[s][1] for s in starts])
    return out


def _tp_whole(saved_by_tp_rank, split_dims):
    """The TP=1 view of states and weights saved by the ranks of a TP=2, DP=1 run."""
    (states0, weights0), (states1, weights1) = saved_by_tp_rank
    whole_weights, whole_states = {}, {}
    for name, dim in split_dims.items():
        pair = (weights0[name], weights1[name])
        whole_weights[name] = torch.cat(pair, dim) if dim is not None else pair[0]
    for role, params in states0.items():
        for name, by_state in params.items():
            for state, (_, _, values) in by_state.items():
                shape, dim = weights0[f"{role}.{name}"].shape, split_dims[f"{role}.{name}"]
                other = states1[role][name][state][2]
                whole = torch.cat((values.view(shape), other.view(shape)), dim) if dim is not None else values
                whole_states.setdefault(role, {}).setdefault(name, {})[state] = (0, whole.numel(), whole.reshape(-1))
    return [(whole_states, whole_weights)]


def _check_resume(saved, resumed, reference, exact=True):
    """``saved``: every saving rank's snapshot; ``resumed``: every resuming rank's result."""
    before, after = _assembled([states for states, _ in saved]), _assembled([r[1][0] for r in resumed])
    assert set(before) == set(after) and before
    for key, values in before.items():
        assert torch.equal(after[key], values), key  # every optimizer state value, bit for bit
    for metadata, (_, loaded_weights), logs in resumed:
        assert metadata == {"phase": 0, "iteration": 1}
        for name, value in saved[0][1].items():
            assert torch.equal(loaded_weights[name], value), name
        # The same data on every rank: DP=2 and DP=1 runs differ only in summation order, TP=2
        # and TP=1 runs in rounding.
        for ref, got in zip(reference[2:], logs):
            for key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-5 if exact else 1e-4, abs=1e-7), key


@pytest.mark.slow
def test_checkpoints_move_between_dp_sizes_tp_sizes_and_optimizers(tmp_path):
    ((reference, dp1_saved, dp1_per_rank_saved),) = run_distributed(_at_dp1_first, 1, tmp_path)
    at_world_2 = run_distributed(_at_world_2, 2, tmp_path)
    dp2_saved = [saved for saved, _, _ in at_world_2]
    ((from_dp2, from_dp2_to_per_rank, from_tp2),) = run_distributed(_at_dp1_last, 1, tmp_path)
    _check_resume(dp2_saved, [from_dp2], reference)  # DP=2 -> DP=1
    _check_resume([dp1_saved], [resumed[0] for _, resumed, _ in at_world_2], reference)  # DP=1 -> DP=2
    _check_resume(dp2_saved, [from_dp2_to_per_rank], reference)  # distributed -> per-rank AdamW
    _check_resume([dp1_per_rank_saved], [resumed[1] for _, resumed, _ in at_world_2], reference)  # and back
    tp2_saved = _tp_whole([tp2 for _, _, (tp2, _) in at_world_2], at_world_2[0][2][1])
    _check_resume(tp2_saved, [from_tp2], reference, exact=False)  # TP=2 -> TP=1


def _bf16_role(distributed):
    torch.manual_seed(0)
    model = Experts(WanModel(ARCH, ModelParallelOptions(attention_backend="sdpa", dtype=torch.bfloat16)))
    return make_role_optimizer(model, 1e-3, (0.9, 0.999), 1e-8, 0.01, 1.0, distributed)


def _bf16_update(role, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 1, 6, 8, generator=gen).bfloat16()
    context = Condition(torch.randn(2, 4, ARCH.text_dim, generator=gen).bfloat16())
    role.model(x, torch.tensor([700.0, 300.0]), context).float().square().mean().backward()
    return role.step()


@pytest.fixture
def one_rank():
    parallel.initialize(seed=0)
    yield
    parallel.destroy()


def test_bf16_weights_resume_with_their_fp32_main_copy(one_rank, tmp_path):
    saved = _bf16_role(True)
    for seed in (1, 2):
        _bf16_update(saved, seed)
    checkpoint.save_checkpoint(tmp_path, 1, {"generator0": saved}, {})
    main = {n: o.states[MAIN_PARAM].clone() for n, o in saved.owned_slices().items()}
    weights_now = dict(saved.model.named_parameters())
    assert any(not torch.equal(main[n], weights_now[n].detach().float().reshape(-1)) for n in main), (
        "the fp32 main copy holds more than the bf16 weights"
    )
    per_rank = _bf16_role(False)  # the per-rank optimizer reads the same checkpoint (bf16 moments)
    checkpoint.load_checkpoint(tmp_path / "iter_0000001", {"generator0": per_rank})
    resumed = _bf16_role(True)
    checkpoint.load_checkpoint(tmp_path / "iter_0000001", {"generator0": resumed})
    for role in (per_rank, resumed):
        for name, param in role.model.named_parameters():
            assert torch.equal(param, weights_now[name]), name
    for name, owned in resumed.owned_slices().items():
        assert torch.equal(owned.states[MAIN_PARAM], main[name]), name
    assert resumed.steps() == saved.steps() == dict.fromkeys(main, 2.0)
    assert _bf16_update(resumed, 3) == _bf16_update(saved, 3)  # the same update, bit for bit
    for mine, theirs in zip(resumed.model.parameters(), saved.model.parameters()):
        assert torch.equal(mine, theirs)


def test_the_run_config_chooses_the_optimizer(one_rank):
    from phased_dmd_mega.config import load_config
    from phased_dmd_mega.distill.build import role_optimizer
    from phased_dmd_mega.distill.optim import RoleOptimizer

    for overrides, kind in (([], DistributedRoleOptimizer), (["optimizer.distributed=false"], RoleOptimizer)):
        opt = load_config(None, ["optimizer.fake.betas=[0.5,0.99]", "optimizer.grad_clip=2.5", *overrides]).optimizer
        role = role_optimizer(Experts(WanModel(ARCH, ModelParallelOptions(attention_backend="sdpa"))), opt.fake, opt)
        assert isinstance(role, kind) and role.grad_clip == 2.5
        assert _adamw_groups_fused(role) == [True]
        assert all(
            g["betas"] == (0.5, 0.99) and g["lr"] == opt.fake.lr and g["weight_decay"] == opt.fake.weight_decay
            for g in role.optimizer.param_groups
        )

    opt = load_config(None, ["optimizer.fused=false", "optimizer.distributed=false"]).optimizer
    role = role_optimizer(Experts(WanModel(ARCH, ModelParallelOptions(attention_backend="sdpa"))), opt.fake, opt)
    assert _adamw_groups_fused(role) == [False]


def _adamw_groups_fused(role) -> list:
    """The distinct ``fused`` settings of the torch AdamW groups under a role's optimizer."""
    adams = [sub.optimizer for sub in role.optimizer.chained_optimizers] if hasattr(role, "ddp") else [role.optimizer]
    return sorted({bool(group["fused"]) for adam in adams for group in adam.param_groups})


# ----------------------------------------------------------------------------- with Transformer Engine


class PerGroupStepAdam(torch.optim.Optimizer):
    """AdamW that counts steps the way TE's FusedAdam does (transformer_engine 2.x fused_adam.py):
    one count per parameter group, advanced at every step, also for the parameters it then skips
    for want of a gradient. Takes the ``adam_w_mode`` keyword megatron passes to FusedAdam."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True):
        assert adam_w_mode, "the project asks for decoupled weight decay"
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(param.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** group["step"])).sqrt().add_(group["eps"])
                param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** group["step"]))


@pytest.fixture
def transformer_engine_adam(monkeypatch):
    """megatron-core as it is with Transformer Engine installed: both modules that import an
    Adam at import time hold FusedAdam (here with its step counting), and megatron's optimizer
    factory does not take torch's."""
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.setattr(mcore_optimizer, "Adam", PerGroupStepAdam)
    monkeypatch.setattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(distrib_optimizer, "Adam", PerGroupStepAdam)  # its type check of the inner optimizer


class TwoParts(torch.nn.Module):
    """Two experts in one role: the second gets a gradient only on the steps that use it."""

    def __init__(self):
        super().__init__()
        self.high, self.low = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)

    def forward(self, x, use_low: bool):
        out = self.high(x)
        return out + self.low(x) if use_low else out


def test_the_distributed_optimizer_counts_steps_per_parameter_with_transformer_engine_installed(
    one_rank, transformer_engine_adam
):
    torch.manual_seed(0)
    model, reference_model = TwoParts(), TwoParts()
    reference_model.load_state_dict(model.state_dict())
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    role = DistributedRoleOptimizer(model, **settings)
    reference = RoleOptimizer(reference_model, make_adamw(reference_model, **settings))
    assert [type(sub.optimizer) for sub in role.optimizer.chained_optimizers] == [torch.optim.AdamW]
    uses_low = [True, False, False, True, False]
    for step, use_low in enumerate(uses_low):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        for each in (role, reference):
            each.model(x, use_low).square().sum().backward()
            each.step()
    expected = {name: float(reference.optimizer.state[p]["step"]) for name, p in reference_model.named_parameters()}
    assert expected["low.weight"] == sum(uses_low) < expected["high.weight"] == len(uses_low)
    assert role.steps() == expected
    for (name, got), want in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("distributed", [True, False])
def test_the_fused_adamw_kernel_gives_the_for_loop_updates_and_step_counts(one_rank, monkeypatch, distributed):
    """Both optimizers run torch's fused AdamW by default (the kernel is called, once per step),
    with the for-loop AdamW's updates and per-parameter step counts, a part without gradient
    on some steps included; ``fused=False`` keeps the for-loop one."""
    kernel_calls = []
    fused_kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: kernel_calls.append(1) or fused_kernel(*a, **k))
    torch.manual_seed(0)
    models = {fused: TwoParts() for fused in (True, False)}
    models[False].load_state_dict(models[True].state_dict())
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, grad_clip=None, distributed=distributed)
    roles = {fused: make_role_optimizer(model, **settings, fused=fused) for fused, model in models.items()}
    uses_low = [True, False, False, True, False]
    for step, use_low in enumerate(uses_low):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        for fused, role in roles.items():
            calls_before = len(kernel_calls)
            role.model(x, use_low).square().sum().backward()
            role.step()
            assert len(kernel_calls) - calls_before == (1 if fused else 0)
    for (name, got), want in zip(models[True].named_parameters(), models[False].parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
    steps = {fused: _step_counts(role) for fused, role in roles.items()}
    assert steps[True] == steps[False] and steps[True]["low.weight"] == sum(uses_low) < steps[True]["high.weight"]


def _step_counts(role):
    if isinstance(role, DistributedRoleOptimizer):
        return role.steps()
    return {name: float(role.optimizer.state[p]["step"]) for name, p in role.model.named_parameters()}


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 3, 2)])
def test_flat_range_boxes_tile_any_range_contiguously(shape):
    numel = torch.Size(shape).numel()
    grid = torch.arange(numel).reshape(shape)
    for start in range(numel + 1):
        for stop in range(start, numel + 1):
            covered = []
            for offset, box, first in flat_range_boxes(shape, start, stop):
                piece = grid[tuple(slice(o, o + b) for o, b in zip(offset, box))]
                assert piece.shape == box
                assert torch.equal(piece.reshape(-1), torch.arange(first, first + piece.numel())), (start, stop)
                covered.append(piece.reshape(-1))
            assert torch.equal(torch.cat(covered) if covered else torch.arange(0), torch.arange(start, stop))
            assert len(flat_range_boxes(shape, start, stop)) <= 2 * len(shape)
