"""Optimizer state per rank: torch AdamW on every rank against megatron-core's distributed
optimizer (``optimizer.distributed``), for one trainable Wan role at a data-parallel size.

    python bench/bench_optimizer_memory.py --dp 2            # gloo processes on CPU

Each (optimizer, dtype) runs one update on every rank (so AdamW has created its states) and
counts the bytes of optimizer state each rank holds: AdamW's two moments and step counters, plus
the distributed optimizer's fp32 main weights where the weights are bf16 (for fp32 weights the
main weights are the weights). The gradient buffers are reported apart: the per-rank optimizer
keeps gradients in the weights' dtype, megatron's DDP in fp32.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch


def measure(distributed: bool, dtype_name: str, preset: str) -> dict:
    from phased_dmd_mega import parallel
    from phased_dmd_mega.distill.optim import make_role_optimizer
    from phased_dmd_mega.models import WAN_PRESETS, ModelParallelOptions, WanModel

    layout = parallel.initialize(seed=0)
    try:
        dtype = getattr(torch, dtype_name)
        dims = replace(WAN_PRESETS[preset], in_channels=4, out_channels=4)
        model = WanModel(dims, ModelParallelOptions(attention_backend="sdpa", dtype=dtype))
        role = make_role_optimizer(model, 1e-4, (0.0, 0.999), 1e-8, 0.01, 1.0, distributed)
        x = torch.randn(2, 4, 1, 8, 8, dtype=dtype)
        t = torch.tensor([500.0, 250.0])
        context = torch.randn(2, 8, dims.text_dim, dtype=dtype)
        model(x, t, context).float().square().mean().backward()
        grads = (
            sum(b.grad_data.numel() * b.grad_data.element_size() for b in role.ddp.buffers)
            if distributed
            else sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
        )
        role.step()
        return {
            "rank": layout.rank,
            "parameters": sum(p.numel() for p in model.parameters()),
            "state_bytes": role.state_bytes(),
            "gradient_bytes": grads,
        }
    finally:
        parallel.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, default=2, help="data-parallel size (gloo processes)")
    parser.add_argument("--preset", default="tiny", help="Wan preset of the role")
    args = parser.parse_args()
    from phased_dmd_mega.testing import run_distributed

    rows = []
    for dtype in ("float32", "bfloat16"):
        for distributed in (False, True):
            ranks = run_distributed(measure, args.dp, distributed, dtype, args.preset)
            rows.append(
                {
                    "optimizer": "distributed" if distributed else "per-rank AdamW",
                    "dtype": dtype,
                    "parameters": ranks[0]["parameters"],
                    "state_bytes_per_rank": [r["state_bytes"] for r in ranks],
                    "gradient_bytes_per_rank": [r["gradient_bytes"] for r in ranks],
                }
            )
    print("| optimizer | weights | parameters | optimizer state per rank (bytes) | gradients per rank (bytes) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['optimizer']} | {row['dtype']} | {row['parameters']} | "
            f"{', '.join(map(str, row['state_bytes_per_rank']))} | "
            f"{', '.join(map(str, row['gradient_bytes_per_rank']))} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
