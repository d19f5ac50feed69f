"""Lifecycle step 4: discover images, caption, bucket, split, and fill the caches."""

from __future__ import annotations

import glob
import hashlib
import math
import random
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from job.config import DatasetTable, JobConfig
from job.data.buckets import bucket_for
from job.data.cache import EntryCache, entry_key
from job.data.captions import caption_for, caption_path
from job.data.discovery import EXTENSIONS, ImageRecord, discover
from job.data.sizes import too_small
from job.data.synthetic import ensure_synthetic
from job.data.transforms import prepare_conditioning, prepare_image
from job.errors import ConfigError, DataError
from job.log import Progress, get_logger
from job.models.base import Family
from job.models.registry import spec_for
from job.train import distributed

EMPTY_CAPTION_KEY = entry_key("<tunejob:empty-prompt>")


@dataclass(frozen=True)
class Sample:
    """One cached training or eval image."""

    dataset_id: str
    rel: str
    caption: str
    bucket: tuple[int, int]
    latent_key: str
    text_key: str
    repeats: int
    # Image-to-image: the paired conditioning image, and the key of the empty prompt encoded
    # with it (caption dropout); text-to-image: None and the one empty-prompt entry.
    cond_path: str | None = None
    empty_key: str = EMPTY_CAPTION_KEY


@dataclass
class PreparedData:
    """Samples, the caches they live in, and what was skipped."""

    train: list[Sample]
    eval: list[Sample]
    eval_source: str
    latent_caches: dict[str, EntryCache]
    text_cache: EntryCache
    skipped: list[tuple[str, str]] = field(default_factory=list)
    encoded: dict[str, int] = field(default_factory=lambda: {"latents": 0, "captions": 0})


def prepare_data(cfg: JobConfig, family: Family,
                 should_stop: Callable[[], bool] = lambda: False) -> PreparedData:
    """Everything training needs from the datasets, with the caches filled."""
    log = get_logger()
    cache_root = Path(cfg.cache.dir)
    text_cache = EntryCache(cache_root / "text", "text", family.fingerprint("text"))
    samples, skipped, records, caches, on_disk = [], [], {}, {}, []
    for ds in cfg.enabled_datasets():
        found, lost = _samples_of(ds, cfg, family)
        samples += [s for s, _ in found]
        records.update({(s.dataset_id, s.rel): r for s, r in found})
        skipped += lost
        # For the log: each file by its path on disk ("<id>/<path in the folder>" here).
        on_disk += [(Path(ds.instance_data_dir) / key[len(ds.id) + 1:], why)
                    for key, why in lost]
        root = Path(ds.cache_dir_vae) if ds.cache_dir_vae else cache_root / "latents" / ds.id
        caches[ds.id] = EntryCache(root, "latent", _latent_fingerprint(cfg, ds, family))
    if skipped:
        log.warning("images_skipped", count=len(skipped),
                    files=[f"{path}: {why}" for path, why in on_disk[:50]])
    if not samples:
        raise _nothing_usable(cfg, skipped)
    if distributed.topology().main:
        for cache in (text_cache, *caches.values()):
            cache.sweep_leftovers()
    data = PreparedData([], [], "", caches, text_cache, skipped)
    data.train, data.eval, data.eval_source = _split(cfg, samples)
    _check_cache_space(cfg, family, data)
    topology = distributed.topology()
    if topology.distributed:
        # Each rank encodes its share, then waits for the others' entries by looking at the
        # cache folder: no collective, so no process-group timeout however long it takes.
        def mine(key: str) -> bool:
            return _shard_of(key, topology.world) == topology.rank

        _fill_latents(cfg, family, data, records, should_stop, mine)
        _fill_text(cfg, family, data, should_stop, mine, records)
        _await_other_ranks(cfg, family, data, records, should_stop)
    else:
        _fill_latents(cfg, family, data, records, should_stop)
        _fill_text(cfg, family, data, should_stop, records=records)
    log.info("data_ready", train_samples=len(data.train), eval_samples=len(data.eval),
             eval_source=data.eval_source, skipped=len(skipped),
             buckets=sorted({f"{w}x{h}" for w, h in (s.bucket for s in data.train)}),
             encoded_latents=data.encoded["latents"], encoded_captions=data.encoded["captions"])
    return data


def _nothing_usable(cfg: JobConfig, skipped: list[tuple[str, str]]) -> DataError:
    """Every file was skipped: which datasets and folders, the first files and why, and
    the fix for the reasons seen."""
    ids = sorted({rel.split("/", 1)[0] for rel, _ in skipped})
    where = ", ".join(f"{d.id!r} ({d.instance_data_dir})" for d in cfg.enabled_datasets()
                      if d.id in ids)
    listed = "; ".join(f"{rel}: {why}" for rel, why in skipped[:4])
    more = f"; and {len(skipped) - 4} more (all in the images_skipped log event)" \
        if len(skipped) > 4 else ""
    def seen(kind: str) -> bool:  # a reason starts with its kind ("no caption: ...")
        return any(why.startswith(kind) for _, why in skipped)

    fixes = []
    if seen("unreadable"):
        fixes.append("replace or remove the unreadable image files")
    if seen("no caption"):
        fixes.append("write a .txt caption beside each image, or set caption_strategy = "
                     '"filename" or "instanceprompt" in [[datasets]]')
    if seen("too small"):
        fixes.append("lower minimum_image_size or add larger images")
    noun = "dataset" if len(ids) == 1 else "datasets"
    return DataError(f"no usable images in {noun} {where}: all {len(skipped)} files found were "
                     f"skipped: {listed}{more}", "; ".join(fixes) or "see the images_skipped "
                     "log event for every file and why it was skipped")


def _alignment(ds: DatasetTable, cfg: JobConfig) -> int:
    """Bucket alignment: the dataset's, else 64 or the family's if larger."""
    return ds.aspect_bucket_alignment or max(64, spec_for(cfg.model.family).alignment)


def _samples_of(ds: DatasetTable, cfg: JobConfig, family: Family):
    """(sample, record) pairs of one dataset, and (file, reason) of the skipped ones."""
    ensure_synthetic(ds, cfg.train.seed)
    found = discover(ds)
    skipped = [(f"{ds.id}/{s.rel}", s.reason) for s in found.skipped]
    pairs = []
    paired = getattr(family, "i2i", False)
    for record in found.records:
        caption = caption_for(record, ds)
        if caption is None:
            skipped.append((f"{ds.id}/{record.rel}", f"no caption: "
                            f"{Path(caption_path(record)).name} is missing, empty or unreadable"))
            continue
        if too_small(record.width, record.height, ds):
            skipped.append((f"{ds.id}/{record.rel}", f"too small ({record.width}x"
                            f"{record.height}) for minimum_image_size"))
            continue
        bucket = bucket_for(record.width, record.height, ds, _alignment(ds, cfg))
        stat = Path(record.path).stat()
        latent_key = entry_key(record.rel, stat.st_size, stat.st_mtime_ns, bucket)
        sample = Sample(ds.id, record.rel, caption, bucket, latent_key, entry_key(caption),
                        ds.repeats)
        if paired:
            cond = _conditioning_path(ds, record)
            if cond is None:
                where = Path(ds.conditioning_data_dir) / Path(record.rel).parent \
                    if ds.conditioning_data_dir else "(no conditioning_data_dir)"
                skipped.append((f"{ds.id}/{record.rel}", f"no conditioning image: nothing "
                                f"named {Path(record.rel).stem}.* in {where}"))
                continue
            # The text embedding carries the conditioning image (vision tokens), so both
            # keys depend on it as prepared for this bucket.
            c = cond.stat()
            cond_key = (str(cond), c.st_size, c.st_mtime_ns, bucket)
            sample = replace(sample, latent_key=entry_key(latent_key, *cond_key),
                             text_key=entry_key(caption, *cond_key), cond_path=str(cond),
                             empty_key=entry_key("<tunejob:empty-prompt>", *cond_key))
        pairs.append((sample, record))
    return pairs, skipped


def _conditioning_path(ds: DatasetTable, record: ImageRecord) -> Path | None:
    """The conditioning image of `record`: the same relative path under
    conditioning_data_dir, with any image extension."""
    if not ds.conditioning_data_dir:
        return None
    rel = Path(record.rel)
    folder = Path(ds.conditioning_data_dir) / rel.parent
    if (folder / rel.name).is_file():
        return folder / rel.name
    matches = sorted(p for p in folder.glob(f"{glob.escape(rel.stem)}.*")
                     if p.suffix.lower() in EXTENSIONS)
    return matches[0] if matches else None


def _latent_fingerprint(cfg: JobConfig, ds: DatasetTable, family: Family) -> dict:
    """Everything that changes a dataset's latents: model, VAE and preprocessing."""
    prep = ds.model_dump(include={"resolution", "resolution_type", "minimum_image_size",
                                  "maximum_image_size", "target_downsample_size", "crop",
                                  "crop_style", "crop_aspect", "aspect_bucket_alignment",
                                  "bucket_resolutions"})
    prep["crop_seed"] = cfg.train.seed if ds.crop_style == "random" else None
    return {"model": family.fingerprint("latent"), "preprocessing": prep, "dataset": ds.id}


def _split(cfg: JobConfig, samples: list[Sample]):
    """Train and eval samples, and where the eval samples come from."""
    v = cfg.validation
    if v.eval_dataset:
        train = [s for s in samples if s.dataset_id != v.eval_dataset]
        held = [s for s in samples if s.dataset_id == v.eval_dataset]
        return train, held, f"dataset:{v.eval_dataset}"
    if v.eval_split > 0:
        order = sorted(samples, key=lambda s: (s.dataset_id, s.rel))
        random.Random(cfg.train.seed).shuffle(order)
        count = min(max(1, math.ceil(v.eval_split * len(order))), len(order) - 1)
        held = set(id(s) for s in order[:count])
        return ([s for s in samples if id(s) not in held],
                [s for s in samples if id(s) in held], f"split:{v.eval_split}")
    # Without a held-out set the eval loss is still comparable across steps, but it is
    # measured on training images, and it is labelled so.
    return samples, samples[:8], "train_subset"


def _check_cache_space(cfg: JobConfig, family: Family, data: PreparedData) -> None:
    """Before encoding: refuse (exit 2) when the cache volume cannot hold the missing text
    entries, for families that know their entry size (logged either way)."""
    entry_bytes = getattr(family, "text_entry_bytes", None)
    if entry_bytes is None:
        return
    missing = len({s.text_key for s in data.train + data.eval} - {
        s.text_key for s in data.train + data.eval if data.text_cache.has(s.text_key)})
    needed = missing * entry_bytes()
    root = Path(cfg.cache.dir)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    get_logger().info("cache_space", text_entry_kib=round(entry_bytes() / 1024, 1),
                      missing_text_entries=missing, needed_mib=round(needed / 2**20, 2),
                      free_gib=round(free / 2**30, 2))
    if needed > free:
        raise ConfigError(
            f"the cache volume has {free / 2**20:.1f} MiB free under {root}, and the "
            f"{missing} missing text entries need about {needed / 2**20:.1f} MiB "
            f"({entry_bytes() / 1024:.0f} KiB each)",
            "free space on the volume, or point cache.dir at a larger one")


def _shard_of(key: str, world: int) -> int:
    """The rank that encodes a cache entry: a stable hash of its key, so ranks agree without
    talking whatever each of them already finds in the cache."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % world


def _missing(data: PreparedData) -> tuple[list[Sample], list[str]]:
    """Samples whose latent entry is missing, and caption keys whose text entry is."""
    latents = [s for s in {(s.dataset_id, s.latent_key): s
                           for s in data.train + data.eval}.values()
               if not data.latent_caches[s.dataset_id].has(s.latent_key)]
    keys = {s.text_key for s in data.train + data.eval}
    keys |= {s.empty_key for s in data.train + data.eval if s.cond_path}
    texts = sorted(k for k in keys if not data.text_cache.has(k))
    return latents, texts


def _await_other_ranks(cfg, family, data: PreparedData, records, should_stop) -> None:
    """Poll the cache until every entry exists; when none has appeared for
    distributed.cache_stall_s (a rank died, or the cache folder is not shared between
    hosts), encode the rest here."""
    log = get_logger()
    stall_s = cfg.distributed.cache_stall_s
    latents, texts = _missing(data)
    remaining = len(latents) + len(texts)
    last_change = last_log = time.monotonic()
    while remaining and not should_stop():
        time.sleep(0.5)
        latents, texts = _missing(data)
        now = time.monotonic()
        if len(latents) + len(texts) < remaining:
            remaining, last_change = len(latents) + len(texts), now
        if now - last_log >= 30:
            last_log = now
            log.info("waiting_for_other_ranks", missing_entries=remaining)
        if now - last_change >= stall_s:
            log.warning("cache_stalled", missing_entries=remaining, stalled_s=round(stall_s),
                        note="no other rank wrote an entry in that time; encoding the rest "
                             "here (is the cache folder shared by every host?)")
            _fill_latents(cfg, family, data, records, should_stop)
            _fill_text(cfg, family, data, should_stop, records=records)
            return


# Threads decoding the next VAE batch's images while the current one encodes.
IMAGE_READERS = 4


def _fill_latents(cfg, family, data: PreparedData, records, should_stop,
                  only: Callable[[str], bool] | None = None) -> None:
    """Encode every image whose latent entry is missing (those `only` accepts), in
    same-bucket VAE batches."""
    todo: dict[tuple, list[Sample]] = {}
    for s in {(s.dataset_id, s.latent_key): s for s in data.train + data.eval}.values():
        cache = data.latent_caches[s.dataset_id]
        if (only is None or only(s.latent_key)) and not cache.has(s.latent_key):
            todo.setdefault((s.dataset_id, s.bucket), []).append(s)
    total = sum(len(v) for v in todo.values())
    if not total:
        return
    progress = Progress("latents", total)
    datasets = {d.id: d for d in cfg.datasets}
    n = cfg.cache.vae_batch_size
    chunks = [(ds_id, bucket, group[start:start + n])
              for (ds_id, bucket), group in todo.items() for start in range(0, len(group), n)]

    def read(ds_id: str, bucket: tuple, sample: Sample):
        """One image (and its conditioning image) decoded, oriented and cropped."""
        ds, record = datasets[ds_id], records[(ds_id, sample.rel)]
        image = prepare_image(record, ds, bucket, random.Random(f"{cfg.train.seed}:{sample.rel}"))
        cond = None if sample.cond_path is None else \
            _conditioning_image(record, sample, ds, cfg).pixels
        return image, cond

    # The images of the next VAE batch are decoded on reader threads (PIL releases the GIL)
    # while the device encodes this one; the crops are seeded per image, so the result
    # does not depend on the order the readers finish in.
    with CacheWriter(cfg.cache.write_batch_size) as writer, \
            ThreadPoolExecutor(max_workers=IMAGE_READERS) as readers:
        def submit(index: int) -> list:
            ds_id, bucket, chunk = chunks[index]
            return [readers.submit(read, ds_id, bucket, s) for s in chunk]

        ahead = submit(0)
        for index, (ds_id, bucket, chunk) in enumerate(chunks):
            if should_stop():
                for future in ahead:
                    future.cancel()
                return
            read_images = [future.result() for future in ahead]
            if index + 1 < len(chunks):
                ahead = submit(index + 1)
            images = [image for image, _ in read_images]
            latents = family.encode_images(torch.stack([im.pixels for im in images]))
            paired = [None] * len(chunk)
            if chunk[0].cond_path is not None:
                paired = family.encode_images(torch.stack([cond for _, cond in read_images]))
            cache = data.latent_caches[ds_id]
            for s, im, lat, image_latents in zip(chunk, images, latents, paired):
                cond = {f"cond.{k}": v for k, v in family.image_conditioning(im).items()}
                if image_latents is not None:
                    cond["cond.image_latents"] = image_latents
                writer.submit(cache.save, s.latent_key, {"latents": lat, **cond})
            data.encoded["latents"] += len(chunk)
            progress.update(len(chunk))
    progress.close()


def _fill_text(cfg, family, data: PreparedData, should_stop,
               only: Callable[[str], bool] | None = None, records=None) -> None:
    """Encode every caption whose entry is missing (those `only` accepts), plus the empty
    prompt (per conditioning image, for image-to-image samples)."""
    cache = data.text_cache
    samples = data.train + data.eval
    if not any(s.cond_path for s in samples) and not cache.has(EMPTY_CAPTION_KEY):
        cache.save(EMPTY_CAPTION_KEY, family.empty_text())
    # key -> (caption, sample whose conditioning image goes with it, or None)
    wanted = {s.text_key: (s.caption, s if s.cond_path else None) for s in samples}
    wanted.update({s.empty_key: ("", s) for s in samples if s.cond_path})
    todo = [(k, c, s) for k, (c, s) in wanted.items()
            if (only is None or only(k)) and not cache.has(k)]
    if not todo:
        return
    progress = Progress("captions", len(todo))
    datasets = {d.id: d for d in cfg.datasets}
    with CacheWriter(cfg.cache.write_batch_size) as writer:
        for start in range(0, len(todo), cfg.cache.text_batch_size):
            if should_stop():
                return
            chunk = todo[start:start + cfg.cache.text_batch_size]
            captions = [c for _, c, _ in chunk]
            if chunk[0][2] is None:
                encoded = family.encode_text(captions)
            else:
                encoded = family.encode_text(captions, [
                    _conditioning_image(records[(s.dataset_id, s.rel)], s,
                                        datasets[s.dataset_id], cfg).pil()
                    for _, _, s in chunk])
            for (key, _, _), tensors in zip(chunk, encoded):
                writer.submit(cache.save, key, tensors)
            data.encoded["captions"] += len(chunk)
            progress.update(len(chunk))
    progress.close()


def _conditioning_image(record: ImageRecord, sample: Sample, ds: DatasetTable, cfg: JobConfig):
    """The sample's conditioning image, prepared like its training image."""
    return prepare_conditioning(record, sample.cond_path, ds, sample.bucket,
                                random.Random(f"{cfg.train.seed}:{sample.rel}"))


class CacheWriter:
    """One background thread for cache writes, so encoding overlaps disk I/O.

    Leaving the block waits for every write and re-raises the first error (a full disk
    must stop the job, not vanish in a thread).
    """

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending

    def __enter__(self) -> "CacheWriter":
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: deque = deque()
        return self

    def submit(self, fn, *args) -> None:
        """Queue a write; past max_pending queued writes, wait for the oldest."""
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(fn, *args))

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)
        while self.pending:
            self.pending.popleft().result()
