"""Writing files so that a reader never sees half of one, and reading JSON with errors that name
the file. The bottom of the package's import graph: it imports nothing of the package.

- ``write_atomically``: a file is written as a hidden sibling (``.NAME.tmpPID``) and renamed over
  the old one, so a crash or an error mid-write leaves the old file (or none) in place.
- ``write_json`` / ``read_json``: JSON objects, written atomically (indented, one final newline).
- ``component_folder``: a pipeline component given as its own folder or as a diffusers pipeline
  root holding it in a subfolder (``vae/``, ``text_encoder/``).
- ``check_destination`` / ``staging_folder``: a folder is built in a hidden sibling
  (``.NAME.partial-PID``) and published by rename at the end; an existing folder it replaces
  (with ``overwrite``) is first renamed to ``.NAME.old-PID``, then removed. A failure leaves no
  destination behind, and no staging folder.

The checks raise ``error`` (``ValueError`` unless the caller names its own, such as
``CheckpointError``), with the same messages for every command.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Type

ErrorType = Type[Exception]


# ----------------------------------------------------------------------------- one file


def component_folder(path, subfolder: str, marker: str = "config.json") -> Path | None:
    """A pipeline root's ``subfolder`` if it holds ``marker``, else ``path`` itself if it does;
    None when neither does (each caller says what it expected)."""
    root = Path(path)
    for folder in (root / subfolder, root):
        if (folder / marker).is_file():
            return folder
    return None


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the new contents to a temporary sibling of ``path``, which then
    replaces ``path`` in one rename; if ``write`` raises, the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any) -> None:
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path, error: ErrorType = ValueError) -> Dict[str, Any]:
    """The JSON object in ``path``; ``error`` naming the file when it is missing, not JSON, or
    not an object."""
    if not Path(path).is_file():
        raise error(f"{path} is missing")
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as err:
        raise error(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    return data


# ----------------------------------------------------------------------------- one folder


def check_destination(src: Path, dst: Path, overwrite: bool, error: ErrorType = ValueError) -> None:
    """Before any work: ``dst`` must not overlap ``src``, and may exist only as a folder that
    ``overwrite`` allows replacing."""
    src, dst = Path(src), Path(dst)
    source, target = src.resolve(), dst.resolve()
    if source == target or source in target.parents or target in source.parents:
        raise error(f"destination {dst} overlaps the source {src}")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise error(f"destination {dst} already exists; pass --overwrite to replace it")
        if not dst.is_dir():
            raise error(f"destination {dst} exists and is not a folder; not replacing it")


@contextmanager
def staging_folder(dst: Path, overwrite: bool, error: ErrorType = ValueError) -> Iterator[Path]:
    """A hidden folder beside ``dst``, renamed to ``dst`` on success and removed on failure."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if dst.exists() and not overwrite:  # appeared while the folder was being built
            raise error(f"destination {dst} appeared during the conversion; not replacing it")
        replace_folder(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(staging: Path, dst: Path) -> None:
    """Rename ``staging`` to ``dst``; an existing ``dst`` is moved aside first and removed after,
    so ``dst`` is never a mix of the two."""
    if not dst.exists():
        staging.rename(dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    dst.rename(old)
    staging.rename(dst)
    shutil.rmtree(old)
