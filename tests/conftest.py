"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sdxl_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model.hub_cache_dir holding the tiny SDXL, built once for the session."""
    from job.models.sdxl_tiny import ensure_tiny_sdxl

    folder = tmp_path_factory.mktemp("models")
    ensure_tiny_sdxl(folder / "tunejob-tiny" / "sdxl")
    return folder


@pytest.fixture
def restore_logging():
    """For a test that reconfigures structlog (setup_logging): the configuration it found
    is put back afterwards, so later tests' log lines go where they did."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
