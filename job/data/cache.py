"""Text-embedding and latent caches: one safetensors file per entry, written atomically.

A cache folder is named by the hash of its fingerprint (model, encoder, resolution,
preprocessing), so a changed setting lands in a new folder and never reuses a stale
entry; `fingerprint.json` in it says what the hash covers. Each entry is written to a
temp file and renamed, so a kill leaves either the old state or the whole entry. An entry
that fails to load (truncated, corrupt) is reported and recomputed by the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from job.atomic import is_temp_name, replace_atomically, write_text_atomic
from job.log import get_logger

# A temp file older than this is taken for a killed write's (an entry takes seconds to
# write, on any rank or host sharing the cache; only a writer stalled for an hour, then
# failing its rename, would lose its entry, to be encoded again).
LEFTOVER_AGE_S = 3600.0


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able fingerprint."""
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def entry_key(*parts: Any) -> str:
    """The file key of one entry (caption text, or image identity plus crop)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EntryCache:
    """A folder of `<key>.safetensors` entries under a fingerprinted folder."""

    def __init__(self, root: Path, kind: str, fingerprint: dict[str, Any]) -> None:
        self.dir = root / f"{kind}-{fingerprint_hash(fingerprint)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "fingerprint.json"
        if not info.exists():
            write_text_atomic(info, json.dumps(fingerprint, indent=2, sort_keys=True,
                                               default=str))
        self.log = get_logger()
        self.writes = 0

    def sweep_leftovers(self, older_than_s: float = LEFTOVER_AGE_S) -> int:
        """Delete the temp files of killed writes (in its own folder and the fan-out folders)
        last changed over `older_than_s` ago: a write in progress, by any rank or host sharing
        the folder, takes seconds. A file or folder that cannot be listed or deleted is left
        (logged): the sweep only saves space. Returns how many were removed."""
        removed, failed, cutoff = 0, [], time.time() - older_than_s
        folders = [self.dir]
        while folders:
            folder = folders.pop()
            try:
                with os.scandir(folder) as entries:
                    listed = list(entries)
            except FileNotFoundError:
                continue
            except OSError as err:  # not ours to list: carry on
                failed.append(f"{type(err).__name__}: {err}")
                continue
            for entry in listed:
                try:
                    if folder == self.dir and entry.is_dir(follow_symlinks=False):
                        folders.append(Path(entry.path))
                    elif is_temp_name(entry.name) and entry.is_file(follow_symlinks=False) and \
                            entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue  # renamed in by its writer, or removed by another sweep
                except OSError as err:  # not ours to delete, a read-only volume: carry on
                    failed.append(f"{type(err).__name__}: {err}")
        if removed:
            self.log.info("cache_leftovers_removed", folder=str(self.dir), files=removed,
                          reason="temp files of writes killed before their rename")
        if failed:
            self.log.warning("cache_leftovers_kept", errors=failed[:5],
                             hint="they only take space; delete them by hand if need be")
        return removed

    def path(self, key: str) -> Path:
        """Where an entry lives (two-level fan-out keeps folders small)."""
        return self.dir / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """True when the entry exists and is whole; a truncated one is removed and logged."""
        path = self.path(key)
        if not path.is_file():
            return False
        problem = _truncation(path)
        if problem:
            self.log.warning("cache_entry_corrupt", path=str(path), error=problem,
                             action="recomputing")
            path.unlink(missing_ok=True)
            return False
        return True

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None when it is missing or unreadable (then removed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            self.log.warning("cache_entry_corrupt", path=str(path), error=str(err),
                             action="recomputing")
            path.unlink(missing_ok=True)
            return None

    def save(self, key: str, tensors: dict[str, torch.Tensor],
             metadata: dict[str, str] | None = None) -> None:
        """Write an entry atomically (temp file, fsync, rename)."""
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        # Its temp name is unique: every rank, on any host, may write the same entry.
        replace_atomically(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata))
        self.writes += 1


def _truncation(path: Path) -> str | None:
    """Why a safetensors file is not whole (None when its size matches its header).

    Reads only the header, so checking every entry at start-up stays cheap; damage inside
    the data is caught when the entry is loaded.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            length = struct.unpack("<Q", fh.read(8))[0]
            if length > size:
                return f"header length {length} exceeds the file size {size}"
            header = json.loads(fh.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, struct.error) as err:
        return f"unreadable header: {err}"
    if size != 8 + length + end:
        return f"{size} bytes on disk, the header describes {8 + length + end}"
    return None
