"""Ed25519 signatures over the master's documents, checked with Debian's openssl binary.

A plan or manifest at PATH is signed by PATH.sig: the 64 raw bytes of an Ed25519
signature over the document's exact bytes. The worker's initramfs carries the master's
public key; when it does, every document must verify before a byte of it is used, and
no key means an unsigned rack (the builder only leaves it out when the config names no
key). The crypto is openssl's, run as a process: nothing here computes a signature.

Master keys are numbered: the first is key 0, and each rotation's key the next number
(keyring.py follows the chain). A public key file is openssl's PEM, after one line
``rackboot master key <n>`` for keys after the first (RFC 7468 lets text precede the
PEM; openssl skips it). The key is checked in as its 32 raw bytes, and handed to openssl
as the PEM of exactly those bytes, so the key a signature is checked with is the key
whose fingerprint the chain compared.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from .errors import Refused, UpdaterError
from .formats import KEY_BYTES, MAX_KEY_NUMBER, fingerprint

SIGNATURE_BYTES = 64
PUBLIC_KEY = "/etc/rackboot/master.pub"
OPENSSL = "openssl"
# RFC 8410: the DER SubjectPublicKeyInfo of an Ed25519 key is this prefix, then its 32 bytes
ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")
NUMBER_LINE = "rackboot master key {n}"
_NUMBER_RE = re.compile(r"rackboot master key (0|[1-9][0-9]{0,9})")
_PEM_RE = re.compile(r"-----BEGIN PUBLIC KEY-----\n([A-Za-z0-9+/=\n]{1,200})\n-----END PUBLIC KEY-----\n?")
MAX_KEY_FILE = 4096


@dataclass(frozen=True)
class MasterKey:
    """Master key ``n``: its 32 raw public bytes."""

    n: int
    raw: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.raw)

    @property
    def name(self) -> str:
        return f"master key {self.n} (sha256 {self.fingerprint[:16]})"

    def pem(self) -> bytes:
        """The PEM openssl reads (and `openssl pkey -pubout` writes) for these bytes."""
        body = base64.b64encode(ED25519_SPKI + self.raw)
        return b"-----BEGIN PUBLIC KEY-----\n" + body + b"\n-----END PUBLIC KEY-----\n"

    def public_file(self) -> bytes:
        """The key's public file: its number line (after the first key), then the PEM."""
        return (NUMBER_LINE.format(n=self.n).encode() + b"\n" if self.n else b"") + self.pem()


def parse_public_key(data: bytes, where: str) -> MasterKey:
    """A public key file's key: ``[rackboot master key <n>\\n]`` then an Ed25519 PEM;
    UpdaterError naming ``where`` for anything else."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UpdaterError(f"{where}: not an Ed25519 public key in PEM (not ASCII)") from None
    n = 0
    first, _, rest = text.partition("\n")
    if number := _NUMBER_RE.fullmatch(first):
        n, text = int(number.group(1)), rest
    if n > MAX_KEY_NUMBER:
        raise UpdaterError(f"{where}: key number {n} is above {MAX_KEY_NUMBER}")
    pem = _PEM_RE.fullmatch(text)
    try:
        der = base64.b64decode(pem.group(1).replace("\n", ""), validate=True) if pem else b""
    except binascii.Error:
        der = b""
    if len(der) != len(ED25519_SPKI) + KEY_BYTES or not der.startswith(ED25519_SPKI):
        raise UpdaterError(f"{where}: not an Ed25519 public key in PEM")
    return MasterKey(n, der[len(ED25519_SPKI) :])


def read_public_key(path: str) -> MasterKey:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise UpdaterError(f"master key {path}: cannot read: {e.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise UpdaterError(f"master key {path}: larger than {MAX_KEY_FILE} bytes")
    return parse_public_key(data, f"master key {path}")


class Verifier:
    """Checks signatures with one master key, or (``public_key`` None) is an unsigned rack's.
    ``public_key`` names where the key came from: the file it is read from, unless ``key``
    is given (a key the chain or the card handed over)."""

    def __init__(self, public_key: str | None, openssl: str = OPENSSL, *, key: MasterKey | None = None):
        self.public_key = public_key
        self.openssl = openssl
        self.problem: str | None = None  # why a key file gave no key: every check is then refused
        if key is None and public_key is not None:
            try:
                key = read_public_key(public_key)
            except UpdaterError as e:
                self.problem = str(e)
        self.key = key

    @property
    def required(self) -> bool:
        return self.public_key is not None

    def successor(self, key: MasterKey, source: str) -> Verifier:
        """A verifier of ``key`` (from ``source``), running the same openssl."""
        return Verifier(source, self.openssl, key=key)

    def check(self, what: str, data: bytes, signature: bytes) -> None:
        """Return quietly when ``signature`` is the master's over ``data``; else Refused."""
        if self.public_key is None:
            raise Refused(f"{what}: this card has no master key to check the signature with")
        if self.key is None:
            raise Refused(f"{what}: cannot check the signature: {self.problem}")
        if len(signature) != SIGNATURE_BYTES:
            raise Refused(f"{what}: signature is {len(signature)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}")
        with tempfile.TemporaryDirectory(prefix="rackboot-sig-") as tmp:
            key, doc, sig = (os.path.join(tmp, name) for name in ("key.pem", "doc", "sig"))
            for path, content in ((key, self.key.pem()), (doc, data), (sig, signature)):
                with open(path, "wb") as f:
                    f.write(content)
            try:
                done = subprocess.run(
                    [
                        self.openssl,
                        "pkeyutl",
                        "-verify",
                        "-pubin",
                        "-inkey",
                        key,
                        "-rawin",
                        "-in",
                        doc,
                        "-sigfile",
                        sig,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    timeout=30,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise Refused(f"{what}: cannot run {self.openssl} to check the signature: {e}") from None
        if done.returncode != 0:
            raise Refused(f"{what}: signature does not verify with {self.key.name}")


def from_environment(path: str = PUBLIC_KEY) -> Verifier:
    """The initramfs's key if it has one: then every document must be signed."""
    return Verifier(path if os.path.exists(path) else None)
