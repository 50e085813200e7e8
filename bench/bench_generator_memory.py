"""Peak memory of one generator update: Phased DMD (4 steps, 2 phases) against one-step DMD and
naive 4-step DMD that back-propagates through every step.

Phased DMD keeps one differentiable generator step per update (the SGTS exit step), so its
peak should be about that of one-step DMD; naive DMD keeps the activations of all 4 steps.

    python bench/bench_generator_memory.py            # CPU: resident memory (Linux)
    python bench/bench_generator_memory.py --micro-batch-size 1   # adds Phased DMD in micro-batches

Each method runs in its own fresh process: the models are built, the kernel's peak-RSS counter
is reset (/proc/self/clear_refs), and the first generator update is measured (it also creates
the optimizer's states, alike for every method). The bytes autograd keeps for the backward are
counted exactly with saved-tensor hooks: the part of the memory that grows with the number of
differentiable steps. On CUDA, torch.cuda.max_memory_allocated replaces the resident memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace

import torch

METHODS = {
    # name: (method, num_steps, num_phases)
    "phased_dmd_4_steps_2_phases": ("phased_dmd", 4, 2),
    "one_step_dmd": ("phased_dmd", 1, 1),
    "naive_4_step_dmd": ("dmd_naive", 4, 1),
}


def _status_mib(field: str) -> float:
    from phased_dmd_mega.log import process_memory_mib

    value = process_memory_mib(field)
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return value


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS


def _used_mib() -> float:
    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else _status_mib("VmRSS")


def _peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _status_mib("VmHWM")


def measure(name: str, dim: int, layers: int, size: int, batch: int, micro_batch_size: int = 0) -> dict:
    from phased_dmd_mega import parallel
    from phased_dmd_mega.condition import Condition
    from phased_dmd_mega.config import PhasesConfig
    from phased_dmd_mega.distill.optim import RoleOptimizer, make_adamw
    from phased_dmd_mega.distill.phased import Batch, PhasedDMD
    from phased_dmd_mega.distill.roles import Experts, GuidedTeacher
    from phased_dmd_mega.models import WAN_PRESETS, ModelParallelOptions, WanModel
    from phased_dmd_mega.schedule import PhaseLayout

    method, steps, phases = METHODS[name]
    parallel.initialize()
    device = parallel.layout().device
    dims = replace(WAN_PRESETS["tiny"], dim=dim, ffn_dim=4 * dim, num_heads=dim // 32, num_layers=layers)
    options = ModelParallelOptions(attention_backend="sdpa")
    teacher = Experts(WanModel(dims, options)).to(device).requires_grad_(False)

    def role():
        model = Experts(WanModel(dims, replace(options, initialize=False))).to(device)
        model.load_state_dict(teacher.state_dict())
        return RoleOptimizer(model, make_adamw(model, 1e-4, (0.0, 0.999), 1e-8, 0.0), 1.0)

    layout = PhaseLayout.build(steps, num_phases=phases, shift=5.0)
    generators, fakes = [role() for _ in range(phases)], [role() for _ in range(phases)]
    phases = PhasesConfig(method=method, fake_updates_per_generator_update=1)
    trainer = PhasedDMD(
        layout,
        GuidedTeacher(teacher, 1.0),
        generators,
        fakes,
        phases,
        micro_batch_size=micro_batch_size or None,
        device=device,
    )
    context = torch.randn(batch, 16, dims.text_dim, device=device)
    step_batch = Batch(Condition(context), Condition(torch.zeros_like(context)), (batch, 16, 1, size, size))
    last = phases - 1
    saved = {}

    def pack(tensor):  # every tensor autograd keeps for the backward, each storage once
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    before = _used_mib()
    _reset_peak()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.generator_update(last, step_batch, 0)  # cold: the first update in this process
    peak = _peak_mib()
    parallel.destroy()
    label = f"{name}, micro-batches of {micro_batch_size}" if micro_batch_size else name
    # Micro-batches save and free their tensors one after another: a sum over the update would
    # not be what is held at once, so only the resident figures are reported for them.
    held = None if micro_batch_size else sum(saved.values()) / 2**20
    return {
        "method": label,
        "saved_for_backward_mib": held,
        "before_mib": before,
        "peak_mib": peak,
        "update_mib": peak - before,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="latent height and width (tokens = size^2 / 4)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=0,
        help="also measure Phased DMD with data.micro_batch_size (gradient accumulation)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.dim, args.layers, args.size, args.batch, args.micro_batch_size)))
        return 0
    rows = []
    runs = [(name, 0) for name in METHODS]
    if args.micro_batch_size:
        runs.append(("phased_dmd_4_steps_2_phases", args.micro_batch_size))
    for name, micro in runs:
        command = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--dim",
            str(args.dim),
            "--layers",
            str(args.layers),
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
            "--micro-batch-size",
            str(micro),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    unit = "allocated (CUDA)" if torch.cuda.is_available() else "resident (CPU)"
    print(f"| generator update | held for backward (MiB) | {unit}: before (MiB) | peak (MiB) | update adds (MiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        held = "-" if row["saved_for_backward_mib"] is None else f"{row['saved_for_backward_mib']:.1f}"
        print(
            f"| {row['method']} | {held} | {row['before_mib']:.0f} | {row['peak_mib']:.0f} | {row['update_mib']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
