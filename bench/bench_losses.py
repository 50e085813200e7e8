"""Benchmark: fused Triton losses vs the eager torch composition, forward + backward.

Times ``subinterval_flow_loss`` and ``dmd_loss`` (phased_dmd_mega.losses) at Wan 2.x A14B
latent sizes (batch x 16 x 21 x 90 x 160 by default) in fp32 and bf16, on both backends, and
prints a markdown table: time per forward+backward, speedup over eager, and the fused path's
achieved bandwidth as a fraction of the device's measured copy bandwidth.

The bandwidth counts the bytes the fused kernels must move (each counted once, the small
[B, n_blocks] buffers ignored):

* subinterval loss: forward reads v_pred, x_s, eps and writes d loss/d v_pred; backward reads
  it and writes the scaled gradient: 6 tensor passes.
* DMD: pass 1 reads student and teacher, pass 2 reads fake and teacher and writes the
  direction, backward reads it and writes the gradient: 7 tensor passes.

The eager column's GB/s uses the same byte count (an effective bandwidth: eager moves more).

Usage: ``python bench/bench_losses.py [--batch 1] [--dtypes fp32,bf16] [--ops subinterval,dmd]
[--json rows.json]``. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

WAN_A14B_LATENT = (16, 21, 90, 160)  # channels, latent frames, height/8, width/8 at 720p
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TENSOR_PASSES = {"subinterval": 6, "dmd": 7}


@dataclass
class Row:
    op: str
    dtype: str
    elements: int
    fused_ms: float
    eager_ms: float
    fused_gbps: float
    eager_gbps: float
    copy_fraction: float
    max_rel_diff: float


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="samples per batch (default 1)")
    parser.add_argument(
        "--sample-shape",
        type=lambda text: tuple(int(part) for part in text.split("x")),
        default=WAN_A14B_LATENT,
        help="one sample's shape, e.g. 16x21x90x160 (default: Wan A14B 720p latent)",
    )
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--ops", default="subinterval,dmd", help="comma list of subinterval, dmd")
    parser.add_argument("--weight-clamp", type=float, default=5.0, help="C of the subinterval loss")
    parser.add_argument("--warmup-ms", type=int, default=100, help="warm-up time per measurement")
    parser.add_argument("--rep-ms", type=int, default=500, help="measured time per measurement")
    parser.add_argument("--copy-mib", type=int, default=1024, help="buffer size for the copy bandwidth")
    parser.add_argument(
        "--block", type=int, default=None, help="elements per Triton program (default: the kernels' own)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the rows to PATH as a JSON list of objects (the table is printed either way)",
    )
    args = parser.parse_args(argv)
    args.dtypes = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    args.ops = [name.strip() for name in args.ops.split(",") if name.strip()]
    for name in args.dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    for name in args.ops:
        if name not in TENSOR_PASSES:
            parser.error(f"unknown op {name!r}; choose from {sorted(TENSOR_PASSES)}")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    return args


def time_ms(fn: Callable[[], None], args, grad_to_none=None) -> float:
    """Median milliseconds per call; Triton's do_bench flushes L2 between calls."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth_gbps(args) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    numel = args.copy_mib * 2**20 // 4
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), args)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def subinterval_case(args, dtype) -> Tuple[Callable[[], torch.Tensor], List[torch.Tensor]]:
    """A forward+backward closure for the subinterval loss, and the tensors whose grad to reset."""
    from phased_dmd_mega import losses

    shape = (args.batch,) + args.sample_shape
    v = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    x_s = torch.randn(shape, device="cuda", dtype=dtype)
    eps = torch.randn(shape, device="cuda", dtype=dtype)
    s = torch.rand(args.batch, device="cuda") * 0.5
    t = s + 0.02 + torch.rand(args.batch, device="cuda") * (0.98 - s)
    grad_output = torch.rand(args.batch, device="cuda")

    def step() -> torch.Tensor:
        loss = losses.subinterval_flow_loss(v, x_s, eps, s, t, weight_clamp=args.weight_clamp)
        loss.backward(grad_output)
        return loss.detach()

    return step, [v]


def dmd_case(args, dtype) -> Tuple[Callable[[], torch.Tensor], List[torch.Tensor]]:
    """A forward+backward closure for the DMD loss, and the tensors whose grad to reset."""
    from phased_dmd_mega import losses

    shape = (args.batch,) + args.sample_shape
    student = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    fake = torch.randn(shape, device="cuda", dtype=dtype)
    teacher = torch.randn(shape, device="cuda", dtype=dtype)

    def step() -> torch.Tensor:
        loss = losses.dmd_loss(student, fake, teacher)
        loss.backward()
        return loss.detach()

    return step, [student]


CASES = {"subinterval": subinterval_case, "dmd": dmd_case}


def relative_difference(fused: torch.Tensor, eager: torch.Tensor) -> float:
    fused, eager = fused.double(), eager.double()
    return ((fused - eager).abs().max() / eager.abs().max().clamp_min(1e-30)).item()


def measure(op: str, dtype_name: str, copy_gbps: float, args) -> Row:
    from phased_dmd_mega import losses

    dtype = DTYPES[dtype_name]
    step, grads = CASES[op](args, dtype)
    results: Dict[str, Tuple[float, torch.Tensor, torch.Tensor]] = {}
    for backend in ("triton", "torch"):
        with losses.use_backend(backend):
            for tensor in grads:
                tensor.grad = None
            value = step()  # also the warm-up compile for Triton
            grad = grads[0].grad.detach().clone()
            ms = time_ms(step, args, grad_to_none=grads)
        results[backend] = (ms, value, grad)

    elements = args.batch * int(torch.Size(args.sample_shape).numel())
    moved = TENSOR_PASSES[op] * elements * torch.empty((), dtype=dtype).element_size()
    fused_ms, fused_value, fused_grad = results["triton"]
    eager_ms, eager_value, eager_grad = results["torch"]
    fused_gbps = moved / (fused_ms * 1e-3) / 1e9
    return Row(
        op=op,
        dtype=dtype_name,
        elements=elements,
        fused_ms=fused_ms,
        eager_ms=eager_ms,
        fused_gbps=fused_gbps,
        eager_gbps=moved / (eager_ms * 1e-3) / 1e9,
        copy_fraction=fused_gbps / copy_gbps,
        max_rel_diff=max(relative_difference(fused_value, eager_value), relative_difference(fused_grad, eager_grad)),
    )


def markdown_table(rows: List[Row], copy_gbps: float, device: str) -> str:
    from phased_dmd_mega.kernels import subinterval_loss

    lines = [
        f"Device: {device}; measured copy bandwidth {copy_gbps:.0f} GB/s (read + write); "
        f"Triton block {subinterval_loss.DEFAULT_BLOCK} elements.",
        "",
        "| loss | dtype | elements | fused fwd+bwd (ms) | eager fwd+bwd (ms) | speedup | "
        "fused GB/s | % of copy BW | eager eff. GB/s | max rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.op} | {row.dtype} | {row.elements:,} | {row.fused_ms:.3f} | {row.eager_ms:.3f} | "
            f"{row.eager_ms / row.fused_ms:.2f}x | {row.fused_gbps:.0f} | "
            f"{100 * row.copy_fraction:.0f}% | {row.eager_gbps:.0f} | {row.max_rel_diff:.1e} |"
        )
    return "\n".join(lines)


def write_json(rows: List[Row], path: Path) -> None:
    """The rows as a JSON list of objects, one per row, with the Row fields as keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_losses.py measures the fused Triton kernels on a GPU and needs CUDA; "
            "none is available here. (The CPU interpreter path is for tests, not timing.)",
            file=sys.stderr,
        )
        return 2
    torch.manual_seed(args.seed)
    if args.block is not None:  # launch_config reads it at every launch
        from phased_dmd_mega.kernels import subinterval_loss

        subinterval_loss.DEFAULT_BLOCK = args.block
    copy_gbps = copy_bandwidth_gbps(args)
    rows = [measure(op, dtype, copy_gbps, args) for op in args.ops for dtype in args.dtypes]
    print(markdown_table(rows, copy_gbps, torch.cuda.get_device_name()))
    if args.json is not None:
        write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
