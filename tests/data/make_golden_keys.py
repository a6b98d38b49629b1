"""Make the key chain's golden samples in tests/data with today's code (the revision that wrote them).

Run from the repository:  .venv/bin/python tests/data/make_golden_keys.py
The link keys/1.json (formats.KeyLink rev1: master key 1 = keys/test-master-1.key,
retiring key 0 = keys/test-master.key) and its .sig by key 0; the card's key record rev1
(keyring.py: both copies, 128 KiB from 3 MiB + 128 KiB) after a card took key 1, then key 2
(keys/test-master-2.key). The test keys 1 and 2 are made once (with their number line) and
never remade; everything else is rewritten with identical bytes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rackboot.initramfs.updater import formats, keyring
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.signature import MasterKey
from rackboot.master import signing

HERE = Path(__file__).resolve().parent
KEYS = HERE / "keys"
KEY0 = KEYS / "test-master.key"  # key 0: the other samples' key
KEY1 = KEYS / "test-master-1.key"
KEY2 = KEYS / "test-master-2.key"
CREATED = 1700000000
CARD = 4 << 20  # the record lies in the card's first 4 MiB


def ensure_keys() -> None:
    for number, key in ((1, KEY1), (2, KEY2)):
        if not key.exists():
            signing.keygen(key, number=number)


def key(path: Path) -> MasterKey:
    return signing.read_public(signing.public_key_path(path))


def link() -> formats.KeyLink:
    return formats.KeyLink(n=1, key=formats.encode_key(key(KEY1).raw), retires=key(KEY0).fingerprint, created=CREATED)


def record_area() -> bytes:
    """Both copies of the key record after a card took key 1 (seq 1, copy 1), then key 2 (seq 2, copy 2)."""
    with tempfile.TemporaryDirectory() as tmp:
        card = os.path.join(tmp, "card")
        with open(card, "wb") as f:
            f.truncate(CARD)
        with Disk(card) as d:
            for path in (KEY1, KEY2):
                keyring.write(d, key(path))
            return b"".join(d.read(offset, keyring.RESERVED) for offset in keyring.COPIES)


def main() -> None:
    ensure_keys()
    data = formats.dump(link())
    (HERE / "keychain.format1.rev1.json").write_bytes(data)
    (HERE / "keychain.format1.rev1.json.sig").write_bytes(signing.sign(KEY0, data))
    (HERE / "key-record.format1.rev1.bin").write_bytes(record_area())
    print(f"keychain.format1.rev1.json: {len(data)} bytes, signed; key-record.format1.rev1.bin")


if __name__ == "__main__":
    main()
