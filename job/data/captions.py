"""Captions by strategy: the file name, a .txt beside the image, or the instance prompt."""

from __future__ import annotations

from pathlib import Path

from job.config import DatasetTable
from job.data.discovery import ImageRecord


def caption_for(record: ImageRecord, ds: DatasetTable) -> str | None:
    """The image's caption, or None when its caption file is missing, empty or unreadable."""
    if ds.caption_strategy == "instanceprompt":
        return ds.instance_prompt
    if ds.caption_strategy == "filename":
        caption = " ".join(Path(record.rel).stem.replace("_", " ").split())
    else:
        caption = _read_caption_file(caption_path(record))
        if caption is None:
            return None
    if ds.prepend_instance_prompt and ds.instance_prompt:
        caption = f"{ds.instance_prompt} {caption}"
    return caption


def caption_path(record: ImageRecord) -> str:
    """The .txt file with the image's stem, beside it (caption_strategy = "textfile")."""
    return str(Path(record.path).with_suffix(".txt"))


def _read_caption_file(path: str) -> str | None:
    """The stripped text of a caption file, or None when missing, empty or unreadable."""
    try:
        # utf-8-sig: Windows editors start files with a byte-order mark that is not text.
        caption = Path(path).read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return caption or None
