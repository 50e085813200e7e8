"""Reading prompt files: .txt, .jsonl, .json and .csv rows, with their first-frame images (I2V)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from phased_dmd_mega.prompt_cache.errors import PromptEncodingError


@dataclass
class PromptRows:
    """The rows of a prompt file: their prompts, and first-frame images when the rows name them."""

    prompts: List[str]
    images: Optional[List[Path]] = None  # resolved paths (relative ones against the file's folder)
    image_names: Optional[List[str]] = None  # as written in the file (the resume fingerprint's)


def read_prompts(path, field: str = "prompt") -> List[str]:
    """Prompts from a .txt file (one per line, blank lines skipped), a .jsonl file (one object
    with ``field`` per line, or one string), a .csv file with a ``field`` column, or a .json list."""
    return read_prompt_rows(path, field).prompts


def read_prompt_rows(path, field: str = "prompt", image_field: Optional[str] = None) -> PromptRows:
    """``read_prompts``, with each row's first-frame image from ``image_field`` (an object field
    or a csv column) when given: every row names an existing image file, or none does."""
    path = Path(path)
    if not path.is_file():
        raise PromptEncodingError(f"--prompts {path} does not exist")
    readers = {".txt": _text_prompts, ".jsonl": _jsonl_prompts, ".csv": _csv_prompts, ".json": _json_prompts}
    if path.suffix.lower() not in readers:
        raise PromptEncodingError(f"--prompts {path}: unknown kind {path.suffix!r} (use .txt, .jsonl, .csv or .json)")
    try:
        items = readers[path.suffix.lower()](path, field)
    except UnicodeDecodeError as err:
        raise PromptEncodingError(f"--prompts {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not items:
        raise PromptEncodingError(f"--prompts {path} holds no prompts")
    rows = PromptRows([_prompt_of(item, where, field) for where, item in items])
    if image_field:
        names = [_image_of(item, where, image_field) for where, item in items]
        given = [name is not None for name in names]
        if any(given):
            if not all(given):
                where = items[given.index(False)][0]
                raise PromptEncodingError(
                    f"{where}: no {image_field!r} image, but other rows name one: every row "
                    "needs its first-frame image, or none"
                )
            rows.image_names = names
            rows.images = [_existing_image(path.parent / name, where) for name, (where, _) in zip(names, items)]
    return rows


def _image_of(item, where: str, field: str) -> Optional[str]:
    if not isinstance(item, dict) or item.get(field) in (None, ""):
        return None
    if not isinstance(item[field], str):
        raise PromptEncodingError(f"{where}: the {field!r} field must be an image path")
    return item[field]


def _existing_image(path: Path, where: str) -> Path:
    if not path.is_file():
        raise PromptEncodingError(f"{where}: image {path} does not exist")
    return path


def _text_prompts(path: Path, field: str) -> List[Tuple[str, object]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(f"{path} line {n}", line) for n, line in enumerate(lines, start=1) if line.strip()]


def _prompt_of(item, where: str, field: str) -> str:
    if isinstance(item, dict) and isinstance(item.get(field), str):
        return item[field]
    if isinstance(item, str):
        return item
    raise PromptEncodingError(f"{where}: expected a string or an object with a string {field!r} field")


def _jsonl_prompts(path: Path, field: str) -> List[Tuple[str, object]]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise PromptEncodingError(f"{path} line {number}: not JSON ({err.msg})") from err
    return items


def _json_prompts(path: Path, field: str) -> List[Tuple[str, object]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PromptEncodingError(f"{path} line {err.lineno}: not JSON ({err.msg})") from err
    if not isinstance(items, list):
        raise PromptEncodingError(f"{path}: expected a JSON list of prompts")
    return [(f"{path} item {i}", item) for i, item in enumerate(items)]


def _csv_prompts(path: Path, field: str) -> List[Tuple[str, object]]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if field not in (reader.fieldnames or []):
            raise PromptEncodingError(f"{path}: no {field!r} column (columns: {reader.fieldnames})")
        return [
            (f"{path} row {n}", row)
            for n, row in enumerate(reader, start=1)
            if row[field] is not None and row[field].strip()
        ]
