"""ensure_writable: a folder proved writable leaves nothing behind; a refusal is exit 2."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from job.errors import EXIT_BAD_JOB, ConfigError, ensure_writable


def test_probes_of_many_writers_leave_an_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "out" / "job"
    # Ranks on several hosts probe one shared folder at once (same PIDs are possible there).
    with ThreadPoolExecutor(max_workers=8) as pool:
        done = list(pool.map(lambda _: ensure_writable(folder, "job.output_dir"), range(200)))
    assert done == [folder] * 200 and list(folder.iterdir()) == []


def test_a_folder_that_cannot_be_made_is_exit_2_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as caught:
        ensure_writable(tmp_path / "file" / "out", "cache.dir")
    assert caught.value.exit_code == EXIT_BAD_JOB
    assert "cache.dir" in caught.value.message and "point cache.dir at" in caught.value.hint
