"""Ed25519 signatures over the master's documents, checked with Debian's openssl binary.

A plan or manifest at PATH is signed by PATH.sig: the 64 raw bytes of an Ed25519
signature over the document's exact bytes. The worker's initramfs carries the master's
public key; when it does, every document must verify before a byte of it is used, and
no key means an unsigned rack (the builder only leaves it out when the config names no
key). The crypto is openssl's, run as a process: nothing here computes a signature.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

from .errors import Refused

SIGNATURE_BYTES = 64
PUBLIC_KEY = "/etc/rackboot/master.pub"
OPENSSL = "openssl"


class Verifier:
    def __init__(self, public_key: str | None, openssl: str = OPENSSL):
        self.public_key = public_key
        self.openssl = openssl

    @property
    def required(self) -> bool:
        return self.public_key is not None

    def check(self, what: str, data: bytes, signature: bytes) -> None:
        """Return quietly when ``signature`` is the master's over ``data``; else Refused."""
        if self.public_key is None:
            raise Refused(f"{what}: this card has no master key to check the signature with")
        if len(signature) != SIGNATURE_BYTES:
            raise Refused(f"{what}: signature is {len(signature)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}")
        with tempfile.TemporaryDirectory(prefix="rackboot-sig-") as tmp:
            doc, sig = os.path.join(tmp, "doc"), os.path.join(tmp, "sig")
            for path, content in ((doc, data), (sig, signature)):
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
                        self.public_key,
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
            raise Refused(f"{what}: signature does not verify with the master's key {self.public_key}")


def from_environment(path: str = PUBLIC_KEY) -> Verifier:
    """The initramfs's key if it has one: then every document must be signed."""
    return Verifier(path if os.path.exists(path) else None)
