"""Finding a dataset's images, with their sizes; unreadable files are skipped, not fatal."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image

from job.config import DatasetTable
from job.errors import ConfigError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# EXIF orientations 5-8 rotate by 90 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageRecord:
    """One readable image; width and height as displayed (after EXIF orientation)."""

    path: str
    rel: str
    width: int
    height: int
    dataset_id: str


@dataclass(frozen=True)
class Skipped:
    """A file left out, and why."""

    rel: str
    reason: str


@dataclass
class Discovery:
    """What a dataset folder holds."""

    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def check_present(ds: DatasetTable) -> None:
    """ConfigError unless instance_data_dir is a folder with an image file in it (the
    search stops at the first, so preflight can call this on a large dataset)."""
    root = Path(ds.instance_data_dir)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"dataset {ds.id!r}: instance_data_dir {str(root)!r} {what}",
                          f"create it, mount the volume that holds it, or fix "
                          f"instance_data_dir of [[datasets]] id = {ds.id!r}")
    if next(_image_rels(root), None) is None:
        raise ConfigError(f"dataset {ds.id!r}: no images in {str(root)!r}",
                          f"put {', '.join(sorted(EXTENSIONS))} files there, or disable the "
                          "dataset (disabled = true)")


def discover(ds: DatasetTable) -> Discovery:
    """Every image under instance_data_dir, sorted by relative path."""
    check_present(ds)
    root = Path(ds.instance_data_dir)
    rels = image_files(root)
    found = Discovery()
    for rel in rels:
        # Absolute but not resolved: a symlinked image keeps its caption file beside the link.
        path = os.path.abspath(root / rel)
        size = _displayed_size(path)
        if isinstance(size, str):
            found.skipped.append(Skipped(rel, size))
        else:
            found.records.append(ImageRecord(path, rel, size[0], size[1], ds.id))
    return found


def image_files(root: Path) -> list[str]:
    """Relative posix paths of the image files under root, sorted as strings."""
    # Sorting the strings, not Path objects, makes the order the same on every platform.
    return sorted(_image_rels(root))


def _image_rels(root: Path) -> Iterator[str]:
    """Relative posix paths of the image files under root, as found."""
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        # Hidden files and folders (.DS_Store, macOS "._x.jpg" forks, .cache) are not data.
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in EXTENSIONS and path.is_file():
            yield rel.as_posix()


def _displayed_size(path: str) -> tuple[int, int] | str:
    """(width, height) after EXIF orientation, or the reason the file is unreadable."""
    try:
        if os.path.getsize(path) == 0:
            return "unreadable: empty file"
        with Image.open(path) as image:
            image.verify()
        # verify() leaves the file unusable and does not decode JPEG data: reopen and
        # decode fully, so a truncated file is found here and not halfway through caching.
        with Image.open(path) as image:
            orientation = image.getexif().get(_ORIENTATION_TAG, 1)
            image.load()
            width, height = image.size
        if orientation in _SWAPPING_ORIENTATIONS:
            width, height = height, width
    # Decoders raise many types (OSError, SyntaxError, struct.error, EOFError,
    # DecompressionBombError...); any of them means this one file is skipped.
    except Exception as err:  # noqa: BLE001
        return f"unreadable: {type(err).__name__}: {err}"
    return width, height
