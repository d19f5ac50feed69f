"""Checkpoints exist complete or not at all; resume takes the newest that verifies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from job.errors import DiskFullError
from job.train.checkpoint import CheckpointManager


def write(content: bytes):
    def files(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(content)
    return files


def test_save_lists_and_prunes(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, total_limit=2)
    for step in (5, 10, 15):
        manager.save(step, write(b"x" * step))
    assert [c.step for c in manager.complete()] == [10, 15]
    assert manager.latest().path.name == "step-000015"


def test_interrupted_write_leaves_no_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(1, write(b"good"))

    def crash(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(DiskFullError, match="previous checkpoint .* is intact"):
        manager.save(2, crash)
    assert manager.latest().step == 1
    assert not list(tmp_path.glob(".tmp-*"))


def test_corrupt_or_unfinished_checkpoints_are_skipped(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(1, write(b"one"))
    manager.save(2, write(b"two"))
    (tmp_path / "step-000002" / "weights.bin").write_bytes(b"tw0")
    (tmp_path / "step-000003").mkdir()  # a folder without a manifest
    assert manager.problem(tmp_path / "step-000002") == "weights.bin checksum differs from the manifest"
    assert manager.problem(tmp_path / "step-000003").startswith("no manifest")
    assert manager.latest().step == 1


def test_identity_is_recorded(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    checkpoint = manager.save(4, write(b"w"), {"job_name": "a"})
    assert manager.identity(checkpoint) == {"job_name": "a"}


def test_files_in_subfolders_are_listed_and_verified(tmp_path: Path) -> None:
    def sharded(folder: Path) -> None:
        (folder / "dcp").mkdir()
        for rank in (0, 1):
            (folder / "dcp" / f"__{rank}_0.distcp").write_bytes(b"shard %d" % rank)

    manager = CheckpointManager(tmp_path)
    checkpoint = manager.save(1, sharded)
    assert manager.problem(checkpoint.path) is None
    (checkpoint.path / "dcp" / "__1_0.distcp").write_bytes(b"shard 2")
    assert manager.problem(checkpoint.path) == "dcp/__1_0.distcp checksum differs from the manifest"
    (checkpoint.path / "dcp" / "__1_0.distcp").unlink()
    assert manager.problem(checkpoint.path) == "dcp/__1_0.distcp is missing"


def test_a_resumed_run_never_prunes_its_own_checkpoints_for_an_abandoned_later_one(
        tmp_path: Path) -> None:
    """A run that diverged at step 400 is resumed from step 300 by path: the new 325 and 350
    must survive total_limit = 1, and "latest" must be 350, not the abandoned 400."""
    manager = CheckpointManager(tmp_path, total_limit=2)
    for step in (300, 400):
        manager.save(step, write(b"first attempt %d" % step))
    moved = manager.set_aside_later_than(300)
    assert [p.name for p in moved] == ["step-000400"]
    assert moved[0].parent.parent == tmp_path and moved[0].parent.name.startswith("superseded-")
    assert (moved[0] / "weights.bin").read_bytes() == b"first attempt 400"  # kept, not lost
    manager.total_limit = 1
    for step in (325, 350):
        saved = manager.save(step, write(b"second attempt %d" % step))
        assert saved.path.is_dir()
    assert [c.step for c in manager.complete()] == [350]
    assert manager.latest().step == 350
    assert (moved[0] / "weights.bin").is_file()  # prune never looks there


def test_a_fresh_start_sets_every_earlier_checkpoint_aside(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(100, write(b"old run"))
    assert [p.name for p in manager.set_aside_later_than(0)] == ["step-000100"]
    assert manager.latest() is None
    assert manager.set_aside_later_than(0) == []  # nothing left to move


def test_a_replaced_checkpoint_killed_mid_swap_is_restored(tmp_path: Path) -> None:
    """_complete renames an existing checkpoint of the same step aside before the new one
    goes in: a kill between the two renames must not lose it."""
    manager = CheckpointManager(tmp_path)
    manager.save(7, write(b"first"))
    (tmp_path / "step-000007").rename(tmp_path / ".step-000007.replaced-host-1-0123abcd")
    assert manager.latest().step == 7  # listed again, restored
    assert manager.problem(tmp_path / "step-000007") is None
    # A finished replacement: the copy aside is dropped, the new one stays.
    manager.save(7, write(b"second"))
    assert (tmp_path / "step-000007" / "weights.bin").read_bytes() == b"second"
    assert not list(tmp_path.glob(".step-*.replaced-*"))
    # Killed after the new one went in, before the old copy was removed: the copy goes.
    shutil.copytree(tmp_path / "step-000007", tmp_path / ".step-000007.replaced-host-1-4567cdef")
    (tmp_path / ".step-000007.replaced-host-1-4567cdef" / "weights.bin").write_bytes(b"first")
    assert manager.latest().step == 7
    assert (tmp_path / "step-000007" / "weights.bin").read_bytes() == b"second"
    assert not list(tmp_path.glob(".step-*.replaced-*"))


def test_only_the_latest_superseded_set_is_kept(tmp_path: Path) -> None:
    """Restarts from one checkpoint must not pile abandoned sets up on the disk."""
    manager = CheckpointManager(tmp_path)
    for step in (10, 20):
        manager.save(step, write(b"a"))
    [first] = {p.parent for p in manager.set_aside_later_than(10)}
    manager.save(20, write(b"b"))
    [second] = {p.parent for p in manager.set_aside_later_than(10)}
    assert not first.exists() and (second / "step-000020" / "weights.bin").read_bytes() == b"b"
    assert [c.step for c in manager.complete()] == [10]


def test_a_killed_writes_temp_folder_is_pruned_even_with_this_processs_pid(
        tmp_path: Path) -> None:
    """A container restart usually reuses the PID of the process that was killed."""
    import os

    manager = CheckpointManager(tmp_path)
    left = tmp_path / f".tmp-step-000004-{os.getpid()}"
    left.mkdir(parents=True)
    (left / "weights.bin").write_bytes(b"half")
    manager.save(5, write(b"five"))
    assert not left.exists()


def test_a_full_disk_is_recognised_whatever_the_writer_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors raises SafetensorError and torch.save a RuntimeError at ENOSPC: with the
    volume (nearly) full, either is a full disk, said with the sizes."""
    import shutil
    from collections import namedtuple

    manager = CheckpointManager(tmp_path)
    manager.save(1, write(b"good"))
    usage = namedtuple("usage", "total used free")

    def torch_save_at_enospc(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"half")
        monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 4096, 4096))
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    with pytest.raises(DiskFullError, match="disk full while writing checkpoint step 2"):
        manager.save(2, torch_save_at_enospc)
    monkeypatch.undo()
    assert manager.latest().step == 1 and not list(tmp_path.glob(".tmp-*"))
    # The same error with space free is not a full disk: it stays what it was.
    with pytest.raises(RuntimeError, match="file write failed"):
        manager.save(3, lambda folder: (_ for _ in ()).throw(RuntimeError("file write failed")))


def test_disk_was_full_reads_the_chain_and_the_text() -> None:
    from job.errors import Preempted, disk_was_full

    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as err:
        assert disk_was_full(err)
    assert disk_was_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: "
                                      "StorageFull, message: \"No space left on device\" })"))
    assert not disk_was_full(RuntimeError("CUDA out of memory"))
    assert not disk_was_full(Preempted("stopped"), Path("/"))


def test_only_a_writes_error_counts_as_a_full_disk_by_free_space(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil as shutil_module
    from collections import namedtuple

    from job.errors import disk_was_full

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda _: usage(10**9, 10**9 - 4096, 4096))
    assert disk_was_full(RuntimeError("PytorchStreamWriter failed writing file data/0"), tmp_path)
    assert not disk_was_full(RuntimeError("CUDA out of memory while writing"), tmp_path)
    assert not disk_was_full(ValueError("a bug in the loss"), tmp_path)
    # A second Ctrl-C cutting a write short is not a full disk, however little is free.
    from job.signals import ForcedStop

    try:
        try:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0")
        except RuntimeError:
            raise ForcedStop("stopped at once by a second SIGINT")
    except ForcedStop as err:
        assert not disk_was_full(err, tmp_path)
