"""Latent caching decodes the next VAE batch's images on reader threads while the current
batch encodes: the cached latents are the same as with one reader, and the reading of a
batch happens while the one before it encodes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import job.data.prepare as prepare
from helpers import tiny_job_config
from job.data.prepare import prepare_data
from job.models.sdxl import SDXLFamily


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def cached_latents(tmp_path: Path, models_dir: Path, cache: str = "cache"):
    """The job config and family of 6 images in VAE batches of 2 (3 batches)."""
    cfg = tiny_job_config(tmp_path, model={"hub_cache_dir": str(models_dir)},
                          datasets=[{"id": "tiny", "instance_data_dir": str(tmp_path / "data"),
                                     "synthetic_images": 6, "caption_strategy": "textfile",
                                     "resolution": 64, "crop": True,
                                     "aspect_bucket_alignment": 32}],
                          cache={"dir": str(tmp_path / cache), "vae_batch_size": 2})
    family = SDXLFamily(cfg, torch.device("cpu"), torch.float32)
    family.load()
    return cfg, family


def latents_of(data) -> dict[str, torch.Tensor]:
    cache = data.latent_caches["tiny"]
    return {s.latent_key: cache.load(s.latent_key)["latents"] for s in data.train + data.eval}


def test_readers_cache_the_same_latents_as_one_reader(tmp_path: Path, models_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    results = []
    for readers in (1, 4):
        monkeypatch.setattr(prepare, "IMAGE_READERS", readers)
        cfg, family = cached_latents(tmp_path, models_dir, f"cache-readers{readers}")
        data = prepare_data(cfg, family)
        assert data.encoded["latents"] == 6
        results.append(latents_of(data))
    one, four = results
    assert one.keys() == four.keys() and len(one) == 6
    for key in one:
        assert torch.equal(one[key], four[key]), key


def test_the_next_batch_is_read_while_this_one_encodes(tmp_path: Path, models_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, family = cached_latents(tmp_path, models_dir)
    reads: list[float] = []
    encodes: list[tuple[float, float]] = []
    lock = threading.Lock()
    prepare_image = prepare.prepare_image
    encode_images = family.encode_images

    def timed_read(*args, **kwargs):
        with lock:
            reads.append(time.monotonic())
        return prepare_image(*args, **kwargs)

    def slow_encode(pixels):
        start = time.monotonic()
        time.sleep(0.3)  # a device busy encoding
        out = encode_images(pixels)
        encodes.append((start, time.monotonic()))
        return out

    monkeypatch.setattr(prepare, "prepare_image", timed_read)
    family.encode_images = slow_encode
    prepare_data(cfg, family)
    assert len(encodes) == 3 and len(reads) == 6
    # Batch i + 1's images began reading before batch i finished encoding (read one after
    # the other, they would begin only after it).
    reads.sort()
    for i, (_, end) in enumerate(encodes[:-1]):
        assert reads[2 * (i + 1)] < end, (i, encodes, reads)
