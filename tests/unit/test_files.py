"""files.py: atomic file writes, JSON with errors naming the file, and publishing a staged folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from phased_dmd_mega import files


class WriterFailed(RuntimeError):
    pass


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")

    def half_write(tmp):
        tmp.write_text("new, but not all of it")
        raise WriterFailed

    with pytest.raises(WriterFailed):
        files.write_atomically(path, half_write)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "state.txt"
    path.write_text("old")
    files.write_text_atomically(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.txt"]


def test_json_round_trip(tmp_path):
    path = tmp_path / "config.json"
    files.write_json(path, {"a": [1, 2], "b": {"c": "d"}})
    assert path.read_text() == json.dumps({"a": [1, 2], "b": {"c": "d"}}, indent=2) + "\n"
    assert files.read_json(path) == {"a": [1, 2], "b": {"c": "d"}}


@pytest.mark.parametrize(
    "text, message",
    [(None, "is missing"), ('{"a": 1', "is not valid JSON"), ("[1, 2]", "must hold a JSON object")],
)
def test_json_read_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "broken.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}.* {message}"):
        files.read_json(path)


def test_json_read_raises_the_callers_error(tmp_path):
    class MyError(Exception):
        pass

    (tmp_path / "broken.json").write_text("not json")
    with pytest.raises(MyError, match="broken.json is not valid JSON"):
        files.read_json(tmp_path / "broken.json", MyError)


def test_publish_replaces_an_existing_folder_and_leaves_no_staging(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with files.staging_folder(dst, overwrite=True) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.partial-")
        assert (dst / "old.txt").is_file()  # the old folder stays until the new one is complete
        (staging / "new.txt").write_text("new")
    assert [p.name for p in dst.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .partial-/.old- folders


def test_publish_failure_leaves_no_destination(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(WriterFailed), files.staging_folder(dst, overwrite=False) as staging:
        (staging / "half.txt").write_text("x")
        raise WriterFailed
    assert list(tmp_path.iterdir()) == []


def test_publish_refuses_a_destination_that_appeared(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match="appeared during the conversion"), files.staging_folder(dst, False):
        dst.mkdir()
        (dst / "theirs.txt").write_text("theirs")
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_destination_checks(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    files.check_destination(src, dst, overwrite=False)  # absent: fine
    with pytest.raises(ValueError, match="overlaps the source"):
        files.check_destination(src, src / "inside", overwrite=True)
    dst.mkdir()
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        files.check_destination(src, dst, overwrite=False)
    files.check_destination(src, dst, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        files.check_destination(src, tmp_path / "file", overwrite=True)


def test_a_component_is_its_own_folder_or_a_pipeline_roots_subfolder(tmp_path):
    own = tmp_path / "vae_only"
    own.mkdir()
    (own / "config.json").write_text("{}")
    root = tmp_path / "pipeline"
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text("{}")
    (root / "config.json").write_text("{}")  # a root's own config must not shadow its vae/
    assert files.component_folder(own, "vae") == own
    assert files.component_folder(root, "vae") == root / "vae"
    assert files.component_folder(tmp_path, "vae") is None


# ----------------------------------------------------------------------------- durability


@pytest.fixture
def disk_events(monkeypatch):
    """What reached the disk, in order: ("fsync", path) and ("rename", src name, dst name)."""
    events = []
    fsync, replace, rename = files.os.fsync, files.os.replace, files.Path.rename

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("rename", os.path.basename(src), os.path.basename(dst)))
        replace(src, dst)

    def recording_rename(self, target):
        events.append(("rename", self.name, os.path.basename(target)))
        return rename(self, target)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    monkeypatch.setattr(files.os, "replace", recording_replace)
    monkeypatch.setattr(files.Path, "rename", recording_rename)
    return events


def test_an_atomic_write_reaches_the_disk_before_and_after_its_rename(tmp_path, disk_events):
    files.write_text_atomically(tmp_path / "latest", "new")
    (rename,) = [e for e in disk_events if e[0] == "rename"]
    tmp_name = rename[1]
    assert rename[2] == "latest" and tmp_name.startswith(".latest.tmp-")
    at = disk_events.index(rename)
    assert ("fsync", str(tmp_path / tmp_name)) in disk_events[:at]  # the contents, before the rename
    assert ("fsync", str(tmp_path)) in disk_events[at:]  # the folder's entry, after it


def test_a_published_folder_reaches_the_disk_file_by_file_before_its_rename(tmp_path, disk_events):
    dst = tmp_path / "out"
    with files.staging_folder(dst, overwrite=False) as staging:
        (staging / "sub").mkdir()
        (staging / "a.bin").write_bytes(b"a")
        (staging / "sub" / "b.bin").write_bytes(b"b")
    (rename,) = [e for e in disk_events if e[0] == "rename"]
    at = disk_events.index(rename)
    before = {e[1] for e in disk_events[:at] if e[0] == "fsync"}
    assert {str(staging / "a.bin"), str(staging / "sub" / "b.bin"), str(staging / "sub"), str(staging)} <= before
    assert ("fsync", str(tmp_path)) in disk_events[at:]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_debris_of_a_killed_writer_is_swept_by_the_next_writer_of_that_name(tmp_path):
    dead, host = _dead_pid(), files.HOST
    (tmp_path / f".out.partial-{host}-{dead}").mkdir()  # a killed conversion's staging folder
    (tmp_path / f".out.old-{host}-{dead}").mkdir()  # killed while replacing
    (tmp_path / f".out.partial-{dead}").mkdir()  # an older version's name, without the host
    live = tmp_path / f".out.partial-{host}-{os.getpid()}-x"  # not a staging name: kept
    live.mkdir()
    running = tmp_path / f".out.partial-{host}-{os.getppid()}"  # a live writer's: kept
    running.mkdir()
    remote = tmp_path / f".out.partial-elsewhere-{dead}"  # another host's: kept
    remote.mkdir()
    other = tmp_path / f".other.partial-{host}-{dead}"  # another destination's: kept
    other.mkdir()
    (tmp_path / f".index.json.tmp-{host}-{dead}").write_text("half")
    with files.staging_folder(tmp_path / "out", overwrite=False) as staging:
        (staging / "x").write_text("x")
    files.write_text_atomically(tmp_path / "index.json", "{}")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", "index.json", live.name, running.name, remote.name, other.name])
