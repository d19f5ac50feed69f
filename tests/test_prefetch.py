"""The batch read-ahead changes no batch, reports a failed read at the step that needs it and
leaves no thread behind; an optimizer step reads the device once."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch

import job.train.loop
from helpers import tiny_job_config
from job.config import JobConfig
from job.data.batches import PREFETCH_THREAD, BatchLoader
from job.data.cache import EntryCache
from job.errors import EXIT_DATA
from job.models.sdxl import SDXLFamily
from job.run import run_job
from job.train.loop import Trainer


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-model folder shared by the module's runs (built on first use)."""
    return tmp_path_factory.mktemp("models")


def tiny_job(tmp_path: Path, models_dir: Path, **train) -> JobConfig:
    """4 images in one bucket at batch 2 (2 steps an epoch), 6 steps, half the captions
    dropped, a checkpoint every 2 steps, no validation."""
    return tiny_job_config(tmp_path, model={"hub_cache_dir": str(models_dir)},
                           train={"max_train_steps": 6, "caption_dropout_probability": 0.5,
                                  **train},
                           validation={"enabled": False})


def record_batches(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """Every batch the training objective is handed, in order (a copy)."""
    batches: list[dict[str, torch.Tensor]] = []
    original = SDXLFamily.training_loss

    def recording(self, batch, generator):
        batches.append({k: v.detach().clone() for k, v in batch.items()})
        return original(self, batch, generator)

    monkeypatch.setattr(SDXLFamily, "training_loss", recording)
    return batches


def record_trainers(monkeypatch: pytest.MonkeyPatch) -> list[Trainer]:
    """Every Trainer whose train() ran."""
    trainers: list[Trainer] = []
    original = Trainer.train

    def recording(self):
        trainers.append(self)
        return original(self)

    monkeypatch.setattr(Trainer, "train", recording)
    return trainers


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(PREFETCH_THREAD)]


def summary_of(cfg: JobConfig) -> dict:
    return json.loads((Path(cfg.output_path()) / "summary.json").read_text())


def test_read_ahead_gives_the_batches_of_synchronous_loading(
        tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With captions dropped, over 3 epochs, stopped at an epoch's end and resumed."""
    batches = record_batches(monkeypatch)
    with monkeypatch.context() as synchronous:
        synchronous.setattr(BatchLoader, "prefetch", lambda self, samples: None)
        assert run_job(tiny_job(tmp_path / "sync", models_dir)) == 0
    expected = list(batches)
    batches.clear()

    trainers = record_trainers(monkeypatch)
    original_step = Trainer.train_step

    def step_then_sigterm_at_4(self):
        result = original_step(self)
        if self.state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    cut = tiny_job(tmp_path / "ahead", models_dir)
    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm_at_4)
    assert run_job(cut) == 143
    assert summary_of(cut)["steps_done"] == 4 and not prefetch_threads()
    assert (trainers[-1].state.epoch, trainers[-1].state.batch_in_epoch) == (1, 2)
    monkeypatch.setattr(Trainer, "train_step", original_step)
    assert run_job(cut) == 0
    assert not prefetch_threads()
    assert_same_batches(batches, expected)
    empty = trainers[-1].batches.empty
    key = next(iter(empty))
    dropped = [torch.equal(row, empty[key]) for b in expected for row in b[f"text.{key}"]]
    assert any(dropped) and not all(dropped)

    # The batch after the last step is read ahead; resume() then moves the position back to
    # step 4, so the read-ahead is of other samples and the batch of step 5 is read instead.
    trainer = trainers[-1]
    trainer._next_batch()
    trainer.cfg.checkpoint.resume_from = str(Path(cut.output_path()) / "checkpoints"
                                             / "step-000004")
    trainer.resume()
    assert_same_batches([trainer._next_batch()], [expected[4]])
    trainer.batches.close()
    assert not prefetch_threads()


def test_an_entry_that_vanishes_while_read_ahead_fails_its_step(
        tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read error reaches the main thread when its batch is taken: after step 1."""
    original = EntryCache.load
    vanished: list[str] = []

    def vanish_in_read_ahead(self, key):
        if threading.current_thread().name.startswith(PREFETCH_THREAD) and not vanished:
            self.path(key).unlink()
            vanished.append(key)
        return original(self, key)

    monkeypatch.setattr(EntryCache, "load", vanish_in_read_ahead)
    cfg = tiny_job(tmp_path, models_dir)
    assert run_job(cfg) == EXIT_DATA
    summary = summary_of(cfg)
    assert summary["error"]["type"] == "DataError" and summary["steps_done"] == 1
    assert "vanished or is corrupt during training" in summary["error"]["message"]
    assert vanished and not prefetch_threads()


HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def test_an_optimizer_step_reads_the_device_once(
        tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read of a device value waits for the device's queued work. Counted: the reads
    the loop's own code makes during train_step, with 2 micro-batches and clipping; not the
    family's, and not the caption-dropout flags (drawn on the host, in _next_batch)."""
    counter = {"on": False, "reads": 0}
    reads_per_step: list[int] = []

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if counter["on"] and caller.co_filename == job.train.loop.__file__ \
                    and caller.co_name != "_next_batch":
                counter["reads"] += 1
            return original(self, *args, **kwargs)
        return read

    original_step = Trainer.train_step

    def counted_step(self):
        counter.update(on=True, reads=0)
        try:
            return original_step(self)
        finally:
            counter["on"] = False
            reads_per_step.append(counter["reads"])

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(Trainer, "train_step", counted_step)
    cfg = tiny_job(tmp_path, models_dir, max_train_steps=3, gradient_accumulation_steps=2,
                   max_grad_norm=1.0)
    assert run_job(cfg) == 0
    assert reads_per_step == [1, 1, 1]
