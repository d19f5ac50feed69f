"""Checkpoints that are complete or absent: temp dir, manifest last, then rename.

Layout of `checkpoints/step-000500/`: the files the trainer hands over (in subfolders too)
plus `manifest.json` (step, and each file's size and sha256). A directory without a manifest
that verifies is never resumed from; the log says which one was skipped and why.

A sharded model's checkpoint is written by every rank into one temp folder
(`save_together`): rank 0 names it, every rank writes its part, and rank 0 adds the manifest
and renames only once every rank has finished. The output folder must then be one shared
filesystem for all ranks (as the caches already need).

Only the checkpoints of the run's own line count: when a run starts at step S (resumed
from step S, or fresh at 0) any checkpoint of a later step in its folder is from an
abandoned attempt, and is moved into `checkpoints/superseded-<time>/` (kept, never resumed
or pruned; only the latest such set), so neither "latest" nor total_limit can pick it over
the new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from job.atomic import fsync_dir, publish_folder, remove_leftovers, unique_suffix
from job.errors import DiskFullError, PeerLost, disk_was_full
from job.log import get_logger
from job.train import distributed

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk."""

    step: int
    path: Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointManager:
    """Writes, lists, verifies and prunes checkpoints in one folder."""

    def __init__(self, root: Path, total_limit: int | None = None) -> None:
        self.root, self.total_limit = root, total_limit
        self.log = get_logger()

    def save(self, step: int, write_files: Callable[[Path], None],
             job_identity: dict | None = None, expected_bytes: int = 0) -> Checkpoint:
        """Call `write_files(tmp_dir)`, add the manifest, rename into place, prune."""
        tmp = self._new_tmp(step)
        try:
            write_files(tmp)
            self._complete(tmp, step, job_identity or {})
        except BaseException as err:
            full = disk_was_full(err, self.root)  # before the partial files are removed
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise self._disk_full(step, expected_bytes) from None
            raise
        self.prune()
        return Checkpoint(step, self._final(step))

    def save_together(self, step: int, write_files: Callable[[Path], None],
                      job_identity: dict | None = None, expected_bytes: int = 0) -> Checkpoint:
        """save() where every rank writes a part (a sharded model); every rank calls it.

        Rank 0 makes the temp folder and tells the others its name; each rank's
        `write_files(tmp)` writes its part (it may run collectives); once every rank reports
        success, rank 0 adds the manifest and renames. A failure on any rank fails the save
        on every rank and leaves no checkpoint; a rank killed mid-write leaves a temp folder
        without a manifest, which is never resumed and is deleted by the next prune.
        """
        main = distributed.topology().main
        tmp = Path(distributed.broadcast_object(str(self._new_tmp(step)) if main else None))
        error = _attempt(write_files, tmp)
        if not distributed.any_rank(error is not None):
            # Every rank's files are complete here: the manifest may list and hash them.
            error = _attempt(lambda folder: self._complete(folder, step, job_identity or {}),
                             tmp) if main else None
            if not distributed.any_rank(error is not None):
                if main:
                    self.prune()
                return Checkpoint(step, self._final(step))
        full = error is not None and disk_was_full(error, self.root)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise self._disk_full(step, expected_bytes) from None
        if error is not None:
            raise _as_exception(error)
        raise RuntimeError(f"checkpoint step {step} failed on another rank (its log says why); "
                           "no checkpoint was written")

    def _final(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def _new_tmp(self, step: int) -> Path:
        """An empty temp folder for `step`, named uniquely (host, process, random)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{step:06d}-{unique_suffix()}"
        tmp.mkdir()
        return tmp

    def _complete(self, tmp: Path, step: int, identity: dict) -> None:
        """Manifest last (it fsyncs every file), then the swap that makes the checkpoint
        visible; a checkpoint of the same step already there is replaced whole, and put back
        by the next listing if the swap was killed midway (_recover_replaced)."""
        self._write_manifest(tmp, step, identity)
        publish_folder(tmp, self._final(step), files_synced=True)

    def _recover_replaced(self) -> None:
        """Put back a checkpoint that a swap killed midway left aside; drop copies aside
        whose replacement is in place."""
        finals = {self.root / aside.name[1:].split(".replaced-")[0]
                  for aside in self.root.glob(".step-*.replaced-*")}
        for final in finals:
            if remove_leftovers(final):
                self.log.warning("checkpoint_restored", path=str(final),
                                 reason="a replacement of it was interrupted")

    def set_aside_later_than(self, step: int) -> list[Path]:
        """Move every checkpoint of a step after `step` (an abandoned attempt's: this run
        starts at `step`) into checkpoints/superseded-<time>/, where neither resume nor
        prune looks; returns where they went. One such set is kept: an earlier one is
        deleted, so that restarts from one checkpoint do not fill the disk. Main rank only."""
        later = [p for p in self._step_dirs() if int(_STEP_DIR.match(p.name).group(1)) > step]
        if not later:
            return []
        for old in self.root.glob("superseded-*"):
            shutil.rmtree(old, ignore_errors=True)
            self.log.info("checkpoints_superseded_removed", path=str(old),
                          reason="a newer set was set aside; one set is kept")
        folder = self.root / (time.strftime("superseded-%Y%m%dT%H%M%SZ-", time.gmtime())
                              + uuid.uuid4().hex[:6])
        folder.mkdir()
        moved = []
        for path in later:
            os.replace(path, folder / path.name)
            moved.append(folder / path.name)
        fsync_dir(self.root)
        self.log.warning("checkpoints_superseded", start_step=step,
                         moved=[str(p) for p in moved],
                         reason="checkpoints of later steps than this run starts from, from "
                                "an earlier attempt; kept (the latest such set only), never "
                                "resumed or pruned; delete the folder to free the space")
        return moved

    def _disk_full(self, step: int, expected_bytes: int) -> DiskFullError:
        """How much was needed, how much is free, and what is still safe."""
        last = self.latest()
        needed = max(expected_bytes, self._bytes_of(last) if last else 0)
        free = shutil.disk_usage(self.root).free
        return DiskFullError(
            f"disk full while writing checkpoint step {step} under {self.root}: it needs about "
            f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free; the previous "
            f"checkpoint ({last.path if last else 'none'}) is intact",
            "free space on the output volume (delete superseded-*/ under checkpoints/, or lower "
            "checkpoint.total_limit) and run the job again: it resumes from the last complete "
            "checkpoint")

    @staticmethod
    def _bytes_of(checkpoint: Checkpoint) -> int:
        return sum(p.stat().st_size for p in checkpoint.path.rglob("*") if p.is_file())

    def _write_manifest(self, folder: Path, step: int, identity: dict) -> None:
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size,
                                                          "sha256": _sha256(path)}
        manifest = {"step": step, "files": files, "job": identity}
        with open(folder / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())

    def complete(self) -> list[Checkpoint]:
        """Every checkpoint whose manifest verifies, oldest first."""
        found = []
        for path in self._step_dirs():
            problem = self.problem(path)
            if problem:
                self.log.warning("checkpoint_skipped", path=str(path), reason=problem)
                continue
            found.append(Checkpoint(int(_STEP_DIR.match(path.name).group(1)), path))
        return found

    def written(self) -> list[Checkpoint]:
        """Checkpoints with a manifest, oldest first, without re-hashing their files.

        For listings and for the preemption path, where hashing gigabytes would eat the
        grace period; resume uses complete(), which verifies.
        """
        return [Checkpoint(int(_STEP_DIR.match(p.name).group(1)), p) for p in self._step_dirs()
                if (p / MANIFEST).is_file()]

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        done = self.complete()
        return done[-1] if done else None

    def problem(self, path: Path) -> str | None:
        """Why a checkpoint folder cannot be trusted (None when it verifies)."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return "no manifest (an interrupted write)"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            return f"manifest unreadable: {err}"
        try:
            for name, meta in manifest.get("files", {}).items():
                file = path / name
                if not file.is_file():
                    return f"{name} is missing"
                if file.stat().st_size != meta["bytes"]:
                    return f"{name} has {file.stat().st_size} bytes, manifest says {meta['bytes']}"
                if _sha256(file) != meta["sha256"]:
                    return f"{name} checksum differs from the manifest"
        except OSError as err:  # moved or removed while being read (rank 0 sets some aside)
            return f"unreadable: {err}"
        return None

    def identity(self, checkpoint: Checkpoint) -> dict:
        """The job identity recorded in a checkpoint's manifest."""
        manifest = json.loads((checkpoint.path / MANIFEST).read_text(encoding="utf-8"))
        return manifest.get("job", {})

    def prune(self) -> None:
        """Delete the oldest complete checkpoints beyond total_limit, and the temp folders of
        writes that never finished (called after a save, when none is in flight)."""
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if not self.total_limit:
            return
        steps = [p for p in self._step_dirs() if (p / MANIFEST).is_file()]
        for old in steps[:-self.total_limit]:
            shutil.rmtree(old, ignore_errors=True)
            self.log.info("checkpoint_pruned", path=str(old), total_limit=self.total_limit)

    def _step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        if distributed.topology().main:  # the one writer; the other ranks only read
            self._recover_replaced()
        dirs = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(dirs, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def _attempt(write: Callable[[Path], None], folder: Path) -> BaseException | None:
    """Run `write(folder)`; the exception it raised, or None. A lost peer is raised at once:
    the agreement that would follow is a collective too."""
    try:
        write(folder)
    except PeerLost:
        raise
    except BaseException as err:  # noqa: BLE001 - reported to the other ranks, then raised
        return err
    return None


def _as_exception(err: BaseException) -> BaseException:
    """DCP's CheckpointException is a BaseException, which run.py's handler for unexpected
    errors (exit 1) would not catch: raise it as a RuntimeError with the same text."""
    if isinstance(err, Exception) or not hasattr(err, "failures"):
        return err
    return RuntimeError(f"writing a sharded checkpoint failed: {err}")
