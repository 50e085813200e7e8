"""Damaged safetensors files, and the checks that a command refused one cleanly.

A real file is rewritten with fewer bytes (truncated) or with its JSON header broken (same
length); a command reading it must fail with exit status 1 and one ``error:`` line naming the
file, no traceback, and leave nothing at its destination (no staging folder either)."""

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
    dst = Path(dst)
    assert not dst.exists(), dst
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def assert_failed_on(status: int, err: str, file: Path, message: str = "") -> str:
    """Exit status 1, one ``error:`` line naming ``file`` (and matching ``message``), no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if re.match(r"phased-dmd [\w -]+: error: ", line)]
    assert status == 1 and len(errors) == 1, (status, err)
    assert str(file) in errors[0], errors[0]
    assert re.search(message, errors[0]), (message, errors[0])
    return errors[0]
