"""Finding a dataset's images, with their sizes; unreadable files are skipped, not fatal."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from job.config import DatasetTable
from job.errors import ConfigError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# EXIF orientations 5-8 rotate by 90 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


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


def discover(ds: DatasetTable) -> Discovery:
    """Every image under instance_data_dir, sorted by relative path."""
    root = Path(ds.instance_data_dir)
    if not root.is_dir():
        raise ConfigError(f"dataset {ds.id!r}: instance_data_dir {str(root)!r} does not exist",
                          f"create it, mount the volume that holds it, or fix "
                          f"instance_data_dir of [[datasets]] id = {ds.id!r}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ConfigError(f"dataset {ds.id!r}: no images in {str(root)!r}",
                          f"put {', '.join(sorted(EXTENSIONS))} files there, or disable the "
                          "dataset (disabled = true)")
    found = Discovery()
    for path in files:
        rel = path.relative_to(root).as_posix()
        size = _displayed_size(path)
        if isinstance(size, str):
            found.skipped.append(Skipped(rel, size))
        else:
            found.records.append(ImageRecord(str(path.resolve()), rel, *size, ds.id))
    return found


def _displayed_size(path: Path) -> tuple[int, int] | str:
    """(width, height) after EXIF orientation, or the reason the file is unreadable."""
    if path.stat().st_size == 0:
        return "unreadable: empty file"
    try:
        with Image.open(path) as image:
            image.verify()
        # verify() leaves the file unusable; reopen and decode fully to catch truncation.
        with Image.open(path) as image:
            orientation = image.getexif().get(0x0112, 1)
            image.load()
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"unreadable: {type(err).__name__}: {err}"
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return width, height


def open_oriented(path: str) -> Image.Image:
    """The image as displayed: EXIF orientation applied, RGB."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P") and "transparency" in image.info or \
                image.mode in ("RGBA", "LA"):
            # Transparent pixels over white, not over whatever colour they happen to hold.
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        if image.mode.startswith("I"):
            # 16-bit greyscale: scale to 8 bits instead of clipping at 255.
            image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        return image.convert("RGB")
