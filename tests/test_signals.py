"""Stopping: a first SIGTERM/SIGINT stops at the next safe point; a second SIGINT, a second
or more later, stops at once (ForcedStop) with summary.json and exit 143, no checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

import job.signals as signals
from job.metrics import validate_summary
from job.run import run_job
from job.signals import ForcedStop, StopSignal
from job.train.checkpoint import CheckpointManager
from test_run import job, models_dir, rows  # noqa: F401 (fixture)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(signals.time, "monotonic", fake)
    return fake


def test_a_second_sigint_a_second_later_forces_the_stop(clock: Clock, capfd) -> None:
    stop = StopSignal(grace_s=30)
    stop._handle(signal.SIGINT, None)
    assert stop.should_stop() and stop.signal_name == "SIGINT" and not stop.forced
    said = capfd.readouterr().err
    assert "SIGINT received: stopping at the next safe point" in said
    assert "Press Ctrl-C again to stop at once" in said
    clock.now += 0.2  # the same Ctrl-C passed on by a launcher
    stop._handle(signal.SIGINT, None)
    assert not stop.forced
    clock.now += 1.0
    with pytest.raises(ForcedStop):
        stop._handle(signal.SIGINT, None)
    assert stop.forced and "SIGINT again: stopping now" in capfd.readouterr().err
    clock.now += 5
    with pytest.raises(ForcedStop):  # until the run catches one (a raise may be lost)
        stop._handle(signal.SIGINT, None)
    stop.can_force = False  # run_job caught it: unwinding, then writing summary.json
    clock.now += 5
    stop._handle(signal.SIGINT, None)
    assert stop.seconds_left() == pytest.approx(30 - 11.2)


def test_sigterm_never_forces(clock: Clock, capfd) -> None:
    """A scheduler's SIGTERM, repeated, still waits for the safe point (its kill follows
    the grace period anyway); the line it prints offers no Ctrl-C."""
    stop = StopSignal(grace_s=30)
    for _ in range(3):
        stop._handle(signal.SIGTERM, None)
        clock.now += 2
    assert stop.should_stop() and not stop.forced
    said = capfd.readouterr().err
    assert said.count("SIGTERM received") == 1 and "Ctrl-C" not in said
    with pytest.raises(ForcedStop):  # a person's Ctrl-C after the scheduler's stop
        stop._handle(signal.SIGINT, None)


def test_a_second_ctrl_c_cuts_a_long_step_short(tmp_path: Path, models_dir: Path,  # noqa: F811
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 5 takes a minute (as a first step that compiles can): the first SIGINT waits
    for it, the second ends the run within seconds, preempted with exit 143 and the step-3
    checkpoint as the last; the next run resumes from it and finishes."""
    from job.train.loop import Trainer

    original = Trainer.train_step

    def long_step_5(self):
        if self.state.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)  # cut short by the second signal
        return original(self)

    cfg = job(tmp_path, models_dir)
    monkeypatch.setattr(Trainer, "train_step", long_step_5)
    started = time.monotonic()
    assert run_job(cfg) == 143
    assert time.monotonic() - started < 45
    out = Path(cfg.output_path())
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "preempted" and summary["steps_done"] == 4
    assert any("second SIGINT after step 4" in note and "step-000003" in note
               for note in summary["notes"])
    manager = CheckpointManager(out / "checkpoints")
    assert [c.step for c in manager.complete()] == [3]
    # No ForcedStop left the run, and the handlers are back to the test's.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    monkeypatch.setattr(Trainer, "train_step", original)
    assert run_job(cfg) == 0
    assert rows(out, "resumed")[-1]["step"] == 3
    assert [r["step"] for r in rows(out, "train")][-3:] == [4, 5, 6]
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 6


def test_a_forced_stop_a_library_wrapped_is_still_a_forced_stop(
        tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Code that turns the ForcedStop into its own error (as a compiler backend may) still
    ends preempted with exit 143, not as a crash (exit 1)."""
    from job.train.loop import Trainer

    def wrapping_step(self):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)
        except BaseException as err:
            raise RuntimeError("backend compiler failed") from err

    cfg = job(tmp_path, models_dir)
    monkeypatch.setattr(Trainer, "train_step", wrapping_step)
    assert run_job(cfg) == 143
    summary = json.loads((Path(cfg.output_path()) / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "preempted" and summary["error"] is None
    assert any("second SIGINT after step 0" in note for note in summary["notes"])
