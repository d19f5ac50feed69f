"""Preemption, kills, full disks and shared caches: nothing is lost or corrupted."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from job.jobfile import load_job
from job.metrics import validate_summary
from job.run import run_job
from job.train.checkpoint import CheckpointManager

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "jobs" / "smoke.toml"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def settings(tmp_path: Path, models_dir: Path, *extra: str) -> list[str]:
    """Overrides that keep a smoke job inside tmp_path, on the CPU, quick."""
    return [f"job.output_dir={json.dumps(str(tmp_path / 'out'))}",
            f"model.hub_cache_dir={json.dumps(str(models_dir))}",
            f"cache.dir={json.dumps(str(tmp_path / 'cache'))}",
            f"datasets.0.instance_data_dir={json.dumps(str(tmp_path / 'data'))}",
            'job.device="cpu"', "train.log_every=1", "validation.enabled=false",
            "train.caption_dropout_probability=0.2", *extra]


def cli(tmp_path: Path, models_dir: Path, *extra: str, command: str = "run") -> list[str]:
    args = [sys.executable, "-m", "job", command, str(SMOKE)]
    for item in settings(tmp_path, models_dir, *extra):
        args += ["--set", item]
    return args


def train_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == "train"]


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in train_rows(out)):
            return
        assert proc.poll() is None, "the job ended before it was interrupted"
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached")


def test_sigterm_stops_inside_a_2s_grace_with_a_checkpoint(tmp_path: Path,
                                                          models_dir: Path) -> None:
    args = cli(tmp_path, models_dir, "job.preemption_grace_s=2", "train.max_train_steps=100000",
               "checkpoint.step_interval=1000")
    out = tmp_path / "out" / "smoke"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stderr=log, stdout=log)
        wait_for_step(proc, out, 3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - sent
    assert code == 143 and elapsed < 2.0, (code, elapsed)
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    step = summary["steps_done"]
    assert summary["status"] == "preempted" and step >= 3
    assert [c.step for c in CheckpointManager(out / "checkpoints").complete()] == [step]
    done = subprocess.run(cli(tmp_path, models_dir, f"train.max_train_steps={step + 2}"),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps_done"] == step + 2


def test_sigkill_at_random_steps_resumes_to_the_same_run(tmp_path: Path,
                                                         models_dir: Path) -> None:
    steps = ("train.max_train_steps=12", "checkpoint.step_interval=1", "checkpoint.total_limit=2")
    reference = load_job(SMOKE, settings(tmp_path / "ref", models_dir, *steps))[0]
    assert run_job(reference) == 0
    ref_out = Path(reference.output_path())
    expected = {r["step"]: r for r in train_rows(ref_out)}

    out = tmp_path / "killed" / "out" / "smoke"
    kills = sorted(random.Random(20261122).sample(range(2, 11), 3))
    for target in kills:
        with open(tmp_path / f"log{target}.txt", "w") as log:
            proc = subprocess.Popen(cli(tmp_path / "killed", models_dir, *steps), cwd=ROOT,
                                    stderr=log, stdout=log)
            wait_for_step(proc, out, target)
            proc.kill()
            proc.wait()
    final = subprocess.run(cli(tmp_path / "killed", models_dir, *steps), cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-2000:]

    rows = train_rows(out)
    assert {r["step"] for r in rows} == set(range(1, 13))
    for row in rows:  # steps redone after a kill repeat their first loss exactly
        assert row["loss"] == expected[row["step"]]["loss"], row["step"]
        assert row["epoch"] == expected[row["step"]]["epoch"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 12 and summary["samples_seen"] == 24
    ours = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    theirs = load_file(ref_out / "final" / "pytorch_lora_weights.safetensors")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


def test_preempted_while_caching_keeps_the_finished_entries(tmp_path: Path, models_dir: Path,
                                                            monkeypatch) -> None:
    from job.models.sdxl import SDXLFamily

    original = SDXLFamily.encode_images

    def encode_then_sigterm(self, pixels):
        latents = original(self, pixels)
        os.kill(os.getpid(), signal.SIGTERM)
        return latents

    cfg = load_job(SMOKE, settings(tmp_path, models_dir, "cache.vae_batch_size=2"))[0]
    monkeypatch.setattr(SDXLFamily, "encode_images", encode_then_sigterm)
    assert run_job(cfg) == 143
    summary = json.loads((Path(cfg.output_path()) / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "preempted" and summary["steps_done"] == 0
    assert not (Path(cfg.output_path()) / "checkpoints").exists()
    monkeypatch.setattr(SDXLFamily, "encode_images", original)
    assert run_job(cfg) == 0
    rows = [json.loads(x) for x in (Path(cfg.output_path()) / "metrics.jsonl").read_text()
            .splitlines()]
    ready = [r for r in rows if r["event"] == "data_ready"]
    assert ready[-1]["encoded_latents"] == 12 - 2  # the first batch of 2 was kept


def test_full_disk_while_checkpointing_keeps_the_previous_one(tmp_path: Path, models_dir: Path,
                                                              monkeypatch) -> None:
    import job.train.checkpoint_io as checkpoint_io

    calls = []
    real_save = checkpoint_io.save_file

    def save_until_full(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "save_file", save_until_full)
    cfg = load_job(SMOKE, settings(tmp_path, models_dir, "train.max_train_steps=6",
                                   "checkpoint.step_interval=3"))[0]
    assert run_job(cfg) == 1
    out = Path(cfg.output_path())
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    assert summary["error"]["type"] == "DiskFullError"
    assert "needs about" in summary["error"]["message"] and "MiB are free" in summary["error"]["message"]
    manager = CheckpointManager(out / "checkpoints")
    assert [c.step for c in manager.complete()] == [3]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_volume_full_before_training_still_ends_with_a_summary(
        tmp_path: Path, models_dir: Path, monkeypatch) -> None:
    """The first writes (job.resolved.toml) hit a full volume: a DiskFullError in summary.json
    with the fix, not a traceback; the last attempt's summary is retired, not left to read
    as this run's."""
    import job.run

    def full(path, text):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: "
                           "StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(job.run, "write_text_atomic", full)
    cfg = load_job(SMOKE, settings(tmp_path, models_dir))[0]
    out = Path(cfg.output_path())
    out.mkdir(parents=True)
    (out / "summary.json").write_text('{"status": "succeeded"}')
    assert run_job(cfg) == 1
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    assert summary["error"]["type"] == "DiskFullError"
    assert summary["error"]["message"].startswith("a volume of the job is full (")
    assert str(out) in summary["error"]["message"]
    assert "free space there" in summary["error"]["hint"]
    assert json.loads((out / "summary.previous.json").read_text()) == {"status": "succeeded"}


def test_a_summary_the_full_volume_refuses_turns_success_into_exit_1(
        tmp_path: Path, models_dir: Path, monkeypatch, capsys) -> None:
    """DESIGN: summary.json whatever the end. When even it cannot be written, the run is not
    reported as a success: exit 1 (a retry resumes at the last step and writes it)."""
    import job.outcome

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(job.outcome, "write_json_atomic", full)
    cfg = load_job(SMOKE, settings(tmp_path, models_dir, "train.max_train_steps=2"))[0]
    assert run_job(cfg) == 1
    assert not (Path(cfg.output_path()) / "summary.json").exists()
    said = capsys.readouterr()
    assert "summary_not_written" in said.out + said.err


def test_too_little_space_for_one_checkpoint_refuses_to_start(tmp_path: Path, models_dir: Path,
                                                              monkeypatch) -> None:
    from job.train.loop import Trainer

    monkeypatch.setattr(Trainer, "estimated_checkpoint_bytes", lambda self: 1 << 60)
    cfg = load_job(SMOKE, settings(tmp_path, models_dir))[0]
    assert run_job(cfg) == 2
    summary = json.loads((Path(cfg.output_path()) / "summary.json").read_text())
    assert "one checkpoint needs about" in summary["error"]["message"]
    assert summary["steps_done"] == 0


def test_another_jobs_checkpoints_are_refused_unless_named(tmp_path: Path,
                                                           models_dir: Path) -> None:
    first = load_job(SMOKE, settings(tmp_path, models_dir, "train.max_train_steps=2"))[0]
    assert run_job(first) == 0
    other = load_job(SMOKE, settings(tmp_path, models_dir, "train.max_train_steps=4",
                                     'job.name="other"'))[0]
    Path(other.output_path()).mkdir(parents=True)
    theirs = Path(first.output_path()) / "checkpoints"
    os.rename(theirs, Path(other.output_path()) / "checkpoints")
    assert run_job(other) == 2
    summary = json.loads((Path(other.output_path()) / "summary.json").read_text())
    assert "belongs to a different job" in summary["error"]["message"]
    step2 = Path(other.output_path()) / "checkpoints" / "step-000002"
    named = load_job(SMOKE, settings(tmp_path, models_dir, "train.max_train_steps=4",
                                     'job.name="other"',
                                     f"checkpoint.resume_from={json.dumps(str(step2))}"))[0]
    assert run_job(named) == 0


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path: Path,
                                                                  models_dir: Path) -> None:
    """Resumed by path from step 4 while step 6 of the first attempt exists: the new line's
    step 5 must survive total_limit = 1 (before, the highest step was kept and the new one
    pruned at once) and the old step 6 is kept aside, never resumed."""
    first = load_job(SMOKE, settings(tmp_path, models_dir, "train.max_train_steps=6",
                                     "checkpoint.step_interval=2", "checkpoint.total_limit=2"))[0]
    assert run_job(first) == 0
    checkpoints = Path(first.output_path()) / "checkpoints"
    assert [c.step for c in CheckpointManager(checkpoints).complete()] == [4, 6]
    again = load_job(SMOKE, settings(
        tmp_path, models_dir, "train.max_train_steps=5", "checkpoint.step_interval=2",
        "checkpoint.total_limit=1",
        f"checkpoint.resume_from={json.dumps(str(checkpoints / 'step-000004'))}"))[0]
    assert run_job(again) == 0
    assert [c.step for c in CheckpointManager(checkpoints).complete()] == [5]
    [aside] = checkpoints.glob("superseded-*/step-000006")
    assert CheckpointManager(aside.parent).problem(aside) is None  # whole, kept
    summary = json.loads((Path(again.output_path()) / "summary.json").read_text())
    assert summary["steps_done"] == 5
    assert summary["checkpoints"] == [str(checkpoints / "step-000005")]


def test_two_jobs_filling_one_cache_at_once(tmp_path: Path, models_dir: Path) -> None:
    procs = [subprocess.Popen(cli(tmp_path, models_dir, f'job.name="job{i}"', command="cache"),
                              cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              text=True) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    entries = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(entries) == 12 and all(load_file(e)["latents"].ndim == 3 for e in entries)
    assert not list((tmp_path / "cache").rglob(".*.tmp-*"))


def test_a_truncated_cache_entry_is_recomputed_by_the_next_run(tmp_path: Path,
                                                               models_dir: Path) -> None:
    """... and the temp files of writes killed before their rename are swept once they are
    an hour old (a younger one may be another job's write in progress)."""
    first = load_job(SMOKE, settings(tmp_path, models_dir, "train.max_train_steps=1"))[0]
    assert run_job(first) == 0
    entry = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))[0]
    entry.write_bytes(entry.read_bytes()[:-16])
    stale = entry.with_name(f".{entry.name}.tmp-otherhost-7-0a1b2c3d")
    text_dir = next((tmp_path / "cache" / "text").glob("text-*"))
    stale_text = text_dir / ".fingerprint.json.tmp-otherhost-7-4e5f6a7b"
    fresh = entry.with_name(f".{entry.name}.tmp-otherhost-8-8c9d0e1f")
    for path in (stale, stale_text, fresh):
        path.write_bytes(b"half")
    for path in (stale, stale_text):
        os.utime(path, (time.time() - 7200,) * 2)
    again = load_job(SMOKE, settings(tmp_path, models_dir, "train.max_train_steps=1",
                                     'job.name="again"'))[0]
    assert run_job(again) == 0
    rows = [json.loads(x) for x in (Path(again.output_path()) / "metrics.jsonl").read_text()
            .splitlines()]
    ready = next(r for r in rows if r["event"] == "data_ready")
    assert ready["encoded_latents"] == 1 and ready["encoded_captions"] == 0
    assert load_file(entry)["latents"].ndim == 3
    assert not stale.exists() and not stale_text.exists() and fresh.exists()
