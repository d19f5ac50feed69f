"""The data order: every batch from one bucket, deterministic from (seed, epoch).

The sampler holds no position; the loop stores (epoch, batch index), which is all an
exact resume needs.
"""

from __future__ import annotations

import random

from job.errors import DataError


class BucketBatchSampler:
    """Shuffled same-bucket batches, dealt to ranks without duplicates."""

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int,
                 repeats: list[int] | None = None, world_size: int = 1, rank: int = 0) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.world_size, self.rank = world_size, rank
        repeats = repeats or [0] * len(buckets)
        self.members: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.members.setdefault(bucket, []).extend([index] * (1 + repeats[index]))
        need = batch_size * world_size
        self.dropped = [(b, len(m)) for b, m in sorted(self.members.items()) if len(m) < need]
        self.kept = {b: m for b, m in sorted(self.members.items()) if len(m) >= need}
        if not self.kept:
            raise DataError(
                f"no aspect bucket holds a full batch of {need} "
                f"({', '.join(f'{w}x{h}: {n}' for (w, h), n in self.dropped)})",
                "lower train.batch_size, add repeats, or add images of those sizes")

    def dropped_buckets(self) -> list[tuple[tuple[int, int], int]]:
        """Buckets too small for one batch, with their sample counts."""
        return self.dropped

    def num_batches_per_epoch(self) -> int:
        """Batches this rank gets in every epoch."""
        total = sum(len(m) // self.batch_size for m in self.kept.values())
        return total // self.world_size

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """This rank's batches of an epoch (remainders are reshuffled next epoch)."""
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        for members in self.kept.values():
            order = list(members)
            rng.shuffle(order)
            usable = len(order) - len(order) % self.batch_size
            batches += [order[i:i + self.batch_size] for i in range(0, usable, self.batch_size)]
        rng.shuffle(batches)
        per_rank = len(batches) // self.world_size
        return batches[self.rank:per_rank * self.world_size:self.world_size]
