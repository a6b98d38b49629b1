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


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session (tests/postgres.py); its .database() is a fresh one."""
    from tests import postgres as pg

    bin = pg.bindir()
    if bin is None:
        pytest.fail("PostgreSQL's server binaries are not installed (make deps installs Debian's postgresql)")
    server = pg.Server(bin).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> str:
    """The [master] database value a fleet test runs against, once per backend: '' (the
    SQLite file in the master's tree) and a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("postgres").database())


def pytest_collection_modifyitems(config, items):
    """A test marked sqlite_only (about the SQLite file itself) runs once, on SQLite: its
    PostgreSQL case is deselected, not skipped, so no skip is left in the run."""
    keep, drop = [], []
    for item in items:
        on_postgres = getattr(item, "callspec", None) and item.callspec.params.get("database") == "postgresql"
        (drop if on_postgres and item.get_closest_marker("sqlite_only") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
