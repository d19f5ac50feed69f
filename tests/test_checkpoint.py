"""Checkpoints exist complete or not at all; resume takes the newest that verifies."""

from __future__ import annotations

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
