"""Turning cached samples into the batch dict the family takes (see models/base.py)."""

from __future__ import annotations

import torch

from job.data.prepare import EMPTY_CAPTION_KEY, PreparedData, Sample
from job.errors import DataError


class BatchLoader:
    """Reads latents and text embeddings of a list of samples from the caches."""

    def __init__(self, data: PreparedData, device: torch.device) -> None:
        self.data, self.device = data, device
        empty = data.text_cache.load(EMPTY_CAPTION_KEY)
        if empty is None:
            raise DataError("the empty-prompt embedding is missing from the text cache",
                            "run the job again: the cache is refilled at start")
        self.empty = empty

    def load(self, samples: list[Sample], drop_caption: list[bool]) -> dict[str, torch.Tensor]:
        """Stacked tensors on the device; dropped captions get the empty-prompt embedding."""
        latents = [self._entry(self.data.latent_caches[s.dataset_id].load(s.latent_key), s)
                   for s in samples]
        texts = [self.empty if drop else self._entry(self.data.text_cache.load(s.text_key), s)
                 for s, drop in zip(samples, drop_caption)]
        batch = {"latents": torch.stack([e["latents"] for e in latents])}
        for key in latents[0]:
            if key.startswith("cond."):
                batch[key] = torch.stack([e[key] for e in latents])
        for key in texts[0]:
            batch[f"text.{key}"] = torch.stack([t[key] for t in texts])
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @staticmethod
    def _entry(entry: dict[str, torch.Tensor] | None, sample: Sample) -> dict[str, torch.Tensor]:
        if entry is None:
            raise DataError(f"cache entry of {sample.dataset_id}/{sample.rel} vanished or is "
                            "corrupt during training", "run the job again: it resumes from the "
                            "last checkpoint and re-encodes the entry")
        return entry
