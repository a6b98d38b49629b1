"""A signed rack for the updater tests: helpers that publish, sign and run one boot's
update. Its fixtures (keys, a real HTTP master on loopback, a blank file-backed card) are
in tests/integration/conftest.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rackboot.initramfs.updater import state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import signing

from tests.integration.updater_master import MAC, NODE, image_bytes, publish, write_plan


def sign(root: Path, url_path: str, key: Path) -> None:
    doc = root / url_path.lstrip("/")
    (doc.parent / (doc.name + ".sig")).write_bytes(signing.sign(key, doc.read_bytes()))


def release(root: Path, version: int, key: Path | None, *, hooks: Sequence = (), **plan) -> str:
    """Publish and assign ``version`` (with manifest ``hooks``); sign both documents with
    ``key`` (None: unsigned)."""
    manifest = publish(root, version, image_bytes(version), hooks=tuple(hooks))
    write_plan(root, manifest, **plan)
    if key:
        sign(root, manifest, key)
        sign(root, f"/plans/{NODE}.json", key)
    return manifest


def update(card: str, server, keys: dict | None, log=lambda m: None) -> object:
    """One boot's update; ``keys`` None is a card built without the master's key."""
    master = MasterClient(
        server.url, connect_timeout=1.0, read_timeout=2.0, retries=1, backoff=0.01, report_timeout=0.5
    )
    verifier = Verifier(str(signing.public_key_path(keys["master"])) if keys else None)
    return run(card, server.url, Identity(MAC), master=master, log=log, verifier=verifier)


def primary(card: str) -> tuple:
    with Disk(card, writable=False) as d:
        st = state.read(d)
    return st.primary, st.slot(st.primary).version if st.primary else None


def slot(card: str, name: str):
    with Disk(card, writable=False) as d:
        return state.read(d).slot(name)
