"""One Phased DMD iteration and its parts, at a real architecture with random weights: where the
time goes, the model FLOPs (phased_dmd_mega/flops.py), TFLOP/s against the device's measured
dense GEMM rate in the run's dtype, and the same model's plain forward + backward against
diffusers' reference model.

    python bench/bench_iteration.py                                   # CPU: Wan2.1-1.3B, LoRA 32, 1x128x128
    python bench/bench_iteration.py --full --num-layers 6              # full fine-tuning (6 of the 30 blocks)
    python bench/bench_iteration.py --device cuda --dtype bfloat16 --resolution 81x480x832
    python bench/bench_iteration.py --device cuda --dtype bfloat16 --preset qwen-image --resolution 1x1328x1328

Every instant of the measured iterations is given to the innermost part running then:
rollouts (the generators' no-grad and grad rollouts), teacher CFG (both branches of the guided
teacher), fake forward (the fake model's calls), backward, optimizer steps, losses (the fused
subinterval and DMD losses, re-noising), noise and data (the batch, every noise draw), the rest
of the fake and generator updates, and everything else; a checkpoint save is timed on its own.
"DiT share" is the time inside DiT calls (forwards and all backwards) over the iteration's: the
iteration's rate over the rate its DiT calls reach alone. On CUDA the parts are separated by
device synchronisations (which the trainer itself does not make). Prints a markdown table;
--json PATH writes the figures too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phased_dmd_mega import losses, parallel  # noqa: E402
from phased_dmd_mega.benchmarking import alternating_seconds, dense_matmul_tflops  # noqa: E402
from phased_dmd_mega.config import load_config  # noqa: E402
from phased_dmd_mega.data import LatentGeometry, SyntheticPrompts, parse_resolution  # noqa: E402
from phased_dmd_mega.distill import phased as phased_module  # noqa: E402
from phased_dmd_mega.distill import roles as roles_module  # noqa: E402
from phased_dmd_mega.distill.roles import Experts  # noqa: E402
from phased_dmd_mega.distill.trainer import Trainer  # noqa: E402
from phased_dmd_mega.flops import FlopCounter  # noqa: E402
from phased_dmd_mega.models.architectures import registry  # noqa: E402
from phased_dmd_mega.models.options import ModelParallelOptions  # noqa: E402

PARTS = (
    "rollouts",
    "teacher CFG",
    "fake forward",
    "backward",
    "optimizer steps",
    "losses",
    "noise and data",
    "fake updates (rest)",
    "generator update (rest)",
    "everything else",
)


# ----------------------------------------------------------------------------- timing


class PartTimer:
    """Exclusive wall time per part: each instant goes to the innermost part running."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._stack = device, defaultdict(float), []
        self._since = time.perf_counter()
        self.dit_seconds, self._dit_depth, self._dit_since = 0.0, 0, 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _switch(self, now: float) -> None:
        self.seconds[self._stack[-1] if self._stack else "everything else"] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def part(self, name: str, dit: bool = False):
        self._switch(self._now())
        self._stack.append(name)
        if dit:
            self._dit_enter()
        try:
            yield
        finally:
            now = self._now()
            if dit:
                self._dit_leave(now)
            self._switch(now)
            self._stack.pop()

    @contextlib.contextmanager
    def dit(self):
        """Time inside DiT calls (not a part: it stays with the enclosing one)."""
        self._dit_enter()
        try:
            yield
        finally:
            self._dit_leave(self._now())

    def _dit_enter(self) -> None:
        if self._dit_depth == 0:
            self._dit_since = self._now()
        self._dit_depth += 1

    def _dit_leave(self, now: float) -> None:
        self._dit_depth -= 1
        if self._dit_depth == 0:
            self.dit_seconds += now - self._dit_since

    def reset(self) -> None:
        self.seconds.clear()
        self.dit_seconds, self._since = 0.0, self._now()

    def wrap(self, fn: Callable, name: str, dit: bool = False) -> Callable:
        def timed(*args, **kwargs):
            with self.part(name, dit):
                return fn(*args, **kwargs)

        return timed

    def wrap_dit(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self.dit():
                return fn(*args, **kwargs)

        return timed


@contextlib.contextmanager
def instrumented(trainer: Trainer, timer: PartTimer):
    """The iteration's parts routed through ``timer`` while inside; everything put back after."""
    phased, patched = trainer.phased, []

    def replace_attribute(owner, name: str, make) -> None:
        own = owner.__dict__.get(name) if name in vars(owner) else None  # None: it comes from the class
        patched.append((owner, name, own))
        setattr(owner, name, make(getattr(owner, name)))

    def patch(owner, name: str, part: str, dit: bool = False) -> None:
        replace_attribute(owner, name, lambda fn: timer.wrap(fn, part, dit))

    def patch_dit(owner, name: str) -> None:
        replace_attribute(owner, name, timer.wrap_dit)

    patch(phased_module, "rollout_to_phase_end", "rollouts")
    patch_dit(roles_module, "call_dit")
    patch(phased.teacher, "forward", "teacher CFG")
    for role in phased.fakes:
        patch(role.model, "forward", "fake forward")
    for role in phased.generators + phased.fakes:
        patch(role, "step", "optimizer steps")
    for name in ("subinterval_flow_loss", "dmd_loss", "subinterval_noise"):
        patch(losses, name, "losses")
    for name in ("_noise", "_renoise_draws"):
        patch(phased, name, "noise and data")
    patch(trainer, "batch", "noise and data")
    patch(phased, "fake_update", "fake updates (rest)")
    patch(phased, "generator_update", "generator update (rest)")
    patch(torch.Tensor, "backward", "backward", dit=True)
    try:
        yield
    finally:
        for owner, name, own in reversed(patched):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


def _read_by_torch_optim() -> bool:
    """torch.optim keeps its step counts on the host: reading them is no device sync."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        if "/torch/optim/" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def counting_host_reads(counts: Dict[str, int]):
    """Count the reads of tensor values into Python (``.item()``, ``bool()``, ``float()``,
    ``.tolist()``) outside torch.optim: on a GPU each read of a device tensor waits for the
    device (a host sync). On CPU host tensors count too (noise draws on CPU generators, the
    prompt source): an upper bound of a GPU run's syncs."""
    names = ("item", "__bool__", "__float__", "tolist")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    own = {name for name in names if name in vars(torch.Tensor)}  # the rest come from TensorBase

    def counted(name):
        def read(self, *args, **kwargs):
            if not _read_by_torch_optim():
                counts[name] = counts.get(name, 0) + 1
            return originals[name](self, *args, **kwargs)

        return read

    for name in names:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            if name in own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)


# ----------------------------------------------------------------------------- the run


def build(args) -> Trainer:
    architecture = registry()[args.family]
    dims = architecture.presets[args.preset]
    if args.num_layers:
        dims = replace(dims, num_layers=args.num_layers)
    frames, height, width = args.resolution
    overrides = [
        f"model.family={args.family}",
        f"model.preset={args.preset}",
        f"model.dtype={args.dtype}",
        f"model.attention_backend={args.attention}",
        f"model.recompute={args.recompute}",
        f"model.lora.rank={0 if args.full else args.lora_rank}",
        f"phases.fake_updates_per_generator_update={args.fake_updates}",
        f"optimizer.distributed={str(args.optimizer == 'distributed').lower()}",
        f"optimizer.fused={str(args.adamw == 'fused').lower()}",
        f"phases.guidance_scale={args.guidance}",
        "phases.iterations_per_phase=100",
        f"data.batch_size={args.batch}",
        f"data.resolutions=[{{frames: {frames}, height: {height}, width: {width}, probability: 1.0}}]",
        f"run.output_dir={args.output}",
        f"checkpoint.dir={args.output}/checkpoints",
        "checkpoint.resume=none",
        "logging.log_every=1000",
    ]
    cfg = load_config(None, overrides)
    options = ModelParallelOptions(
        dtype=getattr(torch, args.dtype), attention_backend=args.attention, recompute=args.recompute
    )
    with torch.device(args.device):
        teacher = Experts(architecture.model_class(dims, options)).requires_grad_(False)
    channels = getattr(dims, "out_channels", 16)
    prompts = SyntheticPrompts(4, architecture.synthetic_prompt_tokens, dims.text_dim, seed=0)
    return Trainer(cfg, teacher, prompts, LatentGeometry(channels=channels))


def measure_iterations(trainer: Trainer, iterations: int) -> Dict[str, object]:
    timer = PartTimer(parallel.layout().device)
    counter: FlopCounter = trainer.flops
    reads: Dict[str, int] = {}
    with instrumented(trainer, timer):
        with counting_host_reads(reads):  # counted in the warm-up, which the timing leaves out
            trainer.phased.iteration(trainer.schedule[0], trainer.batch(0)[0], 0)
        counter.take()
        timer.reset()
        start = timer._now()
        for step in range(1, 1 + iterations):
            batch, _ = trainer.batch(step)
            trainer.phased.iteration(trainer.schedule[step], batch, step)
        seconds = timer._now() - start
        timer._switch(timer._now())
    flops = counter.take()
    save = time.perf_counter()
    trainer.save(iterations)
    checkpoint_seconds = time.perf_counter() - save
    return {
        "seconds_per_iteration": seconds / iterations,
        "parts": {part: timer.seconds.get(part, 0.0) / iterations for part in PARTS},
        "dit_share": timer.dit_seconds / seconds,
        "host_reads_per_iteration": sum(reads.values()),
        "model_flops": flops.model / iterations,
        "hardware_flops": flops.hardware / iterations,
        "tflops_per_second": flops.model / seconds / 1e12,
        "checkpoint_seconds": checkpoint_seconds,
    }


def against_diffusers(args) -> Dict[str, float]:
    """Forward + backward of one DiT at the run's latent shape: this project's and diffusers'."""
    architecture = registry()[args.family]
    dims = architecture.presets[args.preset]
    if args.num_layers:
        dims = replace(dims, num_layers=args.num_layers)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    frames, height, width = args.resolution
    shape = LatentGeometry(channels=getattr(dims, "in_channels", 16)).latent_shape(frames, height, width)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, *shape, generator=gen)
    context = torch.randn(args.batch, architecture.synthetic_prompt_tokens, dims.text_dim, generator=gen)
    timestep = torch.full((args.batch,), 500.0)
    latents, context, timestep = latents.to(device, dtype), context.to(device, dtype), timestep.to(device)
    options = ModelParallelOptions(dtype=dtype, attention_backend=args.attention)
    with torch.device(device):
        ours = architecture.model_class(dims, options)
    reference = diffusers_model(args.family, dims, dtype, device)
    if args.family == "qwen_image":
        reference_args = qwen_reference_inputs(latents, context, timestep, dims)
    else:
        reference_args = dict(hidden_states=latents, timestep=timestep, encoder_hidden_states=context)

    def step(model, loss_of):
        def run():
            loss_of(model).float().square().mean().backward()
            model.zero_grad(set_to_none=True)  # one model's gradients in memory at a time

        return run

    # In turns, so that a machine slower for a while slows both alike.
    seconds = alternating_seconds(
        {
            "ours": step(ours, lambda m: m(latents, timestep, context)),
            "diffusers": step(reference, lambda m: m(**reference_args, return_dict=False)[0]),
        },
        warmup=1,
        iters=args.repeats,
    )
    result = {"ours_seconds": seconds["ours"], "diffusers_seconds": seconds["diffusers"]}
    result["ours_over_diffusers"] = result["ours_seconds"] / result["diffusers_seconds"]
    return result


def diffusers_model(family: str, dims, dtype, device):
    from phased_dmd_mega.models.architectures import registry as architectures

    config = architectures()[family].dims_to_diffusers_config(dims)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if family == "wan":
        from diffusers import WanTransformer3DModel as Model
    else:
        from diffusers import QwenImageTransformer2DModel as Model
    with torch.device(device):
        return Model(**config).to(dtype)


def qwen_reference_inputs(latents, context, timestep, dims):
    from phased_dmd_mega.models.qwen_image import pack_latents

    b, _, _, h, w = latents.shape
    p = dims.patch_size
    packed = pack_latents(latents[:, :, 0], p).transpose(0, 1)
    return dict(
        hidden_states=packed,
        encoder_hidden_states=context,
        encoder_hidden_states_mask=torch.ones(context.shape[:2], device=context.device, dtype=torch.long),
        timestep=timestep / 1000.0,
        img_shapes=[[(1, h // p, w // p)]] * b,
    )


# ----------------------------------------------------------------------------- report


def report(args, figures: Dict[str, object]) -> List[str]:
    it = figures["iteration"]
    gemm = figures["gemm_tflops"]
    mode = "full fine-tuning" if args.full else f"LoRA rank {args.lora_rank}"
    layers = f", {args.num_layers} blocks" if args.num_layers else ""
    lines = [
        f"{args.preset}{layers}, {mode}, {args.dtype}, batch {args.batch} at {'x'.join(map(str, args.resolution))}, "
        f"{args.fake_updates} fake update(s) per generator update, guidance {args.guidance}, "
        f"recompute {args.recompute}, {args.optimizer} optimizer ({args.adamw} AdamW), on {figures['device']}",
        "",
        "| part | seconds per iteration | share |",
        "|---|---:|---:|",
    ]
    total = it["seconds_per_iteration"]
    for part, seconds in it["parts"].items():
        lines.append(f"| {part} | {seconds:.3f} | {100 * seconds / total:.1f}% |")
    lines += [
        f"| **iteration** | **{total:.3f}** | 100% |",
        "",
        f"- model FLOPs per iteration {it['model_flops'] / 1e12:.3f} T (hardware {it['hardware_flops'] / 1e12:.3f} T); "
        f"{it['tflops_per_second']:.4f} TFLOP/s = {it['tflops_per_second'] / gemm:.2f} x the measured dense GEMM "
        f"rate ({gemm:.4f} TFLOP/s, {args.dtype})",
        f"- DiT share: {100 * it['dit_share']:.1f}% of the iteration inside DiT calls (forwards and backwards)",
        f"- host reads of tensor values per iteration (GPU syncs at most): {it['host_reads_per_iteration']:.0f}",
        f"- checkpoint save: {it['checkpoint_seconds']:.2f} s",
    ]
    if "diffusers" in figures:
        d = figures["diffusers"]
        lines.append(
            f"- one DiT forward + backward: {d['ours_seconds']:.3f} s here, {d['diffusers_seconds']:.3f} s in "
            f"diffusers ({d['ours_over_diffusers']:.3f}x)"
        )
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--family", choices=("wan", "qwen_image"), help="default: qwen_image for qwen-* presets")
    parser.add_argument("--num-layers", type=int, default=0, help="fewer blocks than the preset (0: all)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning (default: LoRA)")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--resolution", default="1x128x128", help="FRAMESxHEIGHTxWIDTH pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--fake-updates", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--optimizer", choices=("distributed", "per-rank"), default="distributed")
    parser.add_argument("--adamw", choices=("fused", "for-loop"), default="fused", help="optimizer.fused")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--recompute", default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed forward + backward calls per model")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.resolution = parse_resolution(args.resolution)
    if args.resolution is None:
        parser.error("--resolution must be FRAMESxHEIGHTxWIDTH")
    args.family = args.family or ("qwen_image" if args.preset.startswith("qwen") else "wan")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        args.output = out
        parallel.initialize(seed=0)
        try:
            trainer = build(args)
            figures: Dict[str, object] = {"iteration": measure_iterations(trainer, args.iterations)}
        finally:
            parallel.destroy()
        del trainer
    device = torch.device(args.device)
    figures["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    figures["threads"] = torch.get_num_threads()
    size = 8192 if device.type == "cuda" else 1024
    figures["gemm_tflops"] = dense_matmul_tflops(size, iters=5, dtype=getattr(torch, args.dtype), device=args.device)
    if not args.no_diffusers and importlib.util.find_spec("diffusers") is None:
        print("diffusers is not installed: no comparison with its model (--no-diffusers to silence)", file=sys.stderr)
        args.no_diffusers = True
    if not args.no_diffusers:
        parallel.initialize(seed=0)
        try:
            figures["diffusers"] = against_diffusers(args)
        finally:
            parallel.destroy()
    print("\n".join(report(args, figures)))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
