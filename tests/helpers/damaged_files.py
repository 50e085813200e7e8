"""Damaged safetensors files and writes that fail partway, and the checks that a command
handled them cleanly.

A real file is rewritten with fewer bytes (truncated) or with its JSON header broken (same
length); a command reading it must fail with exit status 1 and one ``error:`` line naming the
file, no traceback, and leave nothing at its destination (no staging folder either). A writer
made to fail after its first file (``failing_after``) must leave no destination, no staging
folder, and an existing destination it was replacing as it was."""

import os
import re
from pathlib import Path

DAMAGES = ("truncated", "corrupt_header")


def truncate(path: Path, drop: int = 100) -> Path:
    """Rewrite ``path`` without its last ``drop`` bytes (the end of its last tensor)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-drop])
    return Path(path)


def corrupt_header(path: Path) -> Path:
    """Rewrite ``path`` with its JSON header no longer JSON (same length: only the header is bad)."""
    data = bytearray(Path(path).read_bytes())
    assert data[8:9] == b"{", "a safetensors header starts with '{'"
    data[9] = ord("!")  # {"__metadata__": ... -> {!__metadata__": ...
    Path(path).write_bytes(bytes(data))
    return Path(path)


def damage(path: Path, how: str) -> Path:
    return truncate(path) if how == "truncated" else corrupt_header(path)


DAMAGE_MESSAGES = {
    "truncated": r"is not a readable safetensors file: truncated: \d+ bytes of the \d+ its header describes; "
    r"tensor '[^']+'( \(and \d+ more\))? is cut off",
    "corrupt_header": r"is not a readable safetensors file: its header is not valid JSON",
}


def last_file(folder: Path) -> Path:
    """The folder's last safetensors file (in name order)."""
    return sorted(Path(folder).glob("*.safetensors"))[-1]


def assert_nothing_left(dst: Path) -> None:
    """No destination, and no hidden staging sibling (``.NAME.partial-*``, ``.NAME.old-*``)."""
    assert not Path(dst).exists(), dst
    assert_no_staging(dst)


def assert_failed_on(status: int, err: str, file: Path, message: str = "") -> str:
    """Exit status 1, one ``error:`` line naming ``file`` (and matching ``message``), no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if re.match(r"phased-dmd [\w -]+: error: ", line)]
    assert status == 1 and len(errors) == 1, (status, err)
    assert str(file) in errors[0], errors[0]
    assert re.search(message, errors[0]), (message, errors[0])
    return errors[0]


# ----------------------------------------------------------------------------- writes that fail partway


class WriteFailed(OSError):
    """The injected failure of a write (as a full disk would fail it)."""


def failing_after(real, calls: int):
    """``real``, which raises WriteFailed on call ``calls + 1`` (and after); the first path among
    the arguments of each call that went through is kept in ``.done`` (the file or folder it wrote)."""

    def write(*args, **kwargs):
        if len(write.done) >= calls:
            raise WriteFailed(28, "No space left on device (injected)")
        result = real(*args, **kwargs)
        write.done.append(next((Path(a) for a in args if isinstance(a, (str, os.PathLike))), None))
        return result

    write.done = []
    return write


def folder_contents(folder: Path) -> dict:
    """Every file below ``folder``: relative path -> bytes."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_no_staging(dst: Path) -> None:
    """No hidden sibling of ``dst`` left (``.NAME.partial-*``, ``.NAME.old-*``)."""
    dst = Path(dst)
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def written_in_staging(done, dst: Path) -> bool:
    """Whether the writes that went through before the failure were inside ``dst``'s staging folder."""
    return bool(done) and all(f".{Path(dst).name}.partial-" in str(path) for path in done)


def assert_left_as_before(dst: Path, before) -> None:
    """After a failed write: ``dst`` as it was (``before``: its ``folder_contents``, or None when
    there was none), and no staging folder beside it."""
    if before is None:
        assert_nothing_left(dst)
    else:
        assert folder_contents(dst) == before
        assert_no_staging(dst)
