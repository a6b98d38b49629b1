"""`rackboot keygen --rotate` on a master tree: the new key named by keys/<n>.json, signed
by the old key, the old one kept aside out of the served tree, every signed document
signed again; and every refusal or failure one line, exit 2, and nothing changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import Refused
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import bootfiles, keychain, signing

from tests.helpers import write_config
from tests.integration.signed_rack import release, sign
from tests.integration.updater_master import NODE, publish

PLAN = f"plans/{NODE}.json"


def rackboot(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "rackboot", *args], capture_output=True, text=True, timeout=120, env=env
    )


class Tree:
    """A config whose [master] key is keys/master.key, and a master tree of signed documents."""

    def __init__(self, base: Path, key: str = "keys/master.key"):
        self.base = base
        self.config = write_config(base, master={"key": key})
        self.root = base / "master"
        self.root.mkdir()
        self.key = base / key
        signing.keygen(self.key)
        release(self.root, 1, self.key)  # a manifest and a node's plan
        release(self.root, 2, self.key)
        publish(self.root, 3, b"unsigned version")  # published before the rack had a key
        image = base / "boot.vfat"
        image.write_bytes(bytes(range(256)) * 64)
        self.boot = bootfiles.publish_image(image, self.root, key=self.key)

    def signed(self) -> list[Path]:
        docs = [self.root / PLAN, self.root / self.boot.lstrip("/")]
        return docs + [self.root / formats.manifest_path("example", v).lstrip("/") for v in (1, 2)]

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        """Every file under the base: its bytes and mode."""
        return {
            str(p.relative_to(self.base)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(self.base.rglob("*"))
            if p.is_file()
        }


@pytest.fixture
def tree(tmp_path):
    return Tree(tmp_path)


def verifies(public: Path, doc: Path) -> bool:
    try:
        Verifier(str(public)).check(str(doc), doc.read_bytes(), keychain.sig_path(doc).read_bytes())
    except Refused:
        return False
    return True


def test_rotate_from_the_command_line(tree):
    old_private, old_public = tree.key.read_bytes(), signing.public_key_path(tree.key).read_bytes()
    docs = {doc: doc.read_bytes() for doc in tree.signed()}
    done = rackboot("keygen", "--rotate", "-c", str(tree.config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("master key 1 (sha256 ") and len(done.stdout.splitlines()) == 1
    assert "4 signed documents signed again" in done.stdout
    keys = tree.key.parent
    # the old key kept aside, private, beside [master] key and out of the served tree
    assert (keys / "master.key.0").read_bytes() == old_private and (keys / "master.key.0").stat().st_mode & 0o077 == 0
    assert (keys / "master.key.0.pub").read_bytes() == old_public
    assert not [p for p in tree.root.rglob("*") if ".key" in p.name]
    old, new = signing.read_public(keys / "master.key.0.pub"), signing.read_public(keys / "master.key.pub")
    assert (old.n, new.n) == (0, 1) and old.raw != new.raw and tree.key.read_bytes() != old_private
    assert tree.key.stat().st_mode & 0o077 == 0
    # keys/1.json names the new key and the old one's retirement, signed by the old key
    link = tree.root / "keys" / "1.json"
    assert formats.parse_key_link(link.read_bytes()) == formats.KeyLink(
        n=1, key=formats.encode_key(new.raw), retires=old.fingerprint, created=0
    )
    assert verifies(keys / "master.key.0.pub", link) and not verifies(keys / "master.key.pub", link)
    # every signed document signed again by the new key, its bytes unchanged; unsigned stays so
    for doc, data in docs.items():
        assert doc.read_bytes() == data
        assert verifies(keys / "master.key.pub", doc) and not verifies(keys / "master.key.0.pub", doc), doc
    assert not keychain.sig_path(tree.root / formats.manifest_path("example", 3).lstrip("/")).exists()
    # [master] key signs with the new key from now on
    signed_now = signing.sign(tree.key, b"later")
    Verifier(str(keys / "master.key.pub")).check("later", b"later", signed_now)
    again = rackboot("keygen", "--rotate", "-c", str(tree.config))
    assert again.returncode == 0, again.stderr
    assert formats.parse_key_link((tree.root / "keys/2.json").read_bytes()).retires == new.fingerprint
    assert (keys / "master.key.1").read_bytes() != old_private and signing.read_public(keys / "master.key.pub").n == 2


def test_the_link_is_stamped_with_the_source_date_epoch(tree):
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    assert rackboot("keygen", "--rotate", "-c", str(tree.config), env=env).returncode == 0
    assert formats.parse_key_link((tree.root / "keys/1.json").read_bytes()).created == 1700000000


def spoil(tree: Tree, how: str, keys) -> str:
    """Make the next rotation refuse; the one-line message it must give."""
    if how == "bad-signature":
        sign(tree.root, f"/{PLAN}", keys["other"])
        return f"{PLAN}: signature does not verify with master key 0"
    if how == "link-exists":
        (tree.root / "keys").mkdir()
        (tree.root / "keys/1.json").write_text("{}\n")
        return "keys/1.json exists: the chain already has a key 1, yet [master] key is key 0"
    if how == "retired-exists":
        tree.key.with_name("master.key.0").write_text("old\n")
        return "master.key.0 exists: key 0 was kept aside there by an earlier rotation"
    if how == "gap":
        keychain.rotate(tree.key, tree.root)
        keychain.rotate(tree.key, tree.root)
        (tree.root / "keys/1.json").unlink()
        return "keys/1.json is missing: cards holding key 0 could not follow the chain to key 2"
    if how == "foreign-chain":
        keychain.rotate(tree.key, tree.root)
        (tree.root / "keys/1.json").write_bytes((tree.root / "keys/1.json").read_bytes().replace(b'"n":1', b'"n":3'))
        return "keys/1.json does not follow /keys/0.json: the chain is broken"
    if how == "no-openssl":
        return "cannot make a key"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["bad-signature", "link-exists", "retired-exists", "gap", "foreign-chain", "no-openssl"]
)
def test_a_refused_rotation_is_one_line_exit_2_and_changes_nothing(tree, keys, how):
    message = spoil(tree, how, keys)
    before = tree.snapshot()
    env = {**os.environ, "PATH": str(tree.base / "nowhere")} if how == "no-openssl" else None
    done = rackboot("keygen", "--rotate", "-c", str(tree.config), env=env)
    assert done.returncode == 2 and done.stderr.startswith("rackboot: error: ") and message in done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stdout == ""
    assert tree.snapshot() == before
    assert not [p for p in tree.key.parent.iterdir() if p.name.startswith(".")]  # no new key left half made


def test_a_key_inside_the_served_tree_is_not_rotated(tmp_path):
    tree = Tree(tmp_path, key="master/secret/master.key")
    before = tree.snapshot()
    done = rackboot("keygen", "--rotate", "-c", str(tree.config))
    assert done.returncode == 2 and "is inside [master] directory" in done.stderr
    assert tree.snapshot() == before


def test_a_rotation_without_a_key_says_so(tmp_path):
    config = write_config(tmp_path, master={"key": "keys/master.key"})
    done = rackboot("keygen", "--rotate", "-c", str(config))
    assert done.returncode == 2 and "does not exist (make one with rackboot keygen)" in done.stderr


@pytest.mark.parametrize("fail_at", range(1, 7))  # the link's .sig, the link, the 4 documents' .sig
def test_a_failure_while_committing_undoes_the_rotation(tree, monkeypatch, fail_at):
    """A disk failing mid-commit (a fault injected into the writer: no other way to cause it)."""
    before = tree.snapshot()
    real = keychain.atomic_write_bytes
    calls = []

    def failing(path, data):
        calls.append(path)
        if len(calls) == fail_at:
            raise RackbootError(f"cannot write {path}: Input/output error")
        real(path, data)

    monkeypatch.setattr(keychain, "atomic_write_bytes", failing)
    with pytest.raises(keychain.KeyChainError, match=r"^key rotation undone: cannot write .*Input/output error$"):
        keychain.rotate(tree.key, tree.root)
    assert tree.snapshot() == before
    assert not (tree.root / "keys/1.json").exists() and not tree.key.with_name("master.key.0").exists()
