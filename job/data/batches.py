"""Turning cached samples into the batch dict the family takes (see models/base.py)."""

from __future__ import annotations

import torch

from job.data.prepare import EMPTY_CAPTION_KEY, PreparedData, Sample
from job.errors import DataError


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

    def load(self, samples: list[Sample], drop_caption: list[bool]) -> dict[str, torch.Tensor]:
        """Stacked tensors on the device; dropped captions get the empty-prompt embedding."""
        latents = [self._entry(self.data.latent_caches[s.dataset_id].load(s.latent_key), s)
                   for s in samples]
        texts = [self._text(s, drop) for s, drop in zip(samples, drop_caption)]
        batch = {"latents": torch.stack([e["latents"] for e in latents])}
        for key in latents[0]:
            if key.startswith("cond."):
                batch[key] = torch.stack([e[key] for e in latents])
        for key in texts[0]:
            batch[f"text.{key}"] = _stack_padded([t[key] for t in texts])
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _text(self, sample: Sample, drop: bool) -> dict[str, torch.Tensor]:
        if not drop:
            return self._entry(self.data.text_cache.load(sample.text_key), sample)
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
