"""Shared fixtures: configs written into tmp dirs, built against the real Debian cache.
Plain helpers live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from rackboot import build, config

from tests.helpers import quiet, write_config


@pytest.fixture(scope="session")
def probe_build(tmp_path_factory) -> Path:
    """An arm64 probe build (no updater), built once per session."""
    directory = tmp_path_factory.mktemp("probe-arm64")
    return build.build(config.load(write_config(directory)), log=quiet)
