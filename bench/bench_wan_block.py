"""One Wan-14B block, forward + backward, at video length: achieved TFLOP/s per attention
backend (and FP8 against bf16 where Transformer Engine exists), against the device's measured
dense bf16 matrix-multiply rate.

    python bench/bench_wan_block.py                       # 81 frames at 480x832: 32,760 tokens
    python bench/bench_wan_block.py --backends sdpa flash --fp8 delayed

Needs CUDA. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch


def measured_matmul_tflops(dtype=torch.bfloat16, size=8192, iters=20) -> float:
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


def block_flops(tokens: int, dim: int, ffn: int, text: int) -> float:
    """Matrix-multiply FLOPs of one block, forward + backward (backward = 2 x forward)."""
    self_attn = 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim + 4 * tokens * tokens * dim
    cross_attn = 4 * tokens * dim * dim + 2 * text * dim * 2 * dim + 4 * tokens * text * dim
    mlp = 4 * tokens * dim * ffn
    return 3.0 * (self_attn + cross_attn + mlp)


def time_block(backend: str, transformer_impl: str, fp8, grid, iters: int, text: int) -> float:
    from phased_dmd_mega.models.blocks import TokenSharding
    from phased_dmd_mega.models.wan import WAN_PRESETS, WanModel, WanParallel

    arch = replace(WAN_PRESETS["wan2.1-t2v-14b"], num_layers=1)
    par = WanParallel(attention_backend=backend, transformer_impl=transformer_impl, fp8_recipe=fp8,
                      dtype=torch.bfloat16, initialize=False)
    model = WanModel(arch, par).cuda()
    tokens = grid[0] * grid[1] * grid[2]
    sharding = TokenSharding.current(tokens, False)
    angles = model.rope_angles(grid, sharding, "cuda")
    x = torch.randn(tokens, 1, arch.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    e0 = torch.randn(1, 6, arch.dim, device="cuda")
    context = torch.randn(text, 1, arch.dim, device="cuda", dtype=torch.bfloat16)
    block = model.blocks[0]

    def step():
        from phased_dmd_mega.models.blocks import fp8_autocast

        with fp8_autocast(fp8):
            out = block(x, e0, context, None, angles, None)
        out.float().sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52], help="latent tokens f h w after patching")
    parser.add_argument("--text", type=int, default=512)
    parser.add_argument("--backends", nargs="+", default=["sdpa", "flash", "te"])
    parser.add_argument("--fp8", default=None, help="also time the TE spec with this FP8 recipe")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_wan_block needs CUDA", file=sys.stderr)
        return 2
    from phased_dmd_mega import parallel
    from phased_dmd_mega.models.blocks import has_flash_attention, has_transformer_engine

    parallel.initialize()
    peak = measured_matmul_tflops()
    tokens = args.grid[0] * args.grid[1] * args.grid[2]
    flops = block_flops(tokens, 5120, 13824, args.text)
    rows = []
    runs = [(b, "transformer_engine" if b == "te" else "local", None) for b in args.backends]
    if args.fp8:
        runs.append(("te", "transformer_engine", args.fp8))
    for backend, impl, fp8 in runs:
        if (backend == "flash" and not has_flash_attention()) or (impl == "transformer_engine" and not has_transformer_engine()):
            rows.append((backend, impl, fp8, None))
            continue
        rows.append((backend, impl, fp8, time_block(backend, impl, fp8, tuple(args.grid), args.iters, args.text)))
    print(f"device: {torch.cuda.get_device_name()}, tokens {tokens}, dense bf16 matmul {peak:.0f} TFLOP/s\n")
    print("| attention | layers | fp8 | ms / fwd+bwd | TFLOP/s | of matmul rate |")
    print("|---|---|---|---|---|---|")
    for backend, impl, fp8, seconds in rows:
        if seconds is None:
            print(f"| {backend} | {impl} | {fp8 or '-'} | not installed | - | - |")
            continue
        tflops = flops / seconds / 1e12
        print(f"| {backend} | {impl} | {fp8 or '-'} | {seconds * 1e3:.1f} | {tflops:.0f} | {100 * tflops / peak:.0f}% |")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
