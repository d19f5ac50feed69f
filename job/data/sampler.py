"""The data order: every batch from one bucket, deterministic from (seed, epoch).

Each epoch, every sample appears 1 + repeats times, shuffled within its bucket and cut into
full batches (the remainder waits for the next epoch's shuffle); the batch order is then
shuffled and dealt round-robin to ranks, each rank getting the same count.

The sampler holds no position; the loop stores (epoch, batch index), which is all an
exact resume needs.
"""

from __future__ import annotations

import random

from job.errors import DataError

Bucket = tuple[int, int]


class BucketBatchSampler:
    """Shuffled same-bucket batches, dealt to ranks without duplicates."""

    def __init__(self, buckets: list[Bucket], batch_size: int, seed: int,
                 repeats: list[int] | None = None, world_size: int = 1, rank: int = 0) -> None:
        repeats = [0] * len(buckets) if repeats is None else repeats
        if len(repeats) != len(buckets) or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: {len(buckets)} buckets, {len(repeats)} "
                             f"repeats, batch_size {batch_size}, rank {rank} of {world_size}")
        self.batch_size, self.seed = batch_size, seed
        self.world_size, self.rank = world_size, rank
        members: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(buckets):
            members.setdefault(bucket, []).extend([index] * (1 + repeats[index]))
        # A bucket must give every rank a batch, or ranks would wait on each other.
        need = batch_size * world_size
        # Sorted, so the shuffles below consume the generator in the same order every run.
        self.dropped = [(b, len(m)) for b, m in sorted(members.items()) if len(m) < need]
        self.kept = {b: m for b, m in sorted(members.items()) if len(m) >= need}
        if not self.kept:
            raise DataError(
                f"no aspect bucket holds a full batch of {need} samples "
                f"(batch_size {batch_size} x {world_size} ranks; buckets: "
                f"{', '.join(f'{w}x{h}: {n}' for (w, h), n in self.dropped)})",
                "lower train.batch_size or add repeats (or add images of those sizes)")

    def dropped_buckets(self) -> list[tuple[Bucket, int]]:
        """Buckets too small to give every rank a batch, with their sample counts."""
        return list(self.dropped)

    def num_batches_per_epoch(self) -> int:
        """Batches this rank gets in every epoch (the same for every epoch)."""
        total = sum(len(m) // self.batch_size for m in self.kept.values())
        return total // self.world_size

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """This rank's batches of an epoch (remainders are reshuffled next epoch)."""
        # A string seed is hashed with SHA-512, so the order does not depend on PYTHONHASHSEED.
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
