"""metrics.jsonl and the atomic writes under a kill or a full volume: never half a row, never
a half file, no temp files left."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from job.atomic import write_json_atomic
from job.metrics import MetricsWriter, retire_summary


def test_a_row_torn_by_a_kill_is_dropped_when_the_next_run_opens_the_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 1}\n{"event": "train", "st')
    writer = MetricsWriter(path)
    writer.write("resumed", step=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in rows] == ["train", "resumed"]


def test_a_failed_append_is_cut_back_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write("start")
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:  # what a volume that fills mid-row does
        return real_write(fd, data[:7])

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError) as err:
        writer.write("train", step=1, loss=0.5)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    writer.write("end")
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["start", "end"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"status": "succeeded"})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_json_atomic(target, {"status": "failed"})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"status": "succeeded"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_starting_run_retires_the_last_summary(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "summary.json", {"status": "succeeded"})
    retire_summary(tmp_path)
    assert not (tmp_path / "summary.json").exists()
    assert json.loads((tmp_path / "summary.previous.json").read_text()) == {"status": "succeeded"}
    retire_summary(tmp_path)  # nothing to retire: no error
