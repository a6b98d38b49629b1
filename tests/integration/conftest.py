"""The signed rack's fixtures for the updater tests (helpers in signed_rack.py): keys made
by rackboot's builder (openssl), a real HTTP master on loopback, a blank file-backed card.
A test module that defines its own ``server`` or ``card`` fixture overrides these."""

from __future__ import annotations

from pathlib import Path

import pytest
from rackboot.master import signing

from tests.integration.updater_master import Server

CARD = 256 << 20


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    return {name: d / f"{name}.key" for name in ("master", "other") if signing.keygen(d / f"{name}.key")}


@pytest.fixture
def server(tmp_path):
    (tmp_path / "master").mkdir()
    srv = Server(tmp_path / "master")
    yield srv.master
    srv.close()


@pytest.fixture
def card(tmp_path):
    path = tmp_path / "card.img"
    with open(path, "wb") as f:
        f.truncate(CARD)
    return str(path)
