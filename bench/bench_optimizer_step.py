"""One optimizer step of a fully trained Wan role: torch's fused AdamW kernel against its
for-loop AdamW (``optimizer.fused``), under both of the project's optimizers, side by side.

    python bench/bench_optimizer_step.py                        # Wan2.1-1.3B, 4 of its 30 blocks
    python bench/bench_optimizer_step.py --num-layers 30 --device cuda --dtype bfloat16

Each (optimizer, kernel) gets the same model and the same random gradients; the timed steps of
the four alternate, so that a slower machine for a moment slows all of them alike. A step is
everything ``role.step()`` does: gradient finalisation, the norm, clipping, AdamW (and for the
distributed optimizer the copy to and from its fp32 main shards).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Dict

import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.distill.optim import make_role_optimizer, sum_of_squares
from phased_dmd_mega.models import WAN_PRESETS, ModelParallelOptions, WanModel

KINDS = [(distributed, fused) for distributed in (False, True) for fused in (False, True)]


def build_role(args, distributed: bool, fused: bool):
    dims = replace(WAN_PRESETS[args.preset], num_layers=args.num_layers)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = WanModel(dims, ModelParallelOptions(attention_backend="sdpa", dtype=getattr(torch, args.dtype)))
    return make_role_optimizer(model, 1e-5, (0.0, 0.999), 1e-8, 0.01, 1.0, distributed, fused)


def fill_gradients(role, seed: int) -> None:
    """Random gradients through a real backward (so megatron's DDP hooks fill its buffer):
    the gradient of sum(p * r) is r."""
    generator = torch.Generator(next(role.model.parameters()).device).manual_seed(seed)
    loss = 0.0
    for param in role.model.parameters():
        noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype)
        loss = loss + (param * noise).sum()
    loss.backward()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args) -> Dict[str, object]:
    roles = {kind: build_role(args, *kind) for kind in KINDS}
    seconds = dict.fromkeys(KINDS, 0.0)
    for repeat in range(args.repeats + 1):  # the first a warm-up (AdamW creates its states)
        for kind, role in roles.items():
            fill_gradients(role, repeat)
            synchronize(args.device)
            start = time.perf_counter()
            role.step()
            synchronize(args.device)
            if repeat:
                seconds[kind] += (time.perf_counter() - start) / args.repeats
    parameters = sum(p.numel() for p in roles[KINDS[0]].model.parameters())
    figures = {"parameters": parameters, "seconds": {name(kind): s for kind, s in seconds.items()}}
    return {**figures, "gradient_norm_seconds": time_gradient_norms(roles[KINDS[0]], args)}


def time_gradient_norms(role, args) -> Dict[str, float]:
    """The sum of squares of the gradients two ways on the same gradients: per-tensor norms
    (``sum_of_squares``, what the optimizer uses) and float64 copies of every gradient (what it
    did before), alternating."""
    fill_gradients(role, 0)
    grads = [p.grad for p in role.model.parameters()]
    ways = {
        "per-tensor norms": lambda: sum_of_squares(grads),
        "float64 copies": lambda: sum(g.double().square().sum() for g in grads),
    }
    seconds = dict.fromkeys(ways, 0.0)
    for _ in range(args.repeats):
        for way, compute in ways.items():
            synchronize(args.device)
            start = time.perf_counter()
            float(compute())
            synchronize(args.device)
            seconds[way] += (time.perf_counter() - start) / args.repeats
    role.zero_grad()
    return seconds


def name(kind) -> str:
    distributed, fused = kind
    return f"{'distributed' if distributed else 'per-rank'} / {'fused' if fused else 'for-loop'}"


def report(figures: Dict[str, object]) -> str:
    seconds = figures["seconds"]
    lines = [
        f"{figures['parameters'] / 1e6:.1f} M trainable parameters",
        "| optimizer / AdamW kernel | seconds per step | for-loop / fused |",
        "|---|---:|---:|",
    ]
    for kind in KINDS:
        ratio = seconds[name((kind[0], False))] / seconds[name(kind)] if kind[1] else 1.0
        lines.append(f"| {name(kind)} | {seconds[name(kind)]:.3f} | {ratio:.2f}x |")
    norms = figures["gradient_norm_seconds"]
    lines.append(
        f"gradient norm: {norms['per-tensor norms']:.3f} s from per-tensor norms, {norms['float64 copies']:.3f} s "
        f"from float64 copies ({norms['float64 copies'] / norms['per-tensor norms']:.2f}x)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=argparse.FileType("w"))
    args = parser.parse_args(argv)
    parallel.initialize(seed=0)
    try:
        figures = measure(args)
    finally:
        parallel.destroy()
    print(report(figures))
    if args.json:
        json.dump(figures, args.json, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
