"""Turning cached samples into the batch dict the family takes (see models/base.py).

The trainer reads the cache entries of the next batch on a worker thread while the device
runs the current step (`prefetch`), into pinned memory on CUDA, so `load` only substitutes
dropped captions and queues the copies to the device. A batch does not depend on the
read-ahead: the caption-dropout flags are applied at `load`, a read-ahead of other samples
than the ones loaded is discarded, and a read's error is raised by `load`.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from job.data.prepare import EMPTY_CAPTION_KEY, PreparedData, Sample
from job.errors import DataError

# The name of the read-ahead thread (the tests look for it).
PREFETCH_THREAD = "batch-prefetch"


@dataclass
class HostBatch:
    """One batch's cache entries, stacked in host memory (pinned on CUDA)."""

    # latents and cond.*: what the batch takes whatever the caption dropout.
    tensors: dict[str, torch.Tensor]
    # Each sample's caption entry, None where it is missing or unreadable.
    texts: list[dict[str, torch.Tensor] | None]
    # text.*: the captions stacked as if none is dropped (None when an entry is missing).
    captions: dict[str, torch.Tensor] | None


class BatchLoader:
    """Reads latents and text embeddings of a list of samples from the caches."""

    def __init__(self, data: PreparedData, device: torch.device) -> None:
        self.data, self.device = data, device
        # Image-to-image samples each have their own empty-prompt entry (sample.empty_key).
        image_to_image = any(s.cond_path for s in data.train)
        empty = None if image_to_image else data.text_cache.load(EMPTY_CAPTION_KEY)
        if empty is None and not image_to_image:
            raise DataError("the empty-prompt embedding is missing from the text cache",
                            "run the job again: the cache is refilled at start")
        self.empty = empty
        # Page-locked memory lets the copy to the GPU be queued behind the step in flight
        # instead of waiting for it; on the CPU there is nothing to copy.
        device = torch.device(device)
        self.pin = device.type == "cuda"
        # The GPU the worker thread pins through (_on_this_gpu): this process's.
        self.device_index = None if not self.pin else \
            device.index if device.index is not None else torch.cuda.current_device()
        self._worker: ThreadPoolExecutor | None = None
        self._ahead: tuple[list[Sample], Future[HostBatch]] | None = None

    def prefetch(self, samples: list[Sample]) -> None:
        """Start reading `samples` on the worker thread, for the next `load` (one batch
        ahead: an earlier read-ahead that was not loaded is dropped)."""
        self._drop_ahead()
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=PREFETCH_THREAD,
                                              initializer=self._on_this_gpu)
        self._ahead = (list(samples), self._worker.submit(self.read, samples))

    def load(self, samples: list[Sample], drop_caption: list[bool]) -> dict[str, torch.Tensor]:
        """Stacked tensors on the device; dropped captions get the empty-prompt embedding.
        Takes the read-ahead when it is of these samples, else reads them now."""
        host = self._take_ahead(samples) or self.read(samples)
        captions = host.captions
        if captions is None or any(drop_caption):
            captions = self._stack_captions([self._text(s, drop, entry) for s, drop, entry
                                             in zip(samples, drop_caption, host.texts)])
        batch = {**host.tensors, **captions}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def read(self, samples: list[Sample]) -> HostBatch:
        """The samples' latent and caption entries from the caches, stacked in host memory."""
        latents = [self._entry(self.data.latent_caches[s.dataset_id].load(s.latent_key), s)
                   for s in samples]
        texts = [self.data.text_cache.load(s.text_key) for s in samples]
        tensors = {"latents": self._pin(torch.stack([e["latents"] for e in latents]))}
        for key in latents[0]:
            if key.startswith("cond."):
                tensors[key] = self._pin(torch.stack([e[key] for e in latents]))
        # A missing caption entry is an error only if its caption is not dropped: `load`
        # decides once the dropout flags are drawn.
        captions = None if any(t is None for t in texts) else self._stack_captions(texts)
        return HostBatch(tensors, texts, captions)

    def _on_this_gpu(self) -> None:
        """The worker thread's current GPU is this process's: pinning allocates through the
        current device's context, and a new thread starts on GPU 0 (every rank of a
        multi-GPU job would otherwise open a context there)."""
        if self.pin:
            torch.cuda.set_device(self.device_index)

    def close(self) -> None:
        """Stop the worker thread, after the read under way if any (a later `prefetch`
        starts a new one)."""
        self._drop_ahead()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def _take_ahead(self, samples: list[Sample]) -> HostBatch | None:
        """The read-ahead of `samples`, raising its error; None when there is none or it is
        of other samples (a resume moved the data position)."""
        if self._ahead is None or self._ahead[0] != samples:
            self._drop_ahead()
            return None
        read, self._ahead = self._ahead[1], None
        return read.result()

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None

    def _stack_captions(self, texts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {f"text.{key}": self._pin(_stack_padded([t[key] for t in texts]))
                for key in texts[0]}

    def _pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory() if self.pin else tensor

    def _text(self, sample: Sample, drop: bool,
              entry: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The sample's caption `entry` as read, or its empty-prompt entry when dropped."""
        if not drop:
            return self._entry(entry, sample)
        if sample.cond_path is None:
            return self.empty
        return self._entry(self.data.text_cache.load(sample.empty_key), sample)

    @staticmethod
    def _entry(entry: dict[str, torch.Tensor] | None, sample: Sample) -> dict[str, torch.Tensor]:
        if entry is None:
            raise DataError(f"cache entry of {sample.dataset_id}/{sample.rel} vanished or is "
                            "corrupt during training", "run the job again: it resumes from the "
                            "last checkpoint and re-encodes the entry")
        return entry


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack; entries of different lengths (first dim; e.g. Kandinsky 5's text tokens) are
    zero-padded at the end to the longest, and the family reads each one's own length."""
    longest = max(t.shape[0] for t in tensors) if tensors[0].ndim else 0
    if all(t.ndim == 0 or t.shape[0] == longest for t in tensors):
        return torch.stack(tensors)
    return torch.stack([torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])])
                        for t in tensors])
