"""Whole or absent: the final/ folder swap, validation PNGs and cache entries under a kill
or a full volume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from job.atomic import publish_folder, remove_leftovers, temp_name
from job.data.cache import EntryCache
from job.validate import save_png


def two_exports(root: Path, old_file: str, new_file: str) -> tuple[Path, Path]:
    """final/ holding `old_file`, and a staged export beside it holding `new_file`."""
    final = root / "final"
    final.mkdir()
    (final / old_file).write_bytes(b"old")
    staging = temp_name(final)
    staging.mkdir()
    (staging / new_file).write_bytes(b"new")
    return final, staging


def test_publish_folder_replaces_the_whole_folder(tmp_path: Path) -> None:
    final, staging = two_exports(tmp_path, "diffusion_pytorch_model-00001-of-00002.safetensors",
                                 "pytorch_lora_weights.safetensors")
    publish_folder(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_kill_between_the_renames_leaves_no_mix_and_the_earlier_folder_comes_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final, staging = two_exports(tmp_path, "old.safetensors", "new.safetensors")
    real_replace = os.replace

    def killed_after_the_first(src, dst):
        real_replace(src, dst)
        if Path(src) == final:
            raise KeyboardInterrupt  # stands for the kill: nothing after it runs

    monkeypatch.setattr(os, "replace", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        publish_folder(staging, final)
    monkeypatch.undo()
    assert not final.exists()  # no folder that mixes the two exports
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(name.startswith(".final.") for name in left)
    remove_leftovers(final)  # the earlier export is back, the unfinished one gone
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert [p.name for p in final.iterdir()] == ["old.safetensors"]


def test_a_validation_png_is_whole_or_absent(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image.new("RGB", (8, 8), (200, 10, 10))
    path = tmp_path / "prompt-8x8.png"
    save_png(image, path)
    assert Image.open(path).getpixel((0, 0)) == (200, 10, 10)

    def disk_full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError):
        save_png(image, tmp_path / "other-8x8.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt-8x8.png"]


def test_a_cache_entry_that_fails_to_write_leaves_no_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import job.data.cache as cache_module

    cache = EntryCache(tmp_path, "latents", {"model": "tiny"})
    cache.save("ab" * 32, {"x": torch.ones(2)})

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")

    monkeypatch.setattr(cache_module, "save_file", full)
    with pytest.raises(RuntimeError):
        cache.save("cd" * 32, {"x": torch.ones(2)})
    assert not list(cache.dir.rglob(".*.tmp-*"))
    assert cache.has("ab" * 32) and not cache.has("cd" * 32)
