"""One run per folder: a lock file that names its holder, and that a dead holder does not keep.

``FolderLock(folder).acquire()`` creates ``folder/.lock`` holding the holder's host, pid, start
time and command line, or refuses with ``FolderLockedError`` naming them when another live run
holds it. The holder refreshes the file's modification time every ``HEARTBEAT_SECONDS`` from a
background thread, so a lock is stale when its process is gone (same host: checked by pid) or
when it has not been refreshed for ``STALE_SECONDS`` (a holder on another host, which cannot be
asked). A stale lock is taken over with a warning. The file is created complete in one step
(written aside, then hard-linked into place), so no reader ever sees half of one.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

from phased_dmd_mega.files import HOST, process_alive, staging_path
from phased_dmd_mega.log import get_logger

log = get_logger(__name__)

LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # ten missed heartbeats


class FolderLockedError(ValueError):
    """Another live run holds the folder's lock."""


def read_holder(path: Path) -> Optional[Dict[str, Any]]:
    """The lock's holder, or None when the file is gone or unreadable."""
    try:
        holder = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def stale_reason(path: Path, holder: Optional[Dict[str, Any]], now: Optional[float] = None) -> Optional[str]:
    """Why the lock at ``path`` no longer holds (None: its holder is alive)."""
    try:
        age = (now or time.time()) - Path(path).stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    if holder is None:
        return "it is unreadable" if age > STALE_SECONDS else None
    if holder.get("host") == HOST:
        return None if process_alive(int(holder.get("pid", -1))) else f"process {holder.get('pid')} is gone"
    return f"it has not been refreshed for {age:.0f} s" if age > STALE_SECONDS else None


def describe(holder: Optional[Dict[str, Any]]) -> str:
    if holder is None:
        return "a run whose lock file is unreadable"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {started}: {holder.get('command', '?')})"


class FolderLock:
    def __init__(self, folder, what: str = "run"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._holder = {"host": HOST, "pid": os.getpid(), "started": time.time(), "command": " ".join(sys.argv)}

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self._create():
            holder = read_holder(self.path)
            reason = stale_reason(self.path, holder)
            if reason is None:
                raise FolderLockedError(
                    f"{self.folder} is in use by {describe(holder)}; wait for that {self.what} to end, or use "
                    f"another folder (if it is dead on another host, remove {self.path})"
                )
            log.warning("taking over the stale lock %s of %s: %s", self.path, describe(holder), reason)
            self._take_over()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lock {self.path}", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        """Create the lock complete in one step; False when one is there already."""
        aside = staging_path(self.path, "tmp")
        aside.write_text(json.dumps(self._holder) + "\n")
        try:
            os.link(aside, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            aside.unlink(missing_ok=True)

    def _take_over(self) -> None:
        # Moving the stale lock aside is atomic: of two runs taking it over at once, one moves
        # it and creates its own; the other then finds that one, alive.
        moved = staging_path(self.path, "old")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            pass
        moved.unlink(missing_ok=True)
        if not self._create():
            raise FolderLockedError(f"{self.folder} is in use by {describe(read_holder(self.path))}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:  # removed by hand: nothing to refresh
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = read_holder(self.path)
        if holder is not None and (holder.get("host"), holder.get("pid")) == (HOST, os.getpid()):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
