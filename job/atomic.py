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
from typing import Any


def unique_suffix() -> str:
    """HOST-PID-RANDOM, for temp names unique across processes and hosts: ranks on other hosts
    (own PID namespaces) share the output and cache volumes, so a PID alone can repeat."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_name(path: Path) -> Path:
    """A hidden sibling of `path` to write before the rename that publishes it (its name cut
    to 120 characters: the suffix must not push it past the filesystem's 255 bytes)."""
    return path.with_name(f".{path.name[:120]}.tmp-{unique_suffix()}")


def fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX needs the directory fsynced too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to a temp file, fsync, rename: readers never see a half file."""
    tmp = temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON through write_text_atomic."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def publish_folder(staging: Path, target: Path) -> None:
    """Make the complete folder `staging` appear as `target`, replacing what was there: every
    file fsynced, then an earlier `target` renamed aside, `staging` renamed in, the earlier one
    removed. A kill between the two renames leaves the earlier one under
    `.<name>.replaced-*` and no `target` (remove_leftovers puts it back): never a mix of old
    and new files."""
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


def restore_replaced(target: Path) -> None:
    """Put back the copy of `target` that a publish_folder killed between its two renames
    left aside, when `target` is missing."""
    aside = sorted(target.parent.glob(f".{target.name}.replaced-*"),
                   key=lambda path: path.stat().st_mtime)
    if aside and not target.exists():
        os.replace(aside[-1], target)


def remove_leftovers(target: Path) -> None:
    """Clear what killed writes of `target` left beside it (by the one process that writes
    it): the copy aside is restored if need be, temp folders and other copies deleted."""
    restore_replaced(target)
    for pattern in (f".{target.name[:120]}.tmp-*", f".{target.name}.replaced-*"):
        for left in target.parent.glob(pattern):
            if left.is_dir():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)
