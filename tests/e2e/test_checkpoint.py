"""Checkpoints: resume reproduces the uninterrupted run exactly, a checkpoint written at TP=2
resumes at TP=1 and at another data-parallel size, a crash during a save damages nothing, and
old checkpoints are pruned."""

import json
import shutil

import pytest
import torch

from phased_dmd_mega import checkpoint, checkpoint_folder, parallel
from phased_dmd_mega.checkpoint_folder import CheckpointFolderError
from phased_dmd_mega.testing import run_distributed

from helpers.tiny_distill import build_trainer, run_iterations

SCHEDULE = ((0, 0), (0, 1), (1, 2), (1, 3))


def roles_of(trainer):
    roles = {f"generator{k}": role for k, role in enumerate(trainer.generators)}
    roles.update({f"fake{k}": role for k, role in enumerate(trainer.fakes)})
    return roles


def _uninterrupted(tp):
    trainer, batch = build_trainer(tp)
    logs = run_iterations(trainer, batch, SCHEDULE)
    parallel.destroy()
    return logs


def _uninterrupted_from_dp1(tp):
    trainer, batch = build_trainer(tp)
    own_rank, trainer._data_parallel_rank = trainer._data_parallel_rank, 0
    logs = run_iterations(trainer, batch, SCHEDULE[:2])
    trainer._data_parallel_rank = own_rank
    logs += run_iterations(trainer, batch, SCHEDULE[2:])
    parallel.destroy()
    return logs


def _first_half_then_save(tp, root):
    trainer, batch = build_trainer(tp)
    logs = run_iterations(trainer, batch, SCHEDULE[:2])
    checkpoint.save_checkpoint(root, 1, roles_of(trainer), {"phase": 0, "note": "half"})
    parallel.destroy()
    return logs


def _resume_second_half(tp, root):
    trainer, batch = build_trainer(tp)
    metadata = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(root), roles_of(trainer))
    logs = run_iterations(trainer, batch, SCHEDULE[2:])
    parallel.destroy()
    return metadata, logs


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    reference = run_distributed(_uninterrupted, 2, 2)[0]
    first = run_distributed(_first_half_then_save, 2, 2, tmp_path)[0]
    metadata, second = run_distributed(_resume_second_half, 2, 2, tmp_path)[0]
    assert metadata == {"phase": 0, "note": "half", "iteration": 1}
    assert first + second == reference  # bit for bit: every loss and gradient norm


@pytest.mark.slow
def test_a_tp2_checkpoint_resumes_at_tp1_and_at_data_parallel_2(tmp_path):
    run_distributed(_first_half_then_save, 2, 2, tmp_path)
    for world_size in (1, 2):  # TP=1 alone, and TP=1 x DP=2
        # The reference: an uninterrupted run at the resumed layout whose first half draws
        # what the TP=2 (DP=1) run drew, i.e. every data-parallel rank draws rank 0's noise.
        references = run_distributed(_uninterrupted_from_dp1, world_size, 1)
        resumed = run_distributed(_resume_second_half, world_size, 1, tmp_path)
        for reference, (_, logs) in zip(references, resumed):
            for ref, got in zip(reference[2:], logs):
                for key in ref:
                    assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key
        if world_size == 2:
            assert resumed[0][1] != resumed[1][1]  # each data-parallel rank drew its own noise


@pytest.fixture
def one_process():
    yield build_trainer(1)
    parallel.destroy()


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(one_process, tmp_path, monkeypatch):
    trainer, batch = one_process
    roles = roles_of(trainer)
    run_iterations(trainer, batch, SCHEDULE[:1])
    saved = checkpoint.save_checkpoint(tmp_path, 1, roles, {})
    weights = {n: p.detach().clone() for n, p in trainer.generators[0].model.named_parameters()}
    run_iterations(trainer, batch, SCHEDULE[1:2])

    from megatron.core import dist_checkpointing

    def crash(state, directory, **kwargs):
        (tmp_path / ".iter_0000002.tmp" / "half-written").write_text("x")
        raise RuntimeError("node lost during save")

    monkeypatch.setattr(dist_checkpointing, "save", crash)
    with pytest.raises(RuntimeError, match="node lost"):
        checkpoint.save_checkpoint(tmp_path, 2, roles, {})
    monkeypatch.undo()
    assert checkpoint.latest_checkpoint(tmp_path) == saved
    assert not (tmp_path / "iter_0000002").exists()
    checkpoint.load_checkpoint(saved, roles)
    for name, param in trainer.generators[0].model.named_parameters():
        assert torch.equal(param, weights[name])
    checkpoint.save_checkpoint(tmp_path, 2, roles, {})  # the next save clears the debris
    assert not (tmp_path / ".iter_0000002.tmp").exists()
    assert json.loads((tmp_path / "latest").read_text()) == {"checkpoint": "iter_0000002"}


def test_only_the_last_checkpoints_are_kept(one_process, tmp_path):
    trainer, _ = one_process
    for iteration in range(1, 5):
        checkpoint.save_checkpoint(tmp_path, iteration, roles_of(trainer), {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
    assert checkpoint.latest_checkpoint(tmp_path).name == "iter_0000004"


def test_no_checkpoint_yet_and_a_dangling_pointer(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path) is None
    (tmp_path / "latest").write_text(json.dumps({"checkpoint": "iter_0000009"}))
    with pytest.raises(CheckpointFolderError, match="iter_0000009, which .*latest names: it does not exist"):
        checkpoint.latest_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- the folder


def _saved(trainer, root, iterations, keep_last=10):
    roles = roles_of(trainer)
    return [checkpoint.save_checkpoint(root, i, roles, {"phase": 0}, keep_last=keep_last) for i in iterations]


def test_pruning_after_a_save_spares_later_iterations_of_an_earlier_run(one_process, tmp_path):
    trainer, _ = one_process
    _saved(trainer, tmp_path, (10, 11, 12), keep_last=3)
    _saved(trainer, tmp_path, (0,), keep_last=3)  # a new run in the same folder
    names = sorted(p.name for p in tmp_path.glob("iter_*"))
    assert names == ["iter_0000000", "iter_0000010", "iter_0000011", "iter_0000012"]
    assert checkpoint.latest_checkpoint(tmp_path).name == "iter_0000000"
    _saved(trainer, tmp_path, (1, 2, 3), keep_last=3)
    names = sorted(p.name for p in tmp_path.glob("iter_*"))
    assert names == ["iter_0000001", "iter_0000002", "iter_0000003", "iter_0000010", "iter_0000011", "iter_0000012"]


def test_every_checkpoint_lists_its_files_and_sizes(one_process, tmp_path):
    trainer, _ = one_process
    (saved,) = _saved(trainer, tmp_path, (4,))
    sizes = json.loads((saved / checkpoint_folder.MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(saved)): p.stat().st_size for p in saved.rglob("*") if p.is_file()}
    on_disk.pop(checkpoint_folder.MANIFEST)
    assert sizes == on_disk and "metadata.json" in sizes


def _truncate_largest(folder):
    largest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    return largest


@pytest.mark.parametrize("damage", ["torn latest", "latest names a lost checkpoint", "newest truncated"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(one_process, tmp_path, caplog, damage):
    trainer, _ = one_process
    first, second, third = _saved(trainer, tmp_path, (1, 2, 3))
    if damage == "torn latest":
        (tmp_path / "latest").write_text('{"checkpoint": "iter_00')
        expected, skipped = third, "latest is unreadable"
    elif damage == "latest names a lost checkpoint":
        shutil.rmtree(third)
        expected, skipped = second, "iter_0000003, which"
    else:
        _truncate_largest(third)
        expected, skipped = second, "iter_0000003, which"
    with caplog.at_level("WARNING"):
        assert checkpoint.latest_checkpoint(tmp_path) == expected
    assert "newest intact checkpoint" in caplog.text and skipped in caplog.text
    checkpoint.load_checkpoint(expected, roles_of(trainer))  # and it loads


def test_with_no_intact_checkpoint_the_refusal_lists_each(one_process, tmp_path):
    trainer, _ = one_process
    first, second = _saved(trainer, tmp_path, (1, 2))
    _truncate_largest(second)
    (first / checkpoint_folder.MANIFEST).write_text("{")
    with pytest.raises(CheckpointFolderError) as refusal:
        checkpoint.latest_checkpoint(tmp_path)
    message = str(refusal.value)
    assert f"no intact checkpoint in {tmp_path}" in message
    assert "iter_0000002, which" in message and "bytes" in message and "iter_0000001: its manifest.json" in message
