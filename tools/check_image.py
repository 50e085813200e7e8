#!/usr/bin/env python
"""The Docker image's build-time check (the Dockerfile runs it after installing the package).

    python tools/check_image.py                        # requirements, then Transformer Engine with megatron-core
    python tools/check_image.py --requirements-only    # a build without a GPU whose TE needs the driver to import

1. Every requirement of the installed phased-dmd-mega (install_requires and the `sample` extra)
   is installed at a version inside setup.py's range: the base image's own torch, triton, numpy,
   ... included, which the Dockerfile does not pin.
2. Transformer Engine imports, and megatron-core imports it: megatron.core.extensions.
   transformer_engine finds it (HAVE_TE) and its TE linear and attention layers exist, the ones
   model.transformer_impl=transformer_engine builds. An incompatible pair fails the build.

Prints the versions; exit status 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from typing import List, Optional

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

PROJECT = "phased-dmd-mega"
EXTRAS = ("sample",)  # diffusers' VAEs: encode-prompts --vae, sample --vae, decoded periodic samples
ALIASES = {"triton": ["pytorch-triton"]}  # other names a base image may install a requirement under


def project_requirements() -> List[Requirement]:
    try:
        lines = metadata.requires(PROJECT) or []
    except metadata.PackageNotFoundError:
        raise SystemExit(f"check_image.py: {PROJECT} is not installed (pip install --no-deps . first)") from None
    wanted = []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in EXTRAS):
            wanted.append(requirement)
    return wanted


def installed_version(names: List[str]) -> Optional[str]:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def requirement_problems(requirements: List[Requirement]) -> List[str]:
    problems = []
    for requirement in requirements:
        installed = installed_version([requirement.name] + ALIASES.get(requirement.name, []))
        if installed is None:
            problems.append(f"{requirement.name}: not installed (setup.py needs {requirement})")
            continue
        try:
            # NGC's builds are pre-releases (torch 2.9.0a0+...): inside the range all the same.
            inside = requirement.specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            inside = False
        print(f"{requirement.name} {installed}  (setup.py: {requirement.specifier})")
        if not inside:
            problems.append(f"{requirement.name} {installed} is outside setup.py's range {requirement.specifier}")
    return problems


def transformer_engine_problems() -> List[str]:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # ImportError, or OSError from its CUDA libraries
        return [f"transformer_engine does not import ({type(err).__name__}: {err})"]
    try:
        import megatron.core
        from megatron.core.extensions import transformer_engine as mcore_te
        from megatron.core.utils import get_te_version
    except Exception as err:
        return [f"megatron.core.extensions.transformer_engine does not import ({type(err).__name__}: {err})"]
    if not mcore_te.HAVE_TE:
        return ["megatron-core does not see Transformer Engine (HAVE_TE is False)"]
    missing = [
        name
        for name in ("TEColumnParallelLinear", "TERowParallelLinear", "TEDotProductAttention")
        if not hasattr(mcore_te, name)
    ]
    print(f"Transformer Engine {get_te_version()} with megatron-core {megatron.core.__version__}")
    return [f"megatron-core lacks {name}" for name in missing]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requirements-only",
        action="store_true",
        help="check the requirements' versions only, not Transformer Engine with megatron-core",
    )
    args = parser.parse_args(argv)
    problems = requirement_problems(project_requirements())
    if not args.requirements_only:
        problems += transformer_engine_problems()
    for problem in problems:
        print(f"check_image.py: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
