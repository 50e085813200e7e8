"""Memory per GPU of a training run, estimated from the model's shapes and the run config.

    python -m phased_dmd_mega.memory_estimate --config examples/wan22_t2v_a14b.yaml [key=value ...]
    python -m phased_dmd_mega.memory_estimate --markdown examples/*.yaml     # the README's table

An estimate, not a measurement. It counts, per GPU, what the trainer holds today:
- the frozen teacher, one model per expert, in ``model.dtype``;
- every trainable role (a generator per phase, a fake model per phase and teacher expert it
  reaches): a full copy of its expert, or with ``model.lora.rank`` > 0 only its adapters on the
  teacher's shared weights, in ``model.dtype``. With a student (``model.student_path``, whose
  size ``model.student_preset`` names) the roles are counted at the student's size, and with
  LoRA the student's frozen shared weights once;
- the optimizer, for every role (states stay once a role has stepped, so the last phase holds
  all of them). With ``optimizer.distributed`` (megatron's DistributedOptimizer, the default):
  fp32 AdamW moments, and for bf16/fp16 weights an fp32 main copy, split over the
  ``data_parallel`` x Ulysses ranks (12 / N bytes per bf16 parameter, 8 / N for fp32), and
  megatron DDP's fp32 gradient buffer, whole on every rank and kept between steps, one per
  role. Without it (torch AdamW on every rank): two moments in the weights' dtype, whole, and
  the gradients of the largest role (set to None after each step);
- the generator EMA copies (``optimizer.ema_decay``);
- activations: what the DiT blocks of one forward with gradient keep for the backward (a
  generator's exit step or a fake update: the roles' size), for ``data.micro_batch_size`` samples (else
  ``data.batch_size``) at the largest resolution (``block_activations`` gives the bytes per
  token; tests/unit/test_memory_estimate.py checks them against the tensors autograd saves); with
  recompute a block keeps its input only and one block at a time is recomputed in the backward;
- working memory: one block's activations at twice the batch (the teacher's conditional and
  unconditional passes run as one batch; the backward of one block needs about as much).

``data_parallel`` (``--data-parallel``) is the number of model replicas; 1, the default, is
the upper bound (nothing shared).

Parameter counts are exact: the model (and its LoRA adapters) is built on the meta device and
its tensor-parallel parameters (megatron's ``tensor_model_parallel`` tag) are divided by TP.
Left out: the CUDA context and NCCL buffers (about 1-3 GiB), allocator fragmentation, the
embeddings, head and loss tensors (a few hidden-sized tensors per token, once), and the buffers
of a checkpoint being written.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from phased_dmd_mega.config import Config, ConfigError, load_config
from phased_dmd_mega.models.architecture_types import FP32_BYTES, BlockActivations

GIB = 2**30
GPU_NAME = "H100 80GB"
GPU_MEMORY_GIB = 79.1  # what torch.cuda reports as total on an H100 SXM 80GB
HEADROOM = 0.9  # an estimate under 90% of the GPU counts as fitting (fragmentation, NCCL, context)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of one model: split over tensor-parallel ranks, or whole on every rank."""

    sharded: int = 0
    replicated: int = 0

    @property
    def total(self) -> int:
        return self.sharded + self.replicated

    def per_rank(self, tensor_parallel: int) -> float:
        return self.sharded / tensor_parallel + self.replicated

    @classmethod
    def of(cls, parameters) -> "ParameterCount":
        sharded = replicated = 0
        for p in parameters:
            if getattr(p, "tensor_model_parallel", False):
                sharded += p.numel()
            else:
                replicated += p.numel()
        return cls(sharded, replicated)


@contextlib.contextmanager
def _one_process_layout():
    """Models are built for the current parallel state: count them at tensor parallel 1."""
    from phased_dmd_mega import parallel

    with parallel.ensure_layout() as layout:
        if layout.tensor_parallel != 1:
            raise RuntimeError("parameters are counted at tensor parallel 1; call this outside a parallel run")
        yield


@functools.lru_cache(maxsize=None)
def parameter_counts(
    family: str, preset: str, lora_rank: int = 0, lora_targets: Tuple[str, ...] = ()
) -> Tuple[ParameterCount, ParameterCount]:
    """(the model, one role's LoRA adapters) of a preset, built on the meta device."""
    import torch

    from phased_dmd_mega.models.architectures import registry
    from phased_dmd_mega.models.options import ModelParallelOptions

    architecture = registry()[family]
    if preset not in architecture.presets:
        raise ConfigError(f"model.preset: {preset!r} is not a {family} preset ({', '.join(architecture.presets)})")
    with _one_process_layout(), torch.device("meta"):
        model = architecture.model_class(architecture.presets[preset], ModelParallelOptions(initialize=False))
        adapters = ParameterCount()
        if lora_rank > 0:
            from phased_dmd_mega.models.lora import add_adapter

            view = add_adapter(model, "count", lora_rank, float(lora_rank), lora_targets)
            adapters = ParameterCount.of(view.parameters())
            model_count = ParameterCount.of(p for name, p in model.named_parameters() if ".adapters." not in name)
        else:
            model_count = ParameterCount.of(model.parameters())
    return model_count, adapters


# ----------------------------------------------------------------------------- activations


def tokens_of(architecture, dims, resolution) -> Tuple[int, int]:
    """(latent tokens, prompt tokens that run through the blocks) of one sample."""
    _, *grid = architecture.latent_geometry(dims).latent_shape(*resolution.pixels)
    return architecture.dit_tokens(dims, tuple(grid)), architecture.text_tokens_in_blocks()


def activation_bytes(
    blocks: BlockActivations,
    num_layers: int,
    batch: int,
    tokens: int,
    text_tokens: int,
    prompt_tokens: int,
    tensor_parallel: int,
    ulysses: int,
    sequence_parallel: bool,
    recompute: str,
    recompute_num_blocks: int,
) -> Tuple[float, float]:
    """(kept for the backward, working memory) of one forward with gradient."""
    local_tokens = batch * (tokens + text_tokens) / ulysses
    per_block = local_tokens * blocks.per_token(tensor_parallel, sequence_parallel)
    per_block += batch * prompt_tokens * blocks.text_fixed / tensor_parallel
    block_input = local_tokens * blocks.block_input / (tensor_parallel if sequence_parallel else 1)
    recomputed = {"none": 0, "full": num_layers, "blocks": min(recompute_num_blocks, num_layers)}[recompute]
    kept = recomputed * block_input + (num_layers - recomputed) * per_block
    if recomputed:
        kept += per_block  # the block being recomputed in the backward
    return kept, 2 * per_block


# ----------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """Bytes per GPU by item, with a description of the run."""

    summary: str
    items: List[Tuple[str, float]]
    config: Config
    shape: str  # the largest resolution, frames x height x width

    @property
    def total(self) -> float:
        return sum(value for _, value in self.items)

    @property
    def fits(self) -> bool:
        return self.total / GIB <= HEADROOM * GPU_MEMORY_GIB

    def item(self, prefix: str) -> float:
        return sum(value for name, value in self.items if name.startswith(prefix))


@dataclass(frozen=True)
class Roles:
    """The models the trainer builds for a config (a two-expert fake model counts twice)."""

    generators: int
    fakes: int
    ema: int
    largest: int  # models in the largest role (2 for a fake model spanning both experts)


def roles_of(cfg: Config) -> Roles:
    from phased_dmd_mega.distill.build import fake_experts, phase_layout

    layout = phase_layout(cfg)
    fakes = [len(fake_experts(layout, k, cfg, cfg.phases.expert_boundary)) for k in range(layout.num_phases)]
    ema = layout.num_phases if cfg.optimizer.ema_decay is not None else 0
    return Roles(layout.num_phases, sum(fakes), ema, max(fakes))


def check_heads(cfg: Config, dims, preset: str) -> None:
    """Heads are split over tensor-parallel ranks, then over Ulysses ranks."""
    par = cfg.parallel
    split = par.tensor_parallel * par.ulysses_parallel
    if dims.num_heads % split:
        raise ConfigError(
            f"parallel: {preset} has {dims.num_heads} attention heads, not divisible by "
            f"tensor_parallel {par.tensor_parallel} x ulysses_parallel {par.ulysses_parallel} = {split}"
        )


def optimizer_items(cfg: Config, trainable: int, largest: int, per_role: float, data_parallel: int):
    """(name, bytes) of the optimizer states and gradients of ``trainable`` roles of
    ``per_role`` parameters each on this rank."""
    weight = DTYPE_BYTES[cfg.model.dtype]
    if not cfg.optimizer.distributed:
        return [
            (
                f"AdamW states (2 per trainable parameter, {cfg.model.dtype}, whole on every rank)",
                trainable * per_role * 2 * weight,
            ),
            ("gradients of the largest role", largest * per_role * weight),
        ]
    sharing = data_parallel * cfg.parallel.ulysses_parallel  # megatron's optimizer splits over DP x Ulysses
    main_copy = 0 if weight == FP32_BYTES else FP32_BYTES  # fp32 weights are their own main copy
    what = "fp32 moments" + (" + fp32 main copy" if main_copy else "")
    return [
        (
            f"AdamW states ({what}, split over {sharing} DP x Ulysses ranks)",
            trainable * per_role * (2 * FP32_BYTES + main_copy) / sharing,
        ),
        ("gradients (fp32 DDP buffer per trainable role)", trainable * per_role * FP32_BYTES),
    ]


def role_preset(cfg: Config) -> str:
    """The preset the roles are counted at: the student's, or the teacher's."""
    model_cfg = cfg.model
    if model_cfg.student_path is None and model_cfg.student_preset is None:
        return model_cfg.preset
    if model_cfg.student_preset is None:
        raise ConfigError(
            "model.student_preset: the memory estimate needs the student's preset name (model.student_path is "
            f"{model_cfg.student_path!r})"
        )
    return model_cfg.student_preset


def estimate(cfg: Config, data_parallel: int = 1) -> Estimate:
    from phased_dmd_mega.models.architectures import registry

    model_cfg, par = cfg.model, cfg.parallel
    if model_cfg.preset is None:
        raise ConfigError(
            "model.preset: the memory estimate needs the architecture's preset name "
            f"(one of: {', '.join(registry()[model_cfg.family].presets)})"
        )
    architecture = registry()[model_cfg.family]
    dims = architecture.presets.get(model_cfg.preset)
    student = role_preset(cfg) if role_preset(cfg) != model_cfg.preset else None
    model, _ = parameter_counts(model_cfg.family, model_cfg.preset)
    role_model, adapters = parameter_counts(
        model_cfg.family, student or model_cfg.preset, model_cfg.lora.rank, tuple(model_cfg.lora.target_modules)
    )
    role_dims = architecture.presets[student or model_cfg.preset]
    check_heads(cfg, dims, model_cfg.preset)
    check_heads(cfg, role_dims, student or model_cfg.preset)
    tp, ulysses, sp = par.tensor_parallel, par.ulysses_parallel, par.sequence_parallel
    weight = DTYPE_BYTES[model_cfg.dtype]
    experts = 2 if cfg.phases.expert_boundary is not None else 1
    roles = roles_of(cfg)
    lora = model_cfg.lora.rank > 0
    per_model = model.per_rank(tp)
    per_role = adapters.per_rank(tp) if lora else role_model.per_rank(tp)
    trainable = roles.generators + roles.fakes

    resolution, tokens, text_tokens = max(
        ((r, *tokens_of(architecture, dims, r)) for r in cfg.data.resolutions), key=lambda row: row[1]
    )
    micro = cfg.data.micro_batch_size or cfg.data.batch_size  # gradient accumulation: one micro-batch at a time

    def activations(of):  # (kept, working) of a forward with gradient of a model of dims ``of``
        return activation_bytes(
            architecture.block_activations(of, weight),
            of.num_layers,
            micro,
            tokens,
            text_tokens,
            architecture.prompt_tokens,
            tp,
            ulysses,
            sp,
            model_cfg.recompute,
            model_cfg.recompute_num_blocks,
        )

    kept, working = activations(role_dims)
    working = max(working, activations(dims)[1])  # the teacher's guided pass: its own blocks
    role_kind = f"LoRA rank {model_cfg.lora.rank} adapters" if lora else "full copies"
    if student:
        role_kind += f" at {student}"
    shared_student = (
        [
            (
                f"student weights ({student}, {model_cfg.dtype}, frozen, shared by the LoRA roles)",
                role_model.per_rank(tp) * weight,
            )
        ]
        if student and lora
        else []
    )
    items = [
        (
            f"teacher weights ({experts} expert{'s' * (experts > 1)}, {model_cfg.dtype}, frozen)",
            experts * per_model * weight,
        ),
        *shared_student,
        (
            f"trainable roles: {roles.generators} generators + {roles.fakes} fakes, {role_kind}",
            trainable * per_role * weight,
        ),
        *optimizer_items(cfg, trainable, roles.largest, per_role, data_parallel),
        (f"generator EMA ({roles.ema} copies)", roles.ema * per_role * weight),
        (f"activations kept for the backward (recompute {model_cfg.recompute})", kept),
        ("working memory (one block at twice the batch)", working),
    ]
    shape = f"{resolution.frames}x{resolution.height}x{resolution.width}"
    summary = (
        f"{model_cfg.preset} ({model.total / 1e9:.2f}B parameters per expert, {model.replicated / 1e9:.2f}B of them "
        f"not split by TP), "
        f"{f'student {student} ({role_model.total / 1e9:.2f}B parameters), ' if student else ''}"
        f"TP {tp} x Ulysses {ulysses}, sequence parallel {'on' if sp else 'off'}, "
        f"{data_parallel} data-parallel replica{'s' * (data_parallel > 1)}, "
        f"batch {cfg.data.batch_size} per data-parallel rank"
        f"{f' in micro-batches of {micro}' if micro != cfg.data.batch_size else ''} at {shape} ({tokens} latent tokens"
        f"{f' + {text_tokens} text tokens' if text_tokens else ''})"
    )
    return Estimate(summary, items, cfg, shape)


# ----------------------------------------------------------------------------- output


def format_estimate(est: Estimate, source: str) -> str:
    lines = [f"memory per GPU, estimated for {source}:", f"  {est.summary}"]
    width = max(len(name) for name, _ in est.items)
    lines += [f"  {name:<{width}}  {value / GIB:7.1f} GiB" for name, value in est.items]
    verdict = "fits" if est.fits else "does NOT fit"
    lines.append(
        f"  {'total (estimate)':<{width}}  {est.total / GIB:7.1f} GiB: {verdict} in {HEADROOM:.0%} of "
        f"an {GPU_NAME} ({GPU_MEMORY_GIB} GiB)"
    )
    return "\n".join(lines)


MARKDOWN_HEADER = (
    "| recipe | model | roles | TP x Ulysses (SP) | recompute | batch per DP rank, largest shape "
    "| weights + optimizer | activations + working | total per GPU (estimate) |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(est: Estimate, source: str) -> str:
    cfg = est.config
    lora = cfg.model.lora
    roles = f"LoRA r{lora.rank}" if lora.rank else "full"
    static = est.total - est.item("activations") - est.item("working")
    par = cfg.parallel
    model = cfg.model.preset if role_preset(cfg) == cfg.model.preset else f"{cfg.model.preset} -> {role_preset(cfg)}"
    return (
        f"| `{source}` | {model} | {roles} | {par.tensor_parallel} x {par.ulysses_parallel} "
        f"({'on' if par.sequence_parallel else 'off'}) | {cfg.model.recompute} | {cfg.data.batch_size}, "
        f"{est.shape} | {static / GIB:.1f} GiB "
        f"| {(est.item('activations') + est.item('working')) / GIB:.1f} GiB | {est.total / GIB:.1f} GiB |"
    )


def markdown_table(configs: Sequence[str]) -> str:
    return "\n".join([MARKDOWN_HEADER] + [markdown_row(estimate(load_config(c)), c) for c in configs])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phased_dmd_mega.memory_estimate",
        description="Estimate the memory per GPU of a training run from its config (see the module docstring).",
    )
    parser.add_argument("--config", "-c", help="YAML run configuration")
    parser.add_argument("--markdown", nargs="+", metavar="CONFIG", help="one table row per config (the README's table)")
    parser.add_argument(
        "--data-parallel",
        type=int,
        default=1,
        metavar="N",
        help="model replicas the distributed optimizer splits its states over (default 1: the upper bound)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides of --config")
    args = parser.parse_args(argv)
    try:
        if args.markdown:
            print(markdown_table(args.markdown))
            return 0
        if args.config is None:
            parser.error("give --config (with overrides) or --markdown")
        if args.data_parallel < 1:
            parser.error(f"--data-parallel must be >= 1, got {args.data_parallel}")
        print(format_estimate(estimate(load_config(args.config, args.overrides), args.data_parallel), args.config))
    except ConfigError as err:
        print(f"memory estimate: configuration error: {err}", file=sys.stderr)
        return 2
    return 0


def as_dict(est: Estimate) -> Dict[str, float]:
    """Item name -> GiB (for scripts)."""
    return {name: value / GIB for name, value in est.items}


if __name__ == "__main__":
    raise SystemExit(main())
