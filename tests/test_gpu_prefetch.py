"""On a CUDA GPU (marked `gpu`; `python -m pytest -m gpu tests/test_gpu_prefetch.py` on the
GPU machine): the batch read-ahead stacks into pinned memory and gives the same batch on
the GPU as a plain CPU load, with the worker thread on this process's GPU."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from job.data.batches import BatchLoader
from job.data.prepare import prepare_data
from test_image_readers import cached_latents, models_dir  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_read_ahead_pins_and_matches_a_cpu_load(tmp_path: Path, models_dir: Path) -> None:
    cfg, family = cached_latents(tmp_path, models_dir)
    data = prepare_data(cfg, family)
    samples = data.train[:2]
    plain = BatchLoader(data, torch.device("cpu")).load(samples, [False, True])
    loader = BatchLoader(data, torch.device("cuda", torch.cuda.current_device()))
    host = loader.read(samples)
    assert all(t.is_pinned() for t in host.tensors.values())
    devices = []
    loader.prefetch(samples)
    loader._worker.submit(lambda: devices.append(torch.cuda.current_device())).result()
    batch = loader.load(samples, [False, True])
    loader.close()
    assert devices == [torch.cuda.current_device()]
    assert batch.keys() == plain.keys()
    for key in batch:
        assert batch[key].is_cuda
        torch.testing.assert_close(batch[key].cpu(), plain[key], rtol=0, atol=0)
    assert not [t for t in threading.enumerate() if t.name.startswith("batch-prefetch")]
