"""The ``phased-dmd`` command: train | sample | convert | export | encode-prompts."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from phased_dmd_mega import __version__
from phased_dmd_mega.config import ConfigError, dump_yaml, load_config

EXIT_USAGE = 2


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
    return _unavailable("train", "the Phased DMD trainer")


def _unavailable(command: str, what: str) -> int:
    # Stated plainly rather than pretending: these subcommands are filled in as the pieces land.
    print(f"phased-dmd {command}: {what} is not available in version {__version__} yet", file=sys.stderr)
    return EXIT_USAGE


_SUBCOMMANDS: Dict[str, str] = {
    "train": "distill a teacher into a few-step generator with Phased DMD",
    "sample": "few-step sampling with distilled experts",
    "convert": "convert weights between Hugging Face formats and the trainer's own",
    "export": "export distilled experts and LoRAs to Hugging Face formats",
    "encode-prompts": "encode prompts into a prompt-embedding cache",
}

_RUNNERS: Dict[str, Callable[[argparse.Namespace], int]] = {"train": _run_train}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phased-dmd", description="Phased DMD distillation of Wan 2.x and Qwen-Image on megatron-core."
    )
    parser.add_argument("--version", action="version", version=f"phased-dmd-mega {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in _SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == "train":
            _add_config_arguments(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runner = _RUNNERS.get(args.command)
    try:
        if runner is None:
            return _unavailable(args.command, _SUBCOMMANDS[args.command])
        return runner(args)
    except ConfigError as err:
        print(f"phased-dmd {args.command}: configuration error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
