"""Discovery on real files: what is found, in which order, at which size, and what is skipped."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from job.config import DatasetTable
from job.data.discovery import discover
from job.errors import EXIT_BAD_JOB, ConfigError


def ds(root: Path, **kw) -> DatasetTable:
    return DatasetTable(id="pets", instance_data_dir=str(root), **kw)


def jpeg_bytes(size: tuple[int, int], orientation: int | None = None) -> bytes:
    image = Image.new("RGB", size, "green")
    exif = image.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    return out.getvalue()


def noise_bytes(size: tuple[int, int], fmt: str) -> bytes:
    out = io.BytesIO()
    # Noise, so the pixel data spans many bytes and a cut lands inside it.
    Image.effect_noise(size, 64).convert("RGB").save(out, fmt)
    return out.getvalue()


def png_bytes(size: tuple[int, int]) -> bytes:
    return noise_bytes(size, "PNG")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    Image.new("RGB", (30, 20)).save(tmp_path / "b" / "deep" / "z.webp")
    Image.new("RGB", (20, 30)).save(tmp_path / "a.BMP")
    Image.new("L", (16, 16)).save(tmp_path / "b" / "grey.png")
    (tmp_path / "c.JPEG").write_bytes(jpeg_bytes((40, 20)))
    (tmp_path / "rot6.jpg").write_bytes(jpeg_bytes((40, 20), orientation=6))
    (tmp_path / "rot8.jpg").write_bytes(jpeg_bytes((40, 20), orientation=8))
    (tmp_path / "rot3.jpg").write_bytes(jpeg_bytes((40, 20), orientation=3))  # 180: no swap
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    (tmp_path / "text_named.png").write_text("hello, not a png")
    whole_png, whole_jpg = png_bytes((64, 64)), noise_bytes((64, 64), "JPEG")
    (tmp_path / "cut.png").write_bytes(whole_png[:len(whole_png) // 2])
    # Half a JPEG has a valid header and passes verify(); only decoding finds the cut.
    (tmp_path / "cut.jpg").write_bytes(whole_jpg[:len(whole_jpg) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(png_bytes((8, 8)))
    (tmp_path / "._forked.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    return tmp_path


def test_finds_images_recursively_in_sorted_order(folder: Path) -> None:
    found = discover(ds(folder))
    assert [r.rel for r in found.records] == [
        "a.BMP", "b/deep/z.webp", "b/grey.png", "c.JPEG", "rot3.jpg", "rot6.jpg", "rot8.jpg"]
    assert all(r.dataset_id == "pets" for r in found.records)
    for record in found.records:
        assert Path(record.path).is_absolute()
        assert Path(record.path) == folder / record.rel


def test_sizes_are_as_displayed_after_exif_orientation(folder: Path) -> None:
    sizes = {r.rel: (r.width, r.height) for r in discover(ds(folder)).records}
    assert sizes["c.JPEG"] == (40, 20)
    assert sizes["rot6.jpg"] == (20, 40) and sizes["rot8.jpg"] == (20, 40)
    assert sizes["rot3.jpg"] == (40, 20)
    assert sizes["b/deep/z.webp"] == (30, 20) and sizes["a.BMP"] == (20, 30)


def test_unreadable_files_are_skipped_with_a_reason(folder: Path) -> None:
    skipped = {s.rel: s.reason for s in discover(ds(folder)).skipped}
    assert sorted(skipped) == ["corrupt.jpg", "cut.jpg", "cut.png", "empty.png",
                               "text_named.png"]
    assert "empty" in skipped["empty.png"]
    assert all(reason.startswith("unreadable") for reason in skipped.values())
    assert "truncated" in skipped["cut.jpg"].lower()


def test_all_unreadable_is_not_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "y.jpg").write_bytes(b"junk")
    found = discover(ds(tmp_path))  # the caller turns "nothing usable" into a DataError
    assert found.records == [] and [s.rel for s in found.skipped] == ["x.png", "y.jpg"]


def test_missing_folder_names_the_key_and_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        discover(ds(tmp_path / "nowhere"))
    assert "does not exist" in caught.value.message and "nowhere" in caught.value.message
    assert "instance_data_dir" in caught.value.hint and "'pets'" in caught.value.hint
    assert caught.value.exit_code == EXIT_BAD_JOB


def test_a_file_instead_of_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file.png").write_bytes(png_bytes((8, 8)))
    with pytest.raises(ConfigError, match="is not a folder"):
        discover(ds(tmp_path / "file.png"))


def test_a_folder_without_image_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("captions only")
    (tmp_path / ".thumb.png").write_bytes(png_bytes((8, 8)))
    with pytest.raises(ConfigError, match="no images in") as caught:
        discover(ds(tmp_path))
    assert ".png" in caught.value.hint and "disabled" in caught.value.hint
