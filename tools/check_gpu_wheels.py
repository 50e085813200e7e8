#!/usr/bin/env python
"""Check the folder `make gpu-wheels` filled, and list it.

    python tools/check_gpu_wheels.py .gpu-wheels --expect megatron-core deepspeed ... \
        --pure deepspeed phased-dmd-mega --max-mib 60

Fails (exit status 1, one line per problem) when a file is not a wheel, an expected package is
missing or there more than once (one version of each), a package is there that was not
expected, a --pure package's wheel is not py3-none-any, a binary wheel is not for CPython 3.12
on manylinux x86_64, or the folder is larger than --max-mib. Prints the list and the total.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence

MIB = 2**20


class Wheel(NamedTuple):
    path: Path
    name: str  # canonical: lower case, runs of -_. as one -
    version: str
    python: str
    abi: str
    platform: str


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel(path: Path) -> Wheel:
    """name-version[-build]-python-abi-platform.whl (PEP 427)."""
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{path.name}: not a wheel file name (name-version-python-abi-platform.whl)")
    return Wheel(path, canonical(parts[0]), parts[1], parts[-3], parts[-2], parts[-1])


def runs_on_the_gpu_machine(wheel: Wheel) -> bool:
    """CPython 3.12 on manylinux x86_64, or pure Python."""
    if wheel.abi == "none" and wheel.platform == "any":
        return wheel.python.startswith("py3") or "cp312" in wheel.python.split(".")
    platforms = wheel.platform.split(".")
    return (
        "cp312" in wheel.python.split(".")
        and wheel.abi in ("cp312", "abi3")
        and all(p.startswith("manylinux") and p.endswith("x86_64") for p in platforms)
    )


def problems(folder: Path, expect: Sequence[str], pure: Sequence[str], max_mib: float) -> List[str]:
    found: List[str] = []
    wheels: Dict[str, List[Wheel]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if not path.name.endswith(".whl"):
            found.append(f"{path.name}: not a wheel")
            continue
        try:
            wheel = parse_wheel(path)
        except ValueError as err:
            found.append(str(err))
            continue
        wheels.setdefault(wheel.name, []).append(wheel)
        if not runs_on_the_gpu_machine(wheel):
            found.append(f"{path.name}: not for CPython 3.12 on manylinux x86_64")
    expected = {canonical(n) for n in expect}
    for name in sorted(expected - set(wheels)):
        found.append(f"{name}: missing")
    for name in sorted(set(wheels) - expected):
        found.append(f"{name}: not expected ({', '.join(w.path.name for w in wheels[name])})")
    for name, versions in sorted(wheels.items()):
        if len(versions) > 1:
            found.append(f"{name}: {len(versions)} wheels, one expected ({', '.join(w.path.name for w in versions)})")
    for name in pure:
        for wheel in wheels.get(canonical(name), []):
            if (wheel.python, wheel.abi, wheel.platform) != ("py3", "none", "any"):
                found.append(f"{wheel.path.name}: expected a pure-Python py3-none-any wheel")
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    if total > max_mib * MIB:
        found.append(f"{folder}: {total / MIB:.3g} MiB, over the {max_mib:g} MiB limit")
    return found


def listing(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    lines = [f"{p.stat().st_size / MIB:8.2f} MiB  {p.name}" for p in files]
    lines.append(f"{sum(p.stat().st_size for p in files) / MIB:8.2f} MiB  total, {len(files)} files in {folder}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the folder of wheels")
    parser.add_argument(
        "--expect", nargs="+", required=True, metavar="NAME", help="packages that must be there, once each"
    )
    parser.add_argument(
        "--pure", nargs="*", default=[], metavar="NAME", help="packages whose wheel must be py3-none-any"
    )
    parser.add_argument("--max-mib", type=float, default=60.0, help="size limit of the folder in MiB (default 60)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"check_gpu_wheels.py: {args.folder}: no such folder", file=sys.stderr)
        return 2
    print(listing(args.folder))
    found = problems(args.folder, args.expect, args.pure, args.max_mib)
    for problem in found:
        print(f"check_gpu_wheels.py: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
