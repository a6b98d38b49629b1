"""The master's Ed25519 key: made, and used to sign plans and manifests, by Debian's
openssl (the same binary the worker verifies with). A document at PATH gets PATH.sig,
the 64 raw signature bytes over PATH's exact bytes."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from rackboot.errors import RackbootError


def public_key_path(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def _openssl(args: list[str], what: str, data: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(["openssl", *args], input=data, capture_output=True)
    except FileNotFoundError:
        raise RackbootError("openssl is not installed; rackboot signs with it") from None
    if done.returncode != 0:
        detail = (done.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
        raise RackbootError(f"{what}: {detail}")
    return done.stdout


def keygen(private: Path) -> Path:
    """A new key pair: ``private`` (mode 0600) and ``private``.pub. Never overwrites."""
    public = public_key_path(private)
    for path in (private, public):
        if path.exists():
            raise RackbootError(f"{path} exists; rackboot keygen never overwrites a key")
    private.parent.mkdir(parents=True, exist_ok=True)
    pem = _openssl(["genpkey", "-algorithm", "ed25519"], f"cannot make a key for {private}")
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(_openssl(["pkey", "-in", str(private), "-pubout"], f"cannot derive {public}"))
    return public


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
        return _openssl(["pkeyutl", "-sign", "-inkey", str(private), "-rawin", "-in", doc.name],
                        f"cannot sign with {private}")
