"""A ceiling for the tiny demo's low-noise phase: how close to the data does the demo's DiT get
when its last two steps are trained by plain regression onto the teacher's own many-step ODE?

The demo's 4-step, 2-phase generator spends its last two steps (t = 0.833 -> 0.625 -> 0) in the
low-noise phase, and that is where its remaining distance to the data is lost (BENCHMARKS.md).
This asks whether the architecture can learn that two-step map at all, given exact targets:

1. pairs: noise is carried by the frozen teacher from t = 1 to the phase's start s (30 fine
   Euler steps), then on to 0 (30 more), giving (x_s, x_0) pairs of the teacher's ODE;
2. a copy of the teacher is trained on the pairs by mean-squared error through both of the
   phase's Euler steps (AdamW, cosine learning rate, the same optimizer path as the demo);
3. anchors from the demo's evaluation noise (carried to s the same way) are scored with the
   demo's metric: the regressed two-step map, the targets themselves, and the teacher's own two
   coarse steps; the teacher's 4 coarse steps from the noise give the demo's denominator.

    torchrun --standalone --nproc_per_node 2 bench/demo_regression_oracle.py [--pairs 32768] [--updates 2000]

It takes the demo's options and finds the demo's cached teacher (run `make demo` first, or the
teacher is pretrained here and cached for the demo). Rank 0 writes
<run.output_dir>/regression_oracle.json.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_demo as demo  # noqa: E402

from phased_dmd_mega import parallel  # noqa: E402
from phased_dmd_mega.distill.build import trainable_copy  # noqa: E402
from phased_dmd_mega.distill.optim import RoleOptimizer, make_adamw, set_learning_rate  # noqa: E402
from phased_dmd_mega.distill.roles import Experts  # noqa: E402
from phased_dmd_mega.distill.trainer import learning_rate_factor  # noqa: E402
from phased_dmd_mega.flow import euler_step  # noqa: E402
from phased_dmd_mega.log import get_logger  # noqa: E402
from phased_dmd_mega.schedule import PhaseLayout, shift, unshift  # noqa: E402

log = get_logger("oracle")
FINE_STEPS = 30  # per stretch; the demo's 40-step teacher is within 0.004 of the data noise floor


def fine_times(start: float, end: float, steps: int, S: float) -> List[float]:
    """``steps`` Euler steps from ``start`` down to ``end``, evenly spaced before the shift
    (the sampler's own spacing)."""
    u = torch.linspace(unshift(start, S), unshift(end, S), steps + 1, dtype=torch.float64)
    return [float(shift(v, S)) for v in u]


def integrate(model: Experts, x: torch.Tensor, times: Sequence[float], condition) -> torch.Tensor:
    """Euler steps through ``times``; differentiable unless called under no_grad."""
    for t, t_next in zip(times[:-1], times[1:]):
        x = euler_step(x, model(x, torch.full((x.shape[0],), t), condition), t, t_next)
    return x


@torch.no_grad()
def teacher_pairs(teacher: Experts, data: demo.Patterns, count: int, s: float, S: float, seed: int, chunk: int = 1024):
    """(labels, x_s, x_0) on the teacher's fine ODE; the draws are identical on every TP rank."""
    labels, anchors, targets = [], [], []
    started = time.perf_counter()
    for k in range(math.ceil(count / chunk)):
        gen = torch.Generator().manual_seed(seed * 7919 + k)
        rows = min(chunk, count - k * chunk)
        y = torch.randint(0, data.classes, (rows,), generator=gen)
        x_s = integrate(
            teacher,
            torch.randn((rows, *data.means.shape[2:]), generator=gen),
            fine_times(1.0, s, FINE_STEPS, S),
            data.condition(y),
        )
        labels.append(y)
        anchors.append(x_s)
        targets.append(integrate(teacher, x_s, fine_times(s, 0.0, FINE_STEPS, S), data.condition(y)))
        log.info("pairs %d/%d  %.0f s", sum(len(v) for v in labels), count, time.perf_counter() - started)
    return torch.cat(labels), torch.cat(anchors), torch.cat(targets)


def regress(
    generator: Experts,
    pairs,
    phase_times: Sequence[float],
    data: demo.Patterns,
    updates: int,
    batch: int,
    lr: float,
    seed: int,
    report,
) -> float:
    """Mean-squared error of the two-step output against the ODE target; returns the last 250
    updates' mean loss (the fit to the training pairs)."""
    labels, anchors, targets = pairs
    role = RoleOptimizer(generator, make_adamw(generator, lr, (0.9, 0.999), 1e-8, 0.0), grad_clip=1.0)
    recent: List[float] = []
    for step in range(updates):
        set_learning_rate(role, lr * learning_rate_factor(step, updates, 0, "cosine"))
        rows = torch.randint(0, len(labels), (batch,), generator=torch.Generator().manual_seed(seed * 100003 + step))
        out = integrate(generator, anchors[rows], phase_times, data.condition(labels[rows]))
        loss = (out - targets[rows]).pow(2).mean()
        loss.backward()
        role.step()
        recent = (recent + [loss.item()])[-250:]
        if (step + 1) % 250 == 0 or step == updates - 1:
            report(step + 1, sum(recent) / len(recent))
    return sum(recent) / len(recent)


def main() -> int:
    parser = demo.demo_parser(__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32768, help="teacher ODE pairs to regress on")
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    setup = demo.set_up(args)
    cfg, data, teacher = setup.cfg, setup.data, setup.teacher
    layout = PhaseLayout.from_config(cfg.phases)
    last = layout.num_phases - 1
    s, S = layout.phase_start(last), layout.shift
    phase_times = [layout.times[i] for i in layout.steps_of_phase(last)] + [layout.phase_end(last)]
    log.info(
        "low-noise phase: steps at %s; regression on %d pairs, %d updates",
        [round(t, 4) for t in phase_times],
        args.pairs,
        args.updates,
    )

    started = time.perf_counter()
    pairs = teacher_pairs(teacher, data, args.pairs, s, S, cfg.run.seed + 1)
    labels, noise = demo.eval_inputs(data, args.eval_per_class)  # the demo's
    condition = data.condition(labels)
    with torch.no_grad():
        held_out = integrate(teacher, noise, fine_times(1.0, s, FINE_STEPS, S), condition)
        results = {
            "teacher_4_steps": data.score(integrate(teacher, noise, layout.times, condition), labels),
            "teacher_fine_ode_targets": data.score(
                integrate(teacher, held_out, fine_times(s, 0.0, FINE_STEPS, S), condition), labels
            ),
            "teacher_two_coarse_steps": data.score(integrate(teacher, held_out, phase_times, condition), labels),
        }

    generator = Experts(trainable_copy(teacher.high))

    def report(step: int, loss: float) -> None:
        with torch.no_grad():
            score = data.score(integrate(generator, held_out, phase_times, condition), labels)
        log.info(
            "update %d/%d  training-pair MSE %.5f  held-out distance %.4f  %.0f s",
            step,
            args.updates,
            loss,
            score["distance_to_data"],
            time.perf_counter() - started,
        )

    fit = regress(generator, pairs, phase_times, data, args.updates, args.batch, args.lr, cfg.run.seed, report)
    with torch.no_grad():
        results["regressed_two_steps"] = {
            **data.score(integrate(generator, held_out, phase_times, condition), labels),
            "training_pair_rms": math.sqrt(fit),
        }

    if setup.layout.rank == 0:
        results["settings"] = {
            "pairs": args.pairs,
            "updates": args.updates,
            "batch": args.batch,
            "lr": args.lr,
            "phase_times": phase_times,
            "fine_steps": FINE_STEPS,
            "model": setup.model_size,
            "tensor_parallel": setup.layout.tensor_parallel,
            "seconds": time.perf_counter() - started,
        }
        (setup.out / "regression_oracle.json").write_text(json.dumps(results, indent=2))
        print("\n| low-noise phase from the teacher's anchors at t = %.4f | distance to data | mode coverage |" % s)
        print("|---|---|---|")
        for name in ("teacher_fine_ode_targets", "regressed_two_steps", "teacher_two_coarse_steps", "teacher_4_steps"):
            print(f"| {name} | {results[name]['distance_to_data']:.4f} | {results[name]['mode_coverage']:.2f} |")
        ratio = results["regressed_two_steps"]["distance_to_data"] / results["teacher_4_steps"]["distance_to_data"]
        print(f"\nregressed two steps / teacher 4 steps: {ratio:.2f}; wrote {setup.out / 'regression_oracle.json'}")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
