"""The ``phased-dmd`` command: train | sample | convert | export | encode-prompts | evaluate.

Exit status 2 reports bad usage (arguments, options, configuration), as argparse does; 1 a
command that ran and failed, with one ``error:`` line and no traceback."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional

from phased_dmd_mega import __version__
from phased_dmd_mega.config import ConfigError, dump_yaml, load_config
from phased_dmd_mega.evaluation.arguments import add_evaluate_arguments

EXIT_USAGE = 2  # bad arguments, options or configuration (as argparse reports its own)
EXIT_FAILURE = 1  # the command ran and failed
TEACHER_STEPS = 40  # `sample --teacher`'s default number of steps


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML run configuration (defaults when omitted)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. optimizer.generator.lr=1e-6"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the configuration, print it resolved, and stop"
    )


def _run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from phased_dmd_mega.distill.trainer import train
    from phased_dmd_mega.log import setup_logging

    setup_logging(cfg.logging.level, cfg.logging.all_ranks)
    return train(cfg)


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    directions = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_mega = directions.add_parser(
        "hf-to-mega",
        help="a Wan or Qwen-Image Hugging Face checkpoint -> the trainer's format",
        description="Convert a Hugging Face checkpoint to the trainer's own format: Wan in the diffusers "
        "or original layout (one model or the two Wan2.2 A14B experts), Qwen-Image in the diffusers "
        "layout (a transformer folder or a pipeline root); sharded or not.",
    )
    _add_convert_common(to_mega)
    to_mega.add_argument("--tp", type=int, default=1, help="tensor parallel size to check and record (default 1)")
    to_mega.add_argument("--boundary-ratio", type=float, help="two experts: override the stored/default boundary")
    to_hf = directions.add_parser(
        "mega-to-hf",
        help="the trainer's format -> a Hugging Face (diffusers, or original Wan) checkpoint",
        description="Convert the trainer's own format back to a Hugging Face layout.",
    )
    _add_convert_common(to_hf)
    to_hf.add_argument(
        "--layout",
        choices=("diffusers", "original"),
        default="diffusers",
        help="diffusers (WanTransformer3DModel, QwenImageTransformer2DModel) or original "
        "Wan names (Wan only; default diffusers)",
    )


class _OldOptionName(argparse.Action):
    """An option's deprecated name, hidden from --help: it sets what the new name sets, with a warning."""

    def __init__(self, option_strings, dest, new_name: str, **kwargs):
        self.new_name = new_name
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new_name}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_convert_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expect",
        default="wan",
        metavar="NAME",
        help="what the source must hold: wan or qwen_image (the numbers come from the source's "
        "config), or a preset of either that it must match (default wan)",
    )
    parser.add_argument("--arch", dest="expect", action=_OldOptionName, new_name="--expect")
    parser.add_argument("--src", required=True, help="source folder")
    parser.add_argument("--dst", required=True, help="destination folder (must not exist without --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--max-shard-size", type=_shard_size, default="5GB", help="per safetensors file (default 5GB)")


def _shard_size(text: str) -> int:
    from phased_dmd_mega.models.shards import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _run_convert(args: argparse.Namespace) -> int:
    from phased_dmd_mega import convert
    from phased_dmd_mega.log import setup_logging
    from phased_dmd_mega.models.architectures import CheckpointError

    setup_logging()
    try:
        if args.direction == "hf-to-mega":
            dst = convert.hf_to_mega(
                args.src,
                args.dst,
                expect=args.expect,
                tensor_parallel=args.tp,
                overwrite=args.overwrite,
                max_shard_bytes=args.max_shard_size,
                boundary_ratio=args.boundary_ratio,
            )
        else:
            dst = convert.mega_to_hf(
                args.src,
                args.dst,
                layout=args.layout,
                expect=args.expect,
                overwrite=args.overwrite,
                max_shard_bytes=args.max_shard_size,
            )
    except CheckpointError as err:
        return _usage_error(f"convert {args.direction}", str(err))
    print(dst)
    return 0


def _add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Encode prompts into the prompt-embedding cache that `phased-dmd train` reads (data.prompt_cache), "
        "exactly as the family's diffusers pipeline encodes them. Re-running the same command resumes "
        "an interrupted run; launch it with torchrun to encode shards on several GPUs."
    )
    parser.add_argument(
        "--family",
        required=True,
        choices=("wan", "qwen_image"),
        help="wan (umT5, zero-padded to 512 tokens) or qwen_image (Qwen2.5-VL, masked)",
    )
    parser.add_argument(
        "--text-encoder",
        required=True,
        metavar="PATH",
        help="the text encoder folder, or a diffusers pipeline root with text_encoder/ and tokenizer/",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer folder (default: the pipeline's tokenizer/, or beside the text encoder)",
    )
    parser.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help=".txt (one prompt per line), .jsonl or .json (objects with a prompt field), .csv",
    )
    parser.add_argument(
        "--prompt-field", default="prompt", help="field or column of .jsonl/.json/.csv (default prompt)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="cache folder to write (or to finish)")
    parser.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        help="negative prompt for classifier-free guidance (default: '' for wan, ' ' for qwen_image)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per encoder call (default 8)")
    parser.add_argument("--shard-size", type=int, default=1000, help="prompts per safetensors shard (default 1000)")
    parser.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"),
        help="encoder and stored dtype (default bf16)",
    )
    parser.add_argument("--device", help="e.g. cuda:0 or cpu (default: this rank's GPU, else the CPU)")
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        help="text tokens kept (default: 512, the pipelines' default; qwen_image up to 1024)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a cache of other inputs in --out")
    images = parser.add_argument_group(
        "first-frame images (Wan2.2 I2V)",
        "rows of a .jsonl/.json/.csv prompt file that name an image (relative paths: from the file's folder) "
        "also store WanImageToVideoPipeline's image condition: the first frame's VAE latents",
    )
    images.add_argument("--vae", metavar="PATH", help="AutoencoderKLWan folder, or a diffusers pipeline root with vae/")
    images.add_argument(
        "--resolution",
        metavar="FxHxW",
        action="append",
        help="frames x height x width to train at, e.g. 81x480x832 (the default); repeat it to "
        "encode each first frame at every resolution of a run's data.resolutions mixture",
    )
    images.add_argument("--image-field", default="image", help="field or column naming the image (default image)")
    images.add_argument(
        "--resize-mode",
        default="default",
        choices=("default", "crop", "fill"),
        help="default: resized to the resolution as the pipeline does; crop: aspect kept, centre "
        "cropped; fill: aspect kept, borders filled from the image (diffusers' resize modes)",
    )


def _run_encode(args: argparse.Namespace) -> int:
    from phased_dmd_mega.log import setup_logging
    from phased_dmd_mega.prompt_cache.command import EncodeOptions, encode_prompts
    from phased_dmd_mega.prompt_cache.errors import PromptEncodingError

    setup_logging()
    options = EncodeOptions(
        family=args.family,
        text_encoder=args.text_encoder,
        tokenizer=args.tokenizer,
        prompts=args.prompts,
        prompt_field=args.prompt_field,
        out=args.out,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        device=args.device,
        max_sequence_length=args.max_sequence_length,
        overwrite=args.overwrite,
        vae=args.vae,
        resolution=",".join(args.resolution) if args.resolution else None,
        image_field=args.image_field,
        resize_mode=args.resize_mode,
    )
    try:
        folder = encode_prompts(options)
    except PromptEncodingError as err:
        return _usage_error("encode-prompts", str(err))
    print(folder)
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from phased_dmd_mega.evaluation.command import run_from_arguments

    return run_from_arguments(args)


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a training checkpoint: an iter_N folder, or a checkpoint root (its `latest` is used)",
    )
    parser.add_argument("--dst", required=True, help="destination folder (must not exist without --overwrite)")
    parser.add_argument(
        "--layout",
        choices=("diffusers", "original"),
        default="diffusers",
        help="diffusers transformers and PEFT LoRA files, or original Wan folders and Wan-Video/ComfyUI "
        "LoRA keys (Wan only); default diffusers",
    )
    parser.add_argument(
        "--ema", action="store_true", help="export the generators' EMA copies (optimizer.ema_decay runs)"
    )
    parser.add_argument(
        "--merge", action="store_true", help="LoRA runs: write full weights W + (alpha/r) B A instead of LoRA files"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--max-shard-size", type=_shard_size, default="5GB", help="per safetensors file (default 5GB)")
    _add_checkpoint_overrides(parser)


def _add_checkpoint_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="changes to the checkpoint's stored config.yaml, e.g. model.teacher_path=/new/place",
    )


def _add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training checkpoint (iter_N folder or checkpoint root)")
    source.add_argument("--exported", help="a folder written by `phased-dmd export` (full or merged weights)")
    parser.add_argument(
        "--output", "-o", required=True, help="folder for the samples (must not exist without --overwrite)"
    )
    parser.add_argument("--ema", action="store_true", help="--checkpoint: sample with the generators' EMA copies")
    teacher = parser.add_argument_group(
        "teacher reference samples",
        "--checkpoint --teacher: the run's teacher (model.teacher_path; override it to name another) samples "
        "the same prompts and seeds as the generators, with a many-step Euler ODE sampler and "
        "classifier-free guidance, into the same folder format",
    )
    teacher.add_argument("--teacher", action="store_true", help="sample with the run's teacher, not its generators")
    teacher.add_argument("--steps", type=_positive_int, help=f"--teacher: Euler steps (default {TEACHER_STEPS})")
    teacher.add_argument(
        "--guidance",
        type=float,
        help="--teacher: classifier-free guidance scale g, uncond + g (cond - uncond), for every expert; "
        "1 is the conditional teacher alone (default: the run's phases.guidance_scale, 4 unless it set another)",
    )
    parser.add_argument(
        "--prompts",
        help="prompt-embedding cache folder (default: the run's own prompts); for an "
        "image-to-video run it also gives the first frames, at --resolution",
    )
    parser.add_argument("--indices", type=_indices, help="prompt rows to sample, e.g. 0,3,7 (default 0..N-1)")
    parser.add_argument(
        "--synthetic-prompts",
        type=int,
        default=0,
        metavar="N",
        help="N random prompt embeddings instead of a cache (smoke tests)",
    )
    parser.add_argument("--num-samples", "-n", type=int, help="samples to draw without --indices (default 1)")
    parser.add_argument(
        "--resolution",
        type=_resolution,
        help="FRAMESxHEIGHTxWIDTH or HEIGHTxWIDTH in pixels (default: the run's first resolution)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sample i starts from noise seeded seed + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per generator call (default 1)")
    parser.add_argument("--vae", help="diffusers VAE folder, or a pipeline root with vae/: decode to PNG (and mp4)")
    parser.add_argument("--vae-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--fps", type=int, default=16, help="frame rate of the mp4 files (default 16)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="--exported: the models' dtype (default: the exported weights')",
    )
    parser.add_argument(
        "--attention-backend",
        choices=("auto", "flash", "te", "sdpa"),
        default="auto",
        help="--exported: attention implementation (a checkpoint's config says its own)",
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (launch as many processes)")
    parser.add_argument("--ulysses", type=int, default=1, help="Ulysses sequence parallel size")
    parser.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism inside TP")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_checkpoint_overrides(parser)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _indices(text: str) -> List[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"indices {text!r} are not comma-separated integers") from err


def _resolution(text: str):
    from phased_dmd_mega.data import parse_resolution

    resolution = parse_resolution(text, frames_optional=True)
    if resolution is None:
        raise argparse.ArgumentTypeError(f"resolution {text!r} is not FRAMESxHEIGHTxWIDTH or HEIGHTxWIDTH")
    return resolution


def _run_export(args: argparse.Namespace) -> int:
    import os

    from phased_dmd_mega.distill.generators import open_generators
    from phased_dmd_mega.export import export_generators

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _usage_error("export", "export runs in one process (checkpoints load at any tensor parallel size)")

    def export():
        distilled = open_generators(args.checkpoint, ema=args.ema, overrides=args.overrides)
        return export_generators(
            distilled,
            args.dst,
            layout=args.layout,
            merge=args.merge,
            overwrite=args.overwrite,
            max_shard_bytes=args.max_shard_size,
        )

    return _with_models("export", export)


def _run_sample(args: argparse.Namespace) -> int:
    from phased_dmd_mega.sample import SampleRequest, Samplers, sample_to_folder

    if args.exported and args.overrides:
        return _usage_error("sample", "key=value overrides change a checkpoint's config; --exported has none")
    refused = _teacher_options_refused(args)
    if refused:
        return _usage_error("sample", refused)
    request = SampleRequest(
        output=args.output,
        prompts=args.prompts,
        indices=args.indices,
        synthetic_prompts=args.synthetic_prompts,
        num_samples=args.num_samples,
        resolution=args.resolution,
        seed=args.seed,
        batch_size=args.batch_size,
        vae=args.vae,
        vae_dtype=args.vae_dtype,
        fps=args.fps,
        overwrite=args.overwrite,
    )

    def draw():
        if args.teacher:
            from phased_dmd_mega.teacher_sampling import teacher_samplers

            steps = args.steps or TEACHER_STEPS
            samplers = teacher_samplers(args.checkpoint, steps, args.guidance, overrides=args.overrides)
        elif args.checkpoint:
            samplers = Samplers.from_checkpoint(args.checkpoint, ema=args.ema, overrides=args.overrides)
        else:
            samplers = Samplers.from_export(args.exported, args.dtype, args.attention_backend)
        return sample_to_folder(samplers, request)

    return _with_models("sample", draw, args.tp, args.ulysses, args.sequence_parallel, args.seed)


def _teacher_options_refused(args: argparse.Namespace) -> Optional[str]:
    """Why the teacher's options do not go with the others (None when they do)."""
    if not args.teacher:
        given = [name for name in ("steps", "guidance") if getattr(args, name) is not None]
        if given:
            return f"--{given[0]} sets the teacher's sampler: add --teacher (the generators' steps are their phases')"
        return None
    if args.exported:
        return "--teacher samples the teacher of a training run: give --checkpoint (an export records no teacher)"
    if args.ema:
        return "--ema picks the generators' EMA copies; --teacher samples the teacher"
    if args.guidance is not None and args.guidance < 0:
        return f"--guidance must be >= 0, got {args.guidance:g}"
    return None


def _with_models(command: str, work: Callable[[], object], *parallel_sizes) -> int:
    """Run ``work`` inside a parallel state (``parallel_sizes``: initialize's arguments); print
    what it returns (the folder written), or report bad input (a checkpoint, a configuration or a
    file that is not what the options say) with exit status 2. Any other error is the command
    failing: ``main`` reports a ValueError in one line with exit status 1."""
    from phased_dmd_mega import parallel
    from phased_dmd_mega.errors import RequestError
    from phased_dmd_mega.log import setup_logging
    from phased_dmd_mega.models.architecture_types import CheckpointError

    setup_logging()
    parallel.initialize(*parallel_sizes)
    try:
        result = work()
    except (RequestError, CheckpointError, ConfigError, FileNotFoundError) as err:
        return _usage_error(command, str(err))
    finally:
        parallel.destroy()
    print(result)
    return 0


def _usage_error(command: str, message: str) -> int:
    print(f"phased-dmd {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


@dataclass(frozen=True)
class Command:
    """One subcommand: its name and help, what adds its arguments, and what runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    Command("train", "distill a teacher into a few-step generator with Phased DMD", _add_config_arguments, _run_train),
    Command(
        "sample",
        "few-step sampling with distilled experts (or the teacher's reference samples)",
        _add_sample_arguments,
        _run_sample,
    ),
    Command(
        "convert",
        "convert weights between Hugging Face formats and the trainer's own",
        _add_convert_arguments,
        _run_convert,
    ),
    Command("export", "export distilled experts and LoRAs to Hugging Face formats", _add_export_arguments, _run_export),
    Command("encode-prompts", "encode prompts into a prompt-embedding cache", _add_encode_arguments, _run_encode),
    Command(
        "evaluate",
        "diversity and motion of sample folders (DINO, LPIPS, optical flow, model-free statistics)",
        add_evaluate_arguments,
        _run_evaluate,
    ),
)
_BY_NAME = {command.name: command for command in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phased-dmd", description="Phased DMD distillation of Wan 2.x and Qwen-Image on megatron-core."
    )
    parser.add_argument("--version", action="version", version=f"phased-dmd-mega {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_arguments(subparsers.add_parser(command.name, help=command.help, description=command.help))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _BY_NAME[args.command].run(args)
    except ConfigError as err:
        print(f"phased-dmd {args.command}: configuration error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as err:  # the command itself failed (our own error classes are ValueErrors)
        print(f"phased-dmd {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
