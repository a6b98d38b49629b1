"""The key chain's golden samples (tests/data/make_golden_keys.py): today's code reads the
link keys/1.json and the card's key record, writes both byte for byte, the link's
signature by key 0 verifies on the worker, and a worker holding key 0 takes key 1 from it."""

from __future__ import annotations

import json
import subprocess

import pytest
from rackboot.initramfs.updater import formats, keyring
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.signature import MasterKey, Verifier, parse_public_key
from rackboot.master import signing

from tests.data import make_golden_keys as golden

DATA = golden.HERE
LINK = "keychain.format1.rev1.json"
RECORD = "key-record.format1.rev1.bin"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def public(path) -> str:
    return str(signing.public_key_path(path))


def test_link_rev1_is_read_and_written_byte_for_byte():
    link = formats.parse_key_link(sample(LINK))
    assert link == golden.link() and (link.n, link.created) == (1, 1700000000)
    assert link.raw == golden.key(golden.KEY1).raw and link.retires == golden.key(golden.KEY0).fingerprint
    assert formats.dump(link) == sample(LINK)


def test_link_signature_verifies_with_key_0_and_is_remade_byte_for_byte():
    Verifier(public(golden.KEY0)).check(LINK, sample(LINK), sample(LINK + ".sig"))
    assert signing.sign(golden.KEY0, sample(LINK)) == sample(LINK + ".sig")
    with pytest.raises(UpdaterError, match="does not verify with master key 1"):
        Verifier(public(golden.KEY1)).check(LINK, sample(LINK), sample(LINK + ".sig"))


def test_a_worker_holding_key_0_takes_key_1_from_the_sample():
    served = {"/keys/1.json": sample(LINK), "/keys/1.json.sig": sample(LINK + ".sig")}
    taken = keyring.step(served.get, Verifier(public(golden.KEY0)))
    assert taken is not None and taken.key == MasterKey(1, golden.key(golden.KEY1).raw)


def test_unknown_keys_are_tolerated_and_a_higher_format_is_refused_by_name():
    doc = json.loads(sample(LINK))
    assert formats.parse_key_link(json.dumps({**doc, "later_addition": [1]})) == formats.parse_key_link(sample(LINK))
    with pytest.raises(UpdaterError, match=r"^key link: format: unsupported format 2 \(this updater reads 1\)$"):
        formats.parse_key_link(json.dumps({**doc, "format": 2}))


def test_key_record_rev1_is_read_and_written_byte_for_byte(tmp_path):
    card = tmp_path / "card"
    with open(card, "wb") as f:
        f.truncate(golden.CARD)
        f.seek(keyring.COPIES[0])
        f.write(sample(RECORD))
    with Disk(str(card), writable=False) as d:
        copies = keyring.read_copies(d)
    first, second = copies.records
    assert first == keyring.KeyRecord(n=1, key=formats.encode_key(golden.key(golden.KEY1).raw), seq=1)
    assert second == keyring.KeyRecord(n=2, key=formats.encode_key(golden.key(golden.KEY2).raw), seq=2)
    assert copies.newest() == second and not copies.blank
    assert len(sample(RECORD)) == 2 * keyring.RESERVED and keyring.COPIES[1] - keyring.COPIES[0] == keyring.RESERVED
    assert golden.record_area() == sample(RECORD)


@pytest.mark.parametrize("name, n", [("test-master.key", 0), ("test-master-1.key", 1), ("test-master-2.key", 2)])
def test_public_key_files_say_their_number_and_openssl_reads_them(name, n):
    path = DATA / "keys" / name
    data = signing.public_key_path(path).read_bytes()
    key = parse_public_key(data, name)
    assert key.n == n and key.public_file() == data
    derived = subprocess.run(["openssl", "pkey", "-in", str(path), "-pubout"], capture_output=True, check=True).stdout
    assert derived == key.pem()  # the PEM after the number line is openssl's own
