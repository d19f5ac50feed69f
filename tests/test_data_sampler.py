"""The batch order: one bucket per batch, repeats, ranks, and determinism for exact resume."""

from __future__ import annotations

from collections import Counter

import pytest

from job.data.sampler import BucketBatchSampler
from job.errors import EXIT_DATA, DataError

SQUARE, WIDE, TALL = (64, 64), (96, 64), (64, 96)
# 7 square, 5 wide, 1 tall image
BUCKETS = [SQUARE] * 7 + [WIDE] * 5 + [TALL]


def test_batches_are_full_and_share_one_bucket() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=0)
    batches = sampler.batches_for_epoch(0)
    assert all(len(b) == 2 and len({BUCKETS[i] for i in b}) == 1 for b in batches)
    assert len(batches) == sampler.num_batches_per_epoch() == 3 + 2
    used = Counter(i for b in batches for i in b)
    assert max(used.values()) == 1 and 12 not in used  # the lone tall image never trains
    assert sampler.dropped_buckets() == [(TALL, 1)]


def test_order_is_deterministic_from_seed_and_epoch() -> None:
    first = BucketBatchSampler(BUCKETS, 2, seed=5).batches_for_epoch(3)
    assert first == BucketBatchSampler(BUCKETS, 2, seed=5).batches_for_epoch(3)
    assert first != BucketBatchSampler(BUCKETS, 2, seed=5).batches_for_epoch(4)
    assert first != BucketBatchSampler(BUCKETS, 2, seed=6).batches_for_epoch(3)


def test_order_is_pinned() -> None:
    # A resumed run replays (epoch, batch index) against this order: changing it breaks
    # exact resume of checkpoints written by earlier versions.
    sampler = BucketBatchSampler([SQUARE] * 4 + [WIDE] * 4, batch_size=2, seed=0)
    assert sampler.batches_for_epoch(0) == [[2, 3], [7, 6], [5, 4], [1, 0]]
    assert sampler.batches_for_epoch(1) == [[6, 7], [0, 1], [5, 4], [3, 2]]


def test_remainders_are_reshuffled_so_every_image_trains() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=3, seed=1)
    seen = {i for epoch in range(20) for b in sampler.batches_for_epoch(epoch) for i in b}
    assert seen == set(range(12))  # all but the dropped tall image
    counts = {len(sampler.batches_for_epoch(epoch)) for epoch in range(20)}
    assert counts == {sampler.num_batches_per_epoch()} == {2 + 1}


def test_repeats_add_passes_per_sample() -> None:
    repeats = [0] * 7 + [2] * 5 + [1]
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=0, repeats=repeats)
    used = Counter(i for b in sampler.batches_for_epoch(0) for i in b)
    assert sum(used.values()) == 2 * sampler.num_batches_per_epoch() == 2 * (3 + 7 + 1)
    assert used[12] == 2  # the tall image now fills a batch with itself
    assert all(used[i] <= 1 + repeats[i] for i in used)
    assert sampler.dropped_buckets() == []


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_disjoint_shares(world_size: int) -> None:
    buckets = [SQUARE] * 20 + [WIDE] * 9 + [TALL] * 5
    ranks = [BucketBatchSampler(buckets, 2, seed=7, world_size=world_size, rank=r)
             for r in range(world_size)]
    shares = [r.batches_for_epoch(2) for r in ranks]
    assert len({len(s) for s in shares}) == 1
    assert all(len(s) == r.num_batches_per_epoch() > 0 for s, r in zip(shares, ranks))
    flat = [i for share in shares for b in share for i in b]
    assert len(flat) == len(set(flat))
    # Of the full batches (10 square, 4 wide, 2 tall when kept), fewer than world_size
    # are left over to even out the shares.
    full = 10 + 4 + (2 if 5 >= 2 * world_size else 0)
    assert full - world_size < len(flat) // 2 <= full


def test_buckets_too_small_for_every_rank_are_dropped() -> None:
    buckets = [SQUARE] * 8 + [WIDE] * 3
    sampler = BucketBatchSampler(buckets, 2, seed=0, world_size=2, rank=1)
    assert sampler.dropped_buckets() == [(WIDE, 3)]  # 3 < 2 x 2: rank 0 or 1 would starve
    assert all(buckets[i] == SQUARE for b in sampler.batches_for_epoch(0) for i in b)


def test_no_full_batch_anywhere_is_a_data_error() -> None:
    with pytest.raises(DataError) as caught:
        BucketBatchSampler([SQUARE, WIDE, TALL, TALL], batch_size=3, seed=0)
    assert caught.value.exit_code == EXIT_DATA
    assert "lower train.batch_size or add repeats" in caught.value.hint
    assert "64x96: 2" in caught.value.message


@pytest.mark.parametrize("kwargs", [{"repeats": [0]}, {"batch_size": 0},
                                    {"world_size": 2, "rank": 2}])
def test_bad_arguments_are_refused(kwargs: dict) -> None:
    args = {"buckets": [SQUARE] * 4, "batch_size": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError):
        BucketBatchSampler(**args)
