"""Cache entries: fingerprinted folders, atomic writes, corrupt entries recomputed."""

from __future__ import annotations

from pathlib import Path

import torch

from job.data.cache import EntryCache, entry_key


def test_fingerprint_change_means_new_folder(tmp_path: Path) -> None:
    a = EntryCache(tmp_path, "latent", {"resolution": 1024})
    b = EntryCache(tmp_path, "latent", {"resolution": 768})
    same = EntryCache(tmp_path, "latent", {"resolution": 1024})
    assert a.dir != b.dir and a.dir == same.dir
    assert (a.dir / "fingerprint.json").read_text().strip().startswith("{")


def test_round_trip_and_corrupt_entry(tmp_path: Path) -> None:
    cache = EntryCache(tmp_path, "text", {"m": 1})
    key = entry_key("a caption")
    cache.save(key, {"x": torch.arange(6.0).reshape(2, 3)})
    assert torch.equal(cache.load(key)["x"], torch.arange(6.0).reshape(2, 3))
    path = cache.path(key)
    path.write_bytes(path.read_bytes()[:20])  # truncated by a crash of another tool
    assert cache.load(key) is None and not path.exists()
    assert not list(cache.dir.rglob(".*.tmp-*"))


def test_cache_writer_bounds_its_queue_and_surfaces_write_errors() -> None:
    import threading
    import time

    import pytest

    from job.data.prepare import CacheWriter

    gate, peak, queued = threading.Event(), [0], []

    def slow_write(i: int) -> None:
        gate.wait(5)
        queued.append(i)

    with CacheWriter(max_pending=3) as writer:
        for i in range(3):
            writer.submit(slow_write, i)
        peak[0] = len(writer.pending)
        threading.Timer(0.2, gate.set).start()
        started = time.perf_counter()
        writer.submit(slow_write, 3)  # must wait for the oldest write
        assert time.perf_counter() - started >= 0.15
    assert peak[0] == 3 and queued == [0, 1, 2, 3]

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        with CacheWriter(max_pending=2) as writer:
            writer.submit(full_disk)


def test_truncated_entry_is_found_at_start_and_recomputed(tmp_path: Path) -> None:
    cache = EntryCache(tmp_path, "latent", {"m": 1})
    key = entry_key("image.png")
    cache.save(key, {"latents": torch.ones(4, 8, 8)})
    assert cache.has(key)
    path = cache.path(key)
    path.write_bytes(path.read_bytes()[:-10])  # a copy cut short, say
    assert not cache.has(key) and not path.exists()


def test_sweep_removes_old_temp_files_only_and_survives_what_it_cannot_delete(
        tmp_path: Path, monkeypatch) -> None:
    import os
    import time

    import job.data.cache as cache_module

    cache = EntryCache(tmp_path, "latent", {"m": 1})
    key = entry_key("an image")
    cache.save(key, {"x": torch.ones(2)})
    fan_out = cache.path(key).parent
    old = [fan_out / ".a.safetensors.tmp-h-1-aaaa", fan_out / ".b.safetensors.tmp-h-1-bbbb",
           cache.dir / ".fingerprint.json.tmp-h-1-cccc"]
    fresh = fan_out / ".c.safetensors.tmp-h-2-dddd"
    for path in (*old, fresh):
        path.write_bytes(b"half")
    for path in old:
        os.utime(path, (time.time() - 7200,) * 2)
    unlink = os.unlink

    def refuse_one(path, *args, **kwargs):
        if str(path).endswith("bbbb"):  # another user's file on a shared volume
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(cache_module.os, "unlink", refuse_one)
    assert cache.sweep_leftovers() == 2
    assert [p.exists() for p in old] == [False, True, False]
    assert fresh.exists() and cache.path(key).exists()
    assert torch.equal(cache.load(key)["x"], torch.ones(2))
