"""Writing files so that a reader never sees half of one, and reading JSON with errors that name
the file. The bottom of the package's import graph: it imports nothing of the package.

- ``write_atomically``: a file is written as a hidden sibling (``.NAME.tmp-HOST-PID``), flushed
  to disk, renamed over the old one and the rename flushed too (the folder's entry), so neither
  an error nor a crash nor a power cut leaves half a file: the old one (or none) or the new one.
- ``write_json`` / ``read_json``: JSON objects, written atomically (indented, one final newline).
- ``component_folder``: a pipeline component given as its own folder or as a diffusers pipeline
  root holding it in a subfolder (``vae/``, ``text_encoder/``).
- ``check_destination`` / ``staging_folder``: a folder is built in a hidden sibling
  (``.NAME.partial-HOST-PID``), flushed to disk file by file, and published by rename at the
  end; an existing folder it replaces (with ``overwrite``) is first renamed to
  ``.NAME.old-HOST-PID``, then removed. A failure leaves no destination behind, and no staging
  folder.
- ``sweep_debris``: what a killed writer left (its staging names say which host and process
  wrote them) is removed by the next writer of that name on the same host, once that process is
  gone.

The checks raise ``error`` (``ValueError`` unless the caller names its own, such as
``CheckpointError``), with the same messages for every command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Type

ErrorType = Type[Exception]


# ----------------------------------------------------------------------------- durability


def fsync_file(path: Path) -> None:
    """Flush ``path``'s contents to the disk (a read-only descriptor suffices on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries: a rename or a new file in it survives a power cut only then."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform without directory descriptors: nothing more can be done
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on a folder; the rename has happened
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file under ``folder``, then every folder bottom-up, flushed to the disk."""
    for parent, _, names in os.walk(folder, topdown=False):
        for name in names:
            if not os.path.islink(os.path.join(parent, name)):
                fsync_file(Path(parent, name))
        fsync_dir(Path(parent))


# ----------------------------------------------------------------------------- staging names

HOST = socket.gethostname()
# .NAME.KIND-HOST-PID; older versions wrote .NAME.tmpPID and .NAME.partial-PID (no host).
_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|partial|old)-?(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def staging_path(path: Path, kind: str) -> Path:
    """The hidden sibling of ``path`` this process writes (``kind``: tmp, partial, old)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{HOST}-{os.getpid()}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_debris(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the staging files and folders in ``folder`` (of ``name`` only, if given) whose
    writer was a process of this host that is gone; return what was removed. What another host
    or a live process is writing is left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _DEBRIS.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if match["host"] not in (None, HOST) or process_alive(int(match["pid"])):
            continue
        remove_path(entry)
        removed.append(entry)
    return removed


def remove_path(path: Path) -> None:
    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


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
    """``write(tmp)`` writes the new contents to a temporary sibling of ``path``, which is flushed
    to disk and then replaces ``path`` in one rename, itself flushed; if ``write`` raises, the
    temporary file is removed. Leftovers of a killed writer of ``path`` are removed first."""
    path = Path(path)
    sweep_debris(path.parent, path.name)
    tmp = staging_path(path, "tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
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
    """A hidden folder beside ``dst``, flushed to disk and renamed to ``dst`` on success, removed
    on failure. Leftovers of a killed writer of ``dst`` are removed first."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sweep_debris(dst.parent, dst.name)
    staging = staging_path(dst, "partial")
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
    """Flush ``staging`` to disk and rename it to ``dst``; an existing ``dst`` is moved aside first
    and removed after, so ``dst`` is never a mix of the two. The renames are flushed too."""
    staging, dst = Path(staging), Path(dst)
    fsync_tree(staging)
    if not dst.exists():
        staging.rename(dst)
        fsync_dir(dst.parent)
        return
    old = staging_path(dst, "old")
    dst.rename(old)
    staging.rename(dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old)
