"""Files and folders that appear whole or not at all: written under a temp name, fsynced,
then renamed into place. A kill leaves at most a temp name, which no reader takes for the
real thing; a failed write (a full volume) removes its temp file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

from job.errors import disk_was_full

T = TypeVar("T")
TEMP_MARK = ".tmp-"


def unique_suffix() -> str:
    """HOST-PID-RANDOM, for temp names unique across processes and hosts: ranks on other hosts
    (own PID namespaces) share the output and cache volumes, so a PID alone can repeat."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_name(path: Path) -> Path:
    """A hidden sibling of `path` to write before the rename that publishes it (its name cut
    to 120 characters: the suffix must not push it past the filesystem's 255 bytes)."""
    return path.with_name(f".{path.name[:120]}{TEMP_MARK}{unique_suffix()}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one that temp_name makes."""
    return name.startswith(".") and TEMP_MARK in name


def fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX needs the directory fsynced too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the file under a temp name; then fsync and the rename into place:
    readers never see a half file, and a failed write removes its temp file."""
    tmp = temp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Text through replace_atomically."""
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON through write_text_atomic."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def publish_folder(staging: Path, target: Path, files_synced: bool = False) -> None:
    """Make the complete folder `staging` appear as `target`, replacing what was there: every
    file fsynced (unless the caller did), then an earlier `target` renamed aside, `staging`
    renamed in, the earlier one removed. A kill between the two renames leaves the earlier
    one under `.<name>.replaced-*` and no `target` (restore_replaced puts it back): never a
    mix of old and new files."""
    if not files_synced:
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
    aside = None
    if target.exists():
        aside = target.with_name(f".{target.name}.replaced-{unique_suffix()}")
        os.replace(target, aside)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def build_folder(target: Path, build: Callable[[Path], T],
                 full_error: Callable[[BaseException], Exception]) -> T:
    """`build(staging)` writes the folder's files under a temp name, then publish_folder
    swaps it in as `target`; returns what `build` returned. Leftovers of killed builds are
    cleared first; a failed build removes its staging folder, and one that failed on a full
    volume is raised as `full_error(err)`."""
    remove_leftovers(target)
    staging = temp_name(target)
    try:
        built = build(staging)
        publish_folder(staging, target)
    except BaseException as err:  # a second Ctrl-C (ForcedStop) too: no staging left behind
        # Before the partial folder is removed.
        full = isinstance(err, Exception) and disk_was_full(err, target.parent)
        shutil.rmtree(staging, ignore_errors=True)
        restore_replaced(target)  # cut between publish_folder's two renames
        if full:
            raise full_error(err) from None
        raise
    return built


def restore_replaced(target: Path) -> bool:
    """Put back the copy of `target` that a publish_folder killed between its two renames
    left aside, when `target` is missing; whether it did."""
    aside = sorted(target.parent.glob(f".{target.name}.replaced-*"),
                   key=lambda path: path.stat().st_mtime)
    if not aside or target.exists():
        return False
    os.replace(aside[-1], target)
    return True


def remove_leftovers(target: Path) -> bool:
    """Clear what killed writes of `target` left beside it (by the one process that writes
    it): the copy aside is restored if need be, temp folders and other copies deleted;
    whether a copy was restored."""
    restored = restore_replaced(target)
    for pattern in (f".{target.name[:120]}{TEMP_MARK}*", f".{target.name}.replaced-*"):
        for left in target.parent.glob(pattern):
            if left.is_dir():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)
    return restored
