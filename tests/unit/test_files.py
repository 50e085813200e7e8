"""files.py: atomic file writes, JSON with errors naming the file, and publishing a staged folder."""

from __future__ import annotations

import json

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
