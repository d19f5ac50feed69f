"""Captions: from the file name, from a .txt beside the image, or the instance prompt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from job.config import DatasetTable
from job.data.captions import caption_for, caption_path
from job.data.discovery import ImageRecord, discover


def ds(root: Path, **kw) -> DatasetTable:
    return DatasetTable(id="d", instance_data_dir=str(root), **kw)


def record(root: Path, rel: str) -> ImageRecord:
    """A record for root/rel; captions never open the image itself."""
    return ImageRecord(str(root / rel), rel, 64, 64, "d")


@pytest.mark.parametrize("rel,caption", [
    ("a_red_box.png", "a red box"),
    ("nested/dir/two__under_scores .jpg", "two under scores"),
    ("  spaced   out\t.png", "spaced out"),
    ("photo.final.jpg", "photo.final"),
])
def test_filename_caption(tmp_path: Path, rel: str, caption: str) -> None:
    assert caption_for(record(tmp_path, rel), ds(tmp_path)) == caption


def test_textfile_caption_is_the_stripped_txt_beside_the_image(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cat.v2.txt").write_text("\n  a cat on a mat \n", encoding="utf-8")
    image = record(tmp_path, "sub/cat.v2.jpg")
    assert caption_path(image) == str(tmp_path / "sub" / "cat.v2.txt")
    assert caption_for(image, ds(tmp_path, caption_strategy="textfile")) == "a cat on a mat"


def test_textfile_with_a_byte_order_mark(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_bytes("\ufeffa dog".encode("utf-8"))
    assert caption_for(record(tmp_path, "x.png"), ds(tmp_path, caption_strategy="textfile")) \
        == "a dog"


@pytest.mark.parametrize("content", [None, b"", b"  \n\t ", b"\xff\xfe\xfa not utf-8"])
def test_missing_empty_or_unreadable_caption_file_is_none(tmp_path: Path, content) -> None:
    if content is not None:
        (tmp_path / "x.txt").write_bytes(content)
    textfile = ds(tmp_path, caption_strategy="textfile", instance_prompt="sks",
                  prepend_instance_prompt=True)
    # None, not the bare instance prompt: the caller skips the image and says why.
    assert caption_for(record(tmp_path, "x.png"), textfile) is None


def test_a_folder_named_like_the_caption_file_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "x.txt").mkdir()
    assert caption_for(record(tmp_path, "x.png"), ds(tmp_path, caption_strategy="textfile")) \
        is None


def test_instance_prompt_strategy_ignores_names_and_files(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("ignored")
    prompt = ds(tmp_path, caption_strategy="instanceprompt", instance_prompt="sks dog",
                prepend_instance_prompt=True)
    # prepend does not apply: the instance prompt is already the whole caption.
    assert caption_for(record(tmp_path, "x.png"), prompt) == "sks dog"


def test_prepend_instance_prompt(tmp_path: Path) -> None:
    (tmp_path / "a_box.txt").write_text("a box in a field")
    image = record(tmp_path, "a_box.png")
    assert caption_for(image, ds(tmp_path, instance_prompt="sks",
                                 prepend_instance_prompt=True)) == "sks a box"
    assert caption_for(image, ds(tmp_path, caption_strategy="textfile", instance_prompt="sks",
                                 prepend_instance_prompt=True)) == "sks a box in a field"
    assert caption_for(image, ds(tmp_path, instance_prompt="sks")) == "a box"  # not asked


def test_symlinked_image_reads_the_caption_beside_the_link(tmp_path: Path) -> None:
    store, data = tmp_path / "store", tmp_path / "data"
    store.mkdir()
    data.mkdir()
    Image.new("RGB", (8, 8)).save(store / "blob.png")
    (store / "blob.txt").write_text("wrong caption")
    os.symlink(store / "blob.png", data / "dog.png")
    (data / "dog.txt").write_text("a dog")
    (found,) = discover(ds(data)).records
    assert caption_for(found, ds(data, caption_strategy="textfile")) == "a dog"


def test_nothing_usable_gives_only_the_fixes_for_the_reasons_seen(tmp_path: Path) -> None:
    from job.data.prepare import _nothing_usable
    from helpers import tiny_job_config

    cfg = tiny_job_config(tmp_path)  # one dataset, id "tiny"
    # A caption file "missing, empty or unreadable" is a caption problem, not an image one.
    captions = _nothing_usable(cfg, [("tiny/a.png", "no caption: a.txt is missing, empty or "
                                                     "unreadable")])
    assert "caption_strategy" in captions.hint and "unreadable image" not in captions.hint
    images = _nothing_usable(cfg, [("tiny/b.png", "unreadable: empty file"),
                                   ("tiny/c.png", "too small (8x8) for minimum_image_size")])
    assert "unreadable image files" in images.hint and "minimum_image_size" in images.hint
    assert "caption" not in images.hint
