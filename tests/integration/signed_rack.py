"""A signed rack for the updater tests: keys made by rackboot's builder (openssl), a real
HTTP master on loopback, a blank file-backed card, and helpers that publish, sign and
run one boot's update. Fixtures here are imported by the test modules that use them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import pytest

from rackboot.master import signing
from rackboot.initramfs.updater import state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.signature import Verifier

from updater_master import MAC, NODE, Server, image_bytes, publish, write_plan

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


def sign(root: Path, url_path: str, key: Path) -> None:
    doc = root / url_path.lstrip("/")
    (doc.parent / (doc.name + ".sig")).write_bytes(signing.sign(key, doc.read_bytes()))


def release(root: Path, version: int, key: Optional[Path], *, hooks: Sequence = (), **plan) -> str:
    """Publish and assign ``version`` (with manifest ``hooks``); sign both documents with
    ``key`` (None: unsigned)."""
    manifest = publish(root, version, image_bytes(version), hooks=tuple(hooks))
    write_plan(root, manifest, **plan)
    if key:
        sign(root, manifest, key)
        sign(root, f"/plans/{NODE}.json", key)
    return manifest


def update(card: str, server, keys: Optional[dict], log=lambda m: None) -> object:
    """One boot's update; ``keys`` None is a card built without the master's key."""
    master = MasterClient(server.url, connect_timeout=1.0, read_timeout=2.0, retries=1, backoff=0.01,
                          report_timeout=0.5)
    verifier = Verifier(str(signing.public_key_path(keys["master"])) if keys else None)
    return run(card, server.url, Identity(MAC), master=master, log=log, verifier=verifier)


def primary(card: str) -> tuple:
    with Disk(card, writable=False) as d:
        st = state.read(d)
    return st.primary, st.slot(st.primary).version if st.primary else None


def slot(card: str, name: str):
    with Disk(card, writable=False) as d:
        return state.read(d).slot(name)
