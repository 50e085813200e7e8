"""One DiT block, forward + backward, at production length: achieved TFLOP/s per attention backend
(and FP8 against bf16 where Transformer Engine exists), against the device's measured dense bf16
matrix-multiply rate.

    python bench/bench_blocks.py                                   # Wan-14B, 81 frames at 480x832: 32,760 tokens
    python bench/bench_blocks.py --backends sdpa flash --fp8 delayed
    python bench/bench_blocks.py --model qwen_image                # Qwen-Image, 1664x928: 6,032 + 512 text tokens
    python bench/bench_blocks.py --model qwen_image --flops-only   # the FLOP count alone (no GPU needed)

--model wan: one Wan2.1-T2V-14B block (self-attention over the video tokens, cross-attention to
--text embedded text tokens, MLP). --model qwen_image: one block of the qwen-image preset (two
streams, joint attention over [text, image]) at --size W H pixels (VAE factor 8, 2x2 packing:
(H/16) * (W/16) image tokens) with --text text tokens of which --text-real are real: the rest is
masked padding (SDPA masks it; flash and TE attend over the real tokens only, packed, see
models/attention.py); --text-real equal to --text gives no mask.

FLOPs count the matrix multiplies only (linears over every token, the two attention products
over the real tokens), backward = 2 x forward. Needs CUDA (exit 2 without), except --flops-only.
Prints a markdown table for BENCHMARKS.md; --json PATH also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

VAE_FACTOR = 8  # pixels per latent, Qwen-Image's VAE
PATCH = 2  # Qwen-Image's 2x2 packing


# ----------------------------------------------------------------------------- FLOP counts


def wan_block_flops(tokens: int, dim: int, ffn: int, text: int) -> float:
    """Matrix-multiply FLOPs of one Wan block, forward + backward (backward = 2 x forward)."""
    self_attn = 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim + 4 * tokens * tokens * dim
    cross_attn = 4 * tokens * dim * dim + 2 * text * dim * 2 * dim + 4 * tokens * text * dim
    mlp = 4 * tokens * dim * ffn
    return 3.0 * (self_attn + cross_attn + mlp)


def qwen_block_flops(
    image_tokens: int, text_tokens: int, dim: int, ffn: int, batch: int = 1, real_text_tokens: Optional[int] = None
) -> float:
    """Matrix-multiply FLOPs of one Qwen-Image block, forward + backward (backward = 2 x forward):
    per stream its modulation (one [B, dim] row), fused QKV, output projection and MLP; then one
    attention over the real tokens of the joint [text, image] sequence."""
    joint = image_tokens + text_tokens
    real = image_tokens + (text_tokens if real_text_tokens is None else real_text_tokens)
    per_token = 2 * dim * 3 * dim + 2 * dim * dim + 4 * dim * ffn  # qkv, out, mlp fc1 + fc2
    streams = joint * per_token + 2 * (2 * dim * 6 * dim)  # both streams' tokens, both modulations
    attention = 4 * real * real * dim  # q k^T and p v over all heads
    return 3.0 * batch * (streams + attention)


def qwen_tokens(width: int, height: int) -> Tuple[int, int]:
    """Packed image token grid (h, w) of a width x height image."""
    step = VAE_FACTOR * PATCH
    if width % step or height % step:
        raise SystemExit(f"--size {width} {height}: both must be multiples of {step} (VAE 8 x patch 2)")
    return height // step, width // step


# ----------------------------------------------------------------------------- one block's step


def wan_step(backend: str, transformer_impl: str, fp8: Optional[str], args) -> Callable[[], None]:
    from phased_dmd_mega.models.options import ModelParallelOptions, fp8_autocast
    from phased_dmd_mega.models.wan import WAN_PRESETS, WanModel

    dims = replace(WAN_PRESETS["wan2.1-t2v-14b"], num_layers=1)
    par = ModelParallelOptions(
        attention_backend=backend,
        transformer_impl=transformer_impl,
        fp8_recipe=fp8,
        dtype=torch.bfloat16,
        initialize=False,
    )
    model = WanModel(dims, par).cuda()
    grid = tuple(args.grid)
    tokens = grid[0] * grid[1] * grid[2]
    angles = model.rope_angles(grid, model.token_sharding(tokens), "cuda")
    x = torch.randn(tokens, 1, dims.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    e0 = torch.randn(1, 6, dims.dim, device="cuda")
    context = torch.randn(args.text, 1, dims.dim, device="cuda", dtype=torch.bfloat16)
    block = model.blocks[0]

    def step():
        with fp8_autocast(fp8):
            out = block(x, e0, context, None, angles, None)
        out.float().sum().backward()

    return step


def qwen_step(backend: str, transformer_impl: str, fp8: Optional[str], args) -> Callable[[], None]:
    from phased_dmd_mega.models.attention import KeyMask
    from phased_dmd_mega.models.options import ModelParallelOptions, fp8_autocast
    from phased_dmd_mega.models.qwen_image import QWEN_IMAGE_PRESETS, QwenImageModel
    from phased_dmd_mega.models.token_sharding import joint_key_mask

    dims = replace(QWEN_IMAGE_PRESETS["qwen-image"], num_layers=1)
    par = ModelParallelOptions(
        attention_backend=backend,
        transformer_impl=transformer_impl,
        fp8_recipe=fp8,
        dtype=torch.bfloat16,
        initialize=False,
    )
    model = QwenImageModel(dims, par).cuda()
    grid = qwen_tokens(*args.size)
    image_tokens = grid[0] * grid[1]
    img_sharding = model.token_sharding(image_tokens)
    txt_sharding = model.token_sharding(args.text)
    img_angles, txt_angles = model.rope_angles(grid, img_sharding, txt_sharding, "cuda")
    mask = None
    if args.text_real < args.text:
        mask = (torch.arange(args.text, device="cuda") < args.text_real)[None, :]
    key_mask = KeyMask.of(joint_key_mask([(txt_sharding, mask), (img_sharding, None)], 1, "cuda"), 1)
    img = torch.randn(image_tokens, 1, dims.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    txt = torch.randn(args.text, 1, dims.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    # As in the model, where temb comes from trainable layers: the modulations get input gradients too.
    temb = torch.randn(1, dims.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    block = model.blocks[0]

    def step():
        with fp8_autocast(fp8):
            img_out, txt_out = block(img, txt, temb, img_angles, txt_angles, key_mask)
        (img_out.float().sum() + txt_out.float().sum()).backward()

    return step


# ----------------------------------------------------------------------------- main


def workload(args) -> Tuple[str, float]:
    """(description, FLOPs of one forward + backward) of the chosen block."""
    if args.model == "wan":
        tokens = args.grid[0] * args.grid[1] * args.grid[2]
        return f"Wan-14B block, {tokens} tokens, {args.text} text", wan_block_flops(tokens, 5120, 13824, args.text)
    from phased_dmd_mega.models.qwen_image import QWEN_IMAGE_PRESETS

    dims = QWEN_IMAGE_PRESETS["qwen-image"]
    h, w = qwen_tokens(*args.size)
    described = (
        f"Qwen-Image block, {args.size[0]}x{args.size[1]}: {h * w} image tokens, {args.text} text "
        f"({args.text_real} real)"
    )
    return described, qwen_block_flops(h * w, args.text, dims.dim, dims.ffn_dim, real_text_tokens=args.text_real)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("wan", "qwen_image"), default="wan")
    parser.add_argument(
        "--grid", type=int, nargs=3, default=[21, 30, 52], help="wan: latent tokens f h w after patching"
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[1664, 928],
        metavar=("W", "H"),
        help="qwen_image: image width and height in pixels",
    )
    parser.add_argument("--text", type=int, default=512, help="text tokens")
    parser.add_argument("--text-real", type=int, default=448, help="qwen_image: real text tokens (the rest is masked)")
    parser.add_argument("--backends", nargs="+", default=["sdpa", "flash", "te"])
    parser.add_argument("--fp8", default=None, help="also time the TE spec with this FP8 recipe")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--flops-only", action="store_true", help="print the FLOP count and stop (no GPU needed)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows to PATH as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.text_real <= args.text:
        parser.error(f"--text-real {args.text_real} must be between 1 and --text {args.text}")
    return args


@dataclass
class Row:
    backend: str
    layers: str
    fp8: Optional[str]
    status: str = "ok"  # ok | not installed | failed
    ms: Optional[float] = None
    tflops: Optional[float] = None
    fraction_of_matmul: Optional[float] = None
    mfu: Optional[float] = None  # against the GPU's dense peak (phased_dmd_mega/flops.py), where known
    error: Optional[str] = None


def measure(row: Row, make_step, args, flops: float, peak: float) -> Row:
    """Time one configuration; a failure is recorded in its row and the next one still runs."""
    from phased_dmd_mega.benchmarking import seconds_per_call
    from phased_dmd_mega.models.attention import has_flash_attention
    from phased_dmd_mega.parallel.linears import has_transformer_engine

    if (row.backend == "flash" and not has_flash_attention()) or (
        row.layers == "transformer_engine" and not has_transformer_engine()
    ):
        row.status = "not installed"
        return row
    try:
        seconds = seconds_per_call(make_step(row.backend, row.layers, row.fp8, args), iters=args.iters)
    except Exception as err:  # noqa: BLE001 - reported in the table, the other rows still run
        row.status, row.error = "failed", f"{type(err).__name__}: {err}"
        return row
    finally:
        torch.cuda.empty_cache()
    row.ms = seconds * 1e3
    row.tflops = flops / seconds / 1e12
    row.fraction_of_matmul = row.tflops / peak
    from phased_dmd_mega.flops import peak_tflops

    dense_peak = peak_tflops("fp8" if row.fp8 else "bfloat16")
    row.mfu = None if dense_peak is None else row.tflops / dense_peak
    return row


def print_table(rows, described: str, peak: float) -> None:
    print(f"device: {torch.cuda.get_device_name()}, {described}, dense bf16 matmul {peak:.0f} TFLOP/s\n")
    print("| attention | layers | fp8 | ms / fwd+bwd | TFLOP/s | of matmul rate | MFU |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if row.status != "ok":
            print(f"| {row.backend} | {row.layers} | {row.fp8 or '-'} | {row.status} | - | - | - |")
            continue
        mfu = "-" if row.mfu is None else f"{100 * row.mfu:.0f}%"
        print(
            f"| {row.backend} | {row.layers} | {row.fp8 or '-'} | {row.ms:.1f} | {row.tflops:.0f} | "
            f"{100 * row.fraction_of_matmul:.0f}% | {mfu} |"
        )
    for row in rows:
        if row.error:
            print(f"\n{row.backend} / {row.layers} / fp8 {row.fp8 or '-'} failed: {row.error}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    described, flops = workload(args)
    if args.flops_only:
        print(f"{described}: {flops / 1e12:.2f} TFLOP per forward + backward")
        return 0
    if not torch.cuda.is_available():
        print(
            "bench_blocks needs CUDA (no GPU visible); --flops-only prints the FLOP count without one", file=sys.stderr
        )
        return 2
    from phased_dmd_mega import parallel
    from phased_dmd_mega.benchmarking import dense_matmul_tflops

    make_step = wan_step if args.model == "wan" else qwen_step
    parallel.initialize()
    peak = dense_matmul_tflops()
    rows = [Row(b, "transformer_engine" if b == "te" else "local", None) for b in args.backends]
    if args.fp8:
        rows.append(Row("te", "transformer_engine", args.fp8))
    rows = [measure(row, make_step, args, flops, peak) for row in rows]
    print_table(rows, described, peak)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(row) for row in rows], indent=1))
    parallel.destroy()
    return 1 if any(row.status == "failed" for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
