"""The folder of a run's checkpoints: which are there, which is current, which can be read.

A folder (``checkpoint.dir``) holds published checkpoints ``iter_NNNNNNN/`` and ``latest``
(``{"checkpoint": "iter_NNNNNNN"}``), the one to resume from. Each checkpoint carries
``manifest.json``: every file's size, written last before it is published, so that a
checkpoint damaged later (a truncated or missing file) is told from an intact one without
reading its tensors.

- Resuming (``checkpoint_to_resume``) takes what ``latest`` names; when ``latest`` is torn or
  names a damaged checkpoint, the newest intact one, with a warning naming what was skipped;
  when none is intact, a refusal listing each and why.
- Pruning (``prune``) after publishing iteration N deletes only checkpoints older than N.
- A fresh start (``checkpoint.resume=none``) in a folder that holds checkpoints is refused
  (``check_fresh_start``), or with ``checkpoint.on_existing=move_aside`` they are moved into
  ``superseded-<time>/`` first: a new run never prunes or overwrites another run's checkpoints.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import List, Optional, Tuple

from phased_dmd_mega.files import fsync_dir, read_json, write_json, write_text_atomically
from phased_dmd_mega.log import get_logger

log = get_logger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"
DIST_METADATA = "metadata.json"  # megatron dist_checkpointing's own, in every checkpoint
_NAME = re.compile(r"^iter_(\d{7,})$")
_STAGING = re.compile(r"^\.iter_\d{7,}\.tmp$")


class CheckpointFolderError(ValueError):
    """No checkpoint of the folder can be resumed from, or the folder is not fit to start in."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(path: Path) -> Optional[int]:
    match = _NAME.match(Path(path).name)
    return int(match[1]) if match else None


def published(root) -> List[Path]:
    """The checkpoints in ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and iteration_of(p) is not None]
    return sorted(found, key=iteration_of)


# ----------------------------------------------------------------------------- intact or not


def write_manifest(folder: Path) -> None:
    """Every file of the (staged) checkpoint with its size, the manifest itself excepted."""
    sizes = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    write_json(Path(folder) / MANIFEST, {"files": sizes})


def damage(path: Path) -> Optional[str]:
    """Why the checkpoint ``path`` cannot be read (None: it is intact as far as sizes tell)."""
    path = Path(path)
    if not path.is_dir():
        return "it does not exist"
    manifest = path / MANIFEST
    if not manifest.is_file():
        # Written before checkpoints had a manifest: the tensors' own index must be there at least.
        return None if (path / DIST_METADATA).is_file() else f"it has neither {MANIFEST} nor {DIST_METADATA}"
    try:
        sizes = read_json(manifest)["files"]
    except (ValueError, KeyError) as err:
        return f"its {MANIFEST} is unreadable ({err})"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


# ----------------------------------------------------------------------------- latest


def write_latest(root: Path, name: str) -> None:
    write_text_atomically(Path(root) / LATEST, f'{{"checkpoint": "{name}"}}')


def _named_by_latest(root: Path) -> Tuple[Optional[Path], Optional[str]]:
    """The checkpoint ``latest`` names, or why it names none."""
    pointer = root / LATEST
    try:
        name = read_json(pointer)["checkpoint"]
    except (ValueError, KeyError, TypeError) as err:
        return None, f"{pointer} is unreadable ({err})"
    if not isinstance(name, str) or _NAME.match(name) is None:
        return None, f"{pointer} names {name!r}, not a checkpoint"
    return root / name, None


def checkpoint_to_resume(root) -> Optional[Path]:
    """The checkpoint a run in ``root`` resumes from; None when there is none yet."""
    root = Path(root)
    candidates = published(root)[::-1]  # newest first
    if not (root / LATEST).exists():
        if not candidates:
            return None
        skipped = [f"{root / LATEST} is missing"]
    else:
        named, problem = _named_by_latest(root)
        skipped = [] if problem is None else [problem]
        if named is not None:
            reason = damage(named)
            if reason is None:
                return named
            skipped.append(f"{named.name}, which {root / LATEST} names: {reason}")
            candidates = [p for p in candidates if p != named]
    for path in candidates:
        reason = damage(path)
        if reason is None:
            log.warning("resuming from %s, the newest intact checkpoint; skipped: %s", path, "; ".join(skipped))
            return path
        skipped.append(f"{path.name}: {reason}")
    raise CheckpointFolderError(f"no intact checkpoint in {root} to resume from: " + "; ".join(skipped))


# ----------------------------------------------------------------------------- housekeeping


def prune(root, newest: int, keep_last: int) -> List[Path]:
    """Keep the checkpoint of iteration ``newest`` and the ``keep_last - 1`` before it; delete
    older ones. Later iterations are never touched."""
    older = [p for p in published(root) if iteration_of(p) < newest]
    doomed = older[: max(0, len(older) - (keep_last - 1))]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def sweep_staging(root) -> List[Path]:
    """Remove every half-written checkpoint (``.iter_N.tmp``): the caller holds the folder's lock,
    so none of them is being written."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if _STAGING.match(p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        log.warning("removed %d unfinished checkpoint save(s) in %s: %s", len(stale), root, _names(stale))
    return stale


def _names(paths) -> str:
    return ", ".join(p.name for p in paths)


def check_fresh_start(root, on_existing: str, why: str = "checkpoint.resume=none") -> Optional[Path]:
    """Before a run that does not resume writes into ``root``: refuse when it holds checkpoints
    (``on_existing="refuse"``), or move them and ``latest`` into ``root/superseded-<time>/``
    (``"move_aside"``, returned)."""
    root = Path(root)
    found = published(root)
    pointer = root / LATEST
    if not found and not pointer.exists():
        return None
    held = _names(found) or "no checkpoint"
    if pointer.exists():
        named, problem = _named_by_latest(root)
        held += f"; latest -> {named.name}" if named is not None else f"; {problem}"
    if on_existing != "move_aside":
        raise CheckpointFolderError(
            f"{why}, but {root} already holds {held}: a new run there would prune or overwrite "
            "them. Resume them (checkpoint.resume=auto), use another checkpoint.dir, or pass "
            "checkpoint.on_existing=move_aside to move them into a superseded-<time>/ subfolder"
        )
    aside = root / time.strftime("superseded-%Y%m%d-%H%M%S", time.gmtime())
    aside.mkdir()
    for path in [*found, pointer] if pointer.exists() else found:
        os.rename(path, aside / path.name)
    fsync_dir(root)
    log.warning("checkpoint.on_existing=move_aside: moved %s from %s into %s", held, root, aside)
    return aside
