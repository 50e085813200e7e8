"""Per-rank peak memory while loading a Wan checkpoint at TP=1 and TP=2.

Each rank reads only its own slices of the safetensors files, so at TP=2 the weight memory per
rank should be about half of TP=1. Resident memory is read in each rank's own process: VmRSS
just before loading and the peak VmHWM after it (both count the pages of the memory-mapped
files a rank touches).

    python bench/bench_load_memory.py --dir /tmp/wan13b            # writes the checkpoint once
    python bench/bench_load_memory.py --dir /tmp/wan13b --tp 1 2

Runs on CPU (gloo) or GPU; prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def write_random_checkpoint(folder: Path, preset: str, dtype: torch.dtype, shard_bytes: int = 1 << 30) -> int:
    """A random diffusers-format checkpoint with the preset's shapes, written shard by shard."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from phased_dmd_mega.models.wan import WAN_PRESETS
    from phased_dmd_mega.models.wan_formats import to_diffusers_config

    config = to_diffusers_config(WAN_PRESETS[preset])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanTransformer3DModel(**config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, shard_size, index, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_size, index
        if shard:
            index += 1
            name = f"diffusion_pytorch_model-{index:05d}.safetensors"
            save_file(shard, str(folder / name))
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_size = {}, 0

    for key, shape in shapes.items():
        tensor = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        shard[key] = tensor
        shard_size += tensor.numel() * tensor.element_size()
        total += tensor.numel()
        if shard_size >= shard_bytes:
            flush()
    flush()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(config))
    return total


def _memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (this process's peak) from /proc: unlike ru_maxrss, VmHWM does not
    inherit the parent's peak across fork and exec."""
    from phased_dmd_mega.log import process_memory_mib

    value = process_memory_mib(field)
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_and_measure(folder: str, tp: int, dtype_name: str):
    from phased_dmd_mega import parallel
    from phased_dmd_mega.models import load_pretrained

    parallel.initialize(tensor_parallel=tp)
    before = _memory_mib("VmRSS")
    start = time.perf_counter()
    model = load_pretrained(folder, dtype=getattr(torch, dtype_name), attention_backend="sdpa")
    seconds = time.perf_counter() - start
    param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    after = _memory_mib("VmHWM")
    parallel.destroy()
    return before, after, param_mib, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="checkpoint folder (written when missing)")
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from phased_dmd_mega.testing import run_distributed

    folder = Path(args.dir)
    if not (folder / "config.json").exists():
        count = write_random_checkpoint(folder, args.preset, getattr(torch, args.dtype))
        print(f"wrote a random {args.preset} checkpoint ({count / 1e9:.2f} B parameters) to {folder}")
    print(
        "| TP | rank | RSS before load (MiB) | peak RSS during load (MiB) | peak minus before (MiB) "
        "| local weights (MiB) | load s |"
    )
    print("|---|---|---|---|---|---|---|")
    for tp in args.tp:
        for rank, (before, after, params, seconds) in enumerate(
            run_distributed(load_and_measure, tp, str(folder), tp, args.dtype, timeout_s=3600)
        ):
            print(
                f"| {tp} | {rank} | {before:.0f} | {after:.0f} | {after - before:.0f} | {params:.0f} | {seconds:.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
