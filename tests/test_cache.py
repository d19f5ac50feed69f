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
