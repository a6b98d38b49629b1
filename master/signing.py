"""The master's Ed25519 key: made, and used to sign plans and manifests, by Debian's
openssl (the same binary the worker verifies with). A document at PATH gets PATH.sig,
the 64 raw signature bytes over PATH's exact bytes. Keys are numbered (key 0 first, then
one more per rotation: keychain.py); a key's public file says its number on a line before
the PEM (updater signature.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rackboot.errors import RackbootError
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.signature import MasterKey, parse_public_key
from rackboot.proc import run


def public_key_path(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def keygen(private: Path, number: int = 0) -> Path:
    """A new key pair: ``private`` (mode 0600) and ``private``.pub, master key ``number``.
    Never overwrites."""
    public = public_key_path(private)
    for path in (private, public):
        if path.exists():
            raise RackbootError(f"{path} exists; rackboot keygen never overwrites a key")
    private.parent.mkdir(parents=True, exist_ok=True)
    pem = run(["openssl", "genpkey", "-algorithm", "ed25519"], f"cannot make a key for {private}")
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    derived = run(["openssl", "pkey", "-in", str(private), "-pubout"], f"cannot derive {public}")
    key = _parse(derived, f"openssl's public key for {private}")
    public.write_bytes(MasterKey(number, key.raw).public_file())
    return public


def read_public(public: Path) -> MasterKey:
    """The master key in a public key file: its number and raw bytes."""
    try:
        data = public.read_bytes()
    except OSError as e:
        raise RackbootError(f"cannot read {public}: {e.strerror}") from None
    return _parse(data, str(public))


def _parse(data: bytes, where: str) -> MasterKey:
    try:
        return parse_public_key(data, where)
    except UpdaterError as e:
        raise RackbootError(str(e)) from None


def check_key(private: Path) -> None:
    if not private.is_file():
        raise RackbootError(f"signing key {private} does not exist (make one with rackboot keygen)")
    if not public_key_path(private).is_file():
        raise RackbootError(f"signing key {private} has no {public_key_path(private).name} beside it")


def sign(private: Path, data: bytes) -> bytes:
    check_key(private)
    # pkeyutl -rawin needs a file for Ed25519 (it sizes its one-shot input), so no stdin
    with tempfile.NamedTemporaryFile(prefix="rackboot-sign-") as doc:
        doc.write(data)
        doc.flush()
        return run(
            ["openssl", "pkeyutl", "-sign", "-inkey", str(private), "-rawin", "-in", doc.name],
            f"cannot sign with {private}",
            missing="apt-get install openssl",
        )
