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
        text_path = Path(record.path).with_suffix(".txt")
        try:
            caption = text_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not caption:
            return None
    if ds.prepend_instance_prompt and ds.instance_prompt:
        caption = f"{ds.instance_prompt} {caption}"
    return caption
