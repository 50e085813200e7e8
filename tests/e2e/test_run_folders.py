"""`phased-dmd train` and its folders, through the CLI: a fresh start over another run's
checkpoints is refused before anything loads (or moves them aside), a second run on the same
folders is refused naming the holder (a dead holder's lock is taken over), killed saves are
swept, seeds at the ends of their range work, and a resume onto another teacher is refused."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from phased_dmd_mega import cli, files

from helpers.tiny_runs import forbid_loading, save_wan_teacher, write_config


def _train(config, *overrides):
    return cli.main(["train", "--config", str(config), *overrides])


def _checkpoints(config_dir):
    return sorted(p.name for p in (config_dir / "checkpoints").glob("iter_*"))


def _earlier_run(tmp_path):
    """A finished run of two iterations: iter_0000000, iter_0000001 and latest."""
    config = write_config(tmp_path, phases={"iterations_per_phase": 1})
    assert _train(config) == 0
    return config


def test_a_fresh_start_over_another_runs_checkpoints_is_refused_before_anything_loads(tmp_path, capsys, monkeypatch):
    config = _earlier_run(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()}
    capsys.readouterr()
    forbid_loading(monkeypatch)
    assert _train(config, "checkpoint.resume=none") == 1
    err = capsys.readouterr().err
    assert f"checkpoint.resume=none, but {tmp_path / 'run' / 'checkpoints'} already holds" in err
    assert "iter_0000000, iter_0000001; latest -> iter_0000001" in err and "on_existing=move_aside" in err
    assert "Traceback" not in err
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert after == before


def test_move_aside_keeps_the_earlier_run_and_starts_afresh(tmp_path):
    config = _earlier_run(tmp_path)
    assert _train(config, "checkpoint.resume=none", "checkpoint.on_existing=move_aside") == 0
    root = tmp_path / "run" / "checkpoints"
    (aside,) = root.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["iter_0000000", "iter_0000001", "latest"]
    assert _checkpoints(tmp_path / "run") == ["iter_0000000", "iter_0000001"]
    assert json.loads((root / "latest").read_text()) == {"checkpoint": "iter_0000001"}


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from phased_dmd_mega.locks import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
    """
)


def test_a_second_run_on_the_same_folders_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path)
    folder = tmp_path / "run" / "checkpoints"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        forbid_loading(monkeypatch)
        assert _train(config) == 1
        err = capsys.readouterr().err
        assert f"{folder} is in use by pid {holder.pid} on {files.HOST}" in err and "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()
    assert (folder / ".lock").is_file()  # the killed holder's lock, now stale


def test_a_dead_runs_lock_is_taken_over_and_its_unfinished_save_swept(tmp_path, caplog):
    config = write_config(tmp_path, phases={"iterations_per_phase": 1})
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / ".lock").write_text(json.dumps({"host": files.HOST, "pid": dead.pid, "started": 0, "command": "x"}))
    (root / ".iter_0000007.tmp").mkdir()  # a save killed half-way
    (root / ".iter_0000007.tmp" / "__0_0.distcp").write_bytes(b"half")
    with caplog.at_level("WARNING"):
        assert _train(config) == 0
    assert f"process {dead.pid} is gone" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000000", "iter_0000001", "latest"]  # lock released


def test_seeds_at_the_top_of_their_range_train(tmp_path):
    config = write_config(tmp_path, phases={"iterations_per_phase": 1})
    assert _train(config, f"run.seed={2**31 - 1}", f"data.seed={2**31 - 1}") == 0
    assert (
        _train(
            config,
            f"run.seed={2**62 - 1}",
            f"data.seed={2**62 - 1}",
            "checkpoint.resume=none",
            "checkpoint.on_existing=move_aside",
        )
        == 0
    )


@pytest.mark.parametrize("key, value", [("run.seed", -1), ("data.seed", 2**62)])
def test_seeds_out_of_range_are_refused_naming_the_key(tmp_path, capsys, monkeypatch, key, value):
    forbid_loading(monkeypatch)
    assert _train(write_config(tmp_path), f"{key}={value}") == 2
    err = capsys.readouterr().err
    assert key in err and "must be in [0, 2**62 - 1]" in err


def test_resuming_onto_another_teacher_is_refused_before_it_loads_unless_it_moved(tmp_path, capsys, monkeypatch):
    teacher = save_wan_teacher(tmp_path / "teacher")
    other = tmp_path / "other_teacher"
    shutil.copytree(teacher, other)
    config = write_config(
        tmp_path, model={"preset": None, "teacher_path": str(teacher)}, phases={"iterations_per_phase": 1}
    )
    assert _train(config) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:
        forbid_loading(patch)
        assert _train(config, f"model.teacher_path={other}") == 2
    err = capsys.readouterr().err
    assert "model.teacher_path (checkpoint" in err and "allow_teacher_path_change=true" in err
    # Through another spelling of the same folder: no conflict.
    same = os.path.relpath(teacher)
    assert _train(config, f"model.teacher_path={same}") == 0
    assert _train(config, f"model.teacher_path={other}", "checkpoint.allow_teacher_path_change=true") == 0
