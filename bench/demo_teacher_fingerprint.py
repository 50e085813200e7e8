"""Does a code change alter the tiny demo's teacher beyond rounding? A fingerprint of it, to
compare between two checkouts: its initial weights, its output on fixed inputs, and its loss
after a few pretraining steps, all on the demo's 2 gloo ranks at tensor parallel 2.

    # once per checkout (the script imports the package and examples/tiny_demo.py from it)
    torchrun --standalone --nproc_per_node 2 bench/demo_teacher_fingerprint.py --checkout DIR --out A.pt
    # then
    python bench/demo_teacher_fingerprint.py --compare A.pt B.pt

Each rank writes its own shard's fingerprint (A.pt.rank0, A.pt.rank1); --compare reads both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

EVAL_INPUT_SEED = 5


def fingerprint(checkout: Path, steps: int) -> dict:
    sys.path[:0] = [str(checkout), str(checkout / "examples")]
    import tiny_demo as demo

    from phased_dmd_mega import parallel

    args = demo.demo_parser("fingerprint").parse_args([])
    parallel.initialize(tensor_parallel=2, seed=0)
    torch.set_num_threads(1)
    data = demo.Patterns.make(
        classes=args.classes,
        modes=args.modes,
        channels=4,
        size=8,
        noise=args.data_noise,
        text_dim=demo.WAN_PRESETS["tiny"].text_dim,
    )
    options = demo.ModelParallelOptions(attention_backend="sdpa", sequence_parallel=False)
    teacher = demo.build_model(options, dim=args.model_dim, ffn_dim=args.model_ffn, layers=args.model_layers)
    weights = {k: v.clone() for k, v in teacher.state_dict().items() if torch.is_tensor(v)}
    gen = torch.Generator().manual_seed(EVAL_INPUT_SEED)
    labels = torch.randint(0, data.classes, (4,), generator=gen)
    latents, t = torch.randn(4, 4, 1, 8, 8, generator=gen), torch.rand(4, generator=gen)
    with torch.no_grad():
        output = teacher(latents, t, data.condition(labels))
    loss = demo.pretrain_teacher(teacher, data, steps, args.teacher_batch, 1e-3, 5.0, 0)
    rank = torch.distributed.get_rank()
    parallel.destroy()
    return {"rank": rank, "weights": weights, "output": output, "loss": loss}


def compare(a: Path, b: Path) -> None:
    for rank in range(2):
        left = torch.load(f"{a}.rank{rank}")
        right = torch.load(f"{b}.rank{rank}")
        differing = [k for k in left["weights"] if not torch.equal(left["weights"][k], right["weights"].get(k))]
        output_diff = (left["output"] - right["output"]).abs().max().item()
        print(
            f"rank {rank}: {len(differing)} of {len(left['weights'])} initial tensors differ"
            f"{' (' + ', '.join(differing[:5]) + ')' if differing else ''}; "
            f"output max |diff| {output_diff:.3g}; loss {left['loss']:.10g} vs {right['loss']:.10g}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=30, help="pretraining steps before the loss is read")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    if args.out is None:
        parser.error("--out is required unless --compare is given")
    result = fingerprint(args.checkout.resolve(), args.steps)
    torch.save(result, f"{args.out}.rank{result['rank']}")


if __name__ == "__main__":
    main()
