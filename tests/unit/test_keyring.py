"""keyring: the card's key record survives a torn write at every byte, its reader takes
anything (fuzzed) and returns a record or nothing, and a boot trusts the newer of the
initramfs's key and the card's; the chain link and public key readers are strict."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rackboot.initramfs.updater import formats, keyring, state
from rackboot.initramfs.updater.bootfiles import RECORD as BOOT_RECORD
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.signature import ED25519_SPKI, MasterKey, Verifier, parse_public_key

KEYS = [MasterKey(n, bytes([n + 1]) * 32) for n in range(4)]


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "card"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    with Disk(str(path)) as d:
        yield d


def built_in(tmp_path, key: MasterKey) -> Verifier:
    path = tmp_path / "master.pub"
    path.write_bytes(key.public_file())
    return Verifier(str(path))


def link(**fields) -> bytes:
    doc = {"format": 1, "n": 1, "key": formats.encode_key(KEYS[1].raw), "retires": KEYS[0].fingerprint, "created": 0}
    return json.dumps({**doc, **fields}).encode()


# --- the record --------------------------------------------------------------------------


def test_the_record_lies_after_the_boot_record_and_before_the_first_partition():
    assert keyring.COPIES[0] >= BOOT_RECORD + 512 and keyring.COPIES[1] == keyring.COPIES[0] + keyring.RESERVED
    assert keyring.COPIES[1] + keyring.RESERVED <= formats.MIN_START_MIB << 20
    assert state.CONFIRM + 512 <= BOOT_RECORD  # nothing else of the updater's lies there


def test_a_blank_card_has_no_record(disk):
    copies = keyring.read_copies(disk)
    assert copies.records == (None, None) and copies.blank and keyring.read(disk) is None


def test_writes_alternate_copies_and_seq_grows(disk):
    first = keyring.write(disk, KEYS[1])
    second = keyring.write(disk, KEYS[2])
    assert (first.seq, first.n, second.seq, second.n) == (1, 1, 2, 2)
    assert keyring.read_copies(disk).records == (first, second) and keyring.read(disk) == second
    third = keyring.write(disk, KEYS[3])
    assert keyring.read_copies(disk).records == (third, second) and keyring.read(disk).master_key == KEYS[3]


def test_record_layout(disk):
    stored = keyring.write(disk, KEYS[1])
    raw = disk.read(keyring.COPIES[0], 4096)
    magic, seq, length = struct.unpack_from("<4sII", raw)
    assert (magic, seq) == (b"RKBK", 1)
    body = raw[12 : 12 + length]
    assert json.loads(body) == {"format": 1, "seq": 1, "n": 1, "key": stored.key} and body == formats.dump(stored)
    assert struct.unpack_from("<I", raw, 12 + length)[0] == zlib.crc32(raw[: 12 + length])


@pytest.mark.parametrize("history", [0, 1, 2])
def test_torn_write_at_every_byte_leaves_the_old_key_or_the_new(disk, history):
    for n in range(1, history + 1):
        keyring.write(disk, KEYS[n])
    old = keyring.read(disk)
    copies = keyring.read_copies(disk)
    target = keyring.COPIES[copies.target()]
    new = keyring.KeyRecord(n=3, key=formats.encode_key(KEYS[3].raw), seq=(old.seq if old else 0) + 1)
    record = keyring.encode(new)
    saved = disk.read(target, keyring.RESERVED)
    for cut in range(len(record) + 1):
        disk.write(target, saved)
        disk.write(target, record[:cut])  # the power went out after `cut` bytes
        assert keyring.read(disk) == (new if cut == len(record) else old), cut


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_any_bytes_is_a_record_or_none(raw):
    got = keyring.decode(keyring.MAGIC + raw)
    assert got is None or isinstance(got, keyring.KeyRecord)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["format", "seq", "n", "key", "x"]), st.integers(-3, 3) | st.text(max_size=50)))
def test_decode_of_any_framed_json_is_a_record_or_none(doc):
    body = json.dumps(doc).encode()
    head = struct.pack("<4sII", b"RKBK", 0, len(body)) + body
    got = keyring.decode(head + struct.pack("<I", zlib.crc32(head)))
    assert got is None or isinstance(got, keyring.KeyRecord)


def test_a_record_whose_seq_disagrees_with_its_header_is_not_taken():
    record = keyring.KeyRecord(n=1, key=formats.encode_key(KEYS[1].raw), seq=5)
    raw = bytearray(keyring.encode(record))
    raw[4:8] = struct.pack("<I", 6)
    raw[-4:] = struct.pack("<I", zlib.crc32(bytes(raw[:-4])))
    assert keyring.decode(bytes(raw)) is None


def test_a_copy_of_a_newer_format_is_neither_read_nor_written_over(disk):
    keyring.write(disk, KEYS[1])
    body = b'{"format":2,"seq":2}\n'
    head = struct.pack("<4sII", b"RKBK", 2, len(body)) + body
    disk.write(keyring.COPIES[1], head + struct.pack("<I", zlib.crc32(head)))
    before = disk.read(keyring.COPIES[0], 2 * keyring.RESERVED)
    with pytest.raises(keyring.NewerRecord, match=r"^key record: the copy at 3 MiB \+ 192 KiB is format 2"):
        keyring.write(disk, KEYS[2])
    assert disk.read(keyring.COPIES[0], 2 * keyring.RESERVED) == before


# --- which key a boot trusts ---------------------------------------------------------------


def trust(disk, tmp_path, own: MasterKey) -> tuple[Verifier, list[str]]:
    lines: list[str] = []
    return keyring.trusted(disk, built_in(tmp_path, own), lines.append), lines


def test_a_blank_card_trusts_the_initramfs_key(disk, tmp_path):
    verifier, lines = trust(disk, tmp_path, KEYS[0])
    assert verifier.key == KEYS[0] and lines == [f"{KEYS[0].name}: the initramfs's"]


def test_a_newer_key_on_the_card_is_trusted_over_the_initramfs_key(disk, tmp_path):
    keyring.write(disk, KEYS[2])
    verifier, lines = trust(disk, tmp_path, KEYS[0])
    assert verifier.key == KEYS[2] and verifier.public_key == keyring.CARD
    assert lines == [f"{KEYS[2].name}: kept on the card (the initramfs has key 0)"]


def test_the_initramfs_key_is_the_floor(disk, tmp_path):
    keyring.write(disk, KEYS[1])
    verifier, lines = trust(disk, tmp_path, KEYS[2])
    assert verifier.key == KEYS[2] and lines == [f"{KEYS[2].name}: the initramfs's (the card keeps key 1)"]


def test_a_record_of_the_same_number_naming_another_key_is_passed_over(disk, tmp_path):
    keyring.write(disk, MasterKey(2, bytes(32)))
    verifier, lines = trust(disk, tmp_path, KEYS[2])
    assert verifier.key == KEYS[2] and "names another key 2 than the initramfs's" in lines[0]


def test_a_damaged_record_falls_back_to_the_initramfs_key_and_says_so(disk, tmp_path):
    keyring.write(disk, KEYS[2])
    keyring.write(disk, KEYS[3])
    for offset in keyring.COPIES:
        disk.write(offset + 20, b"X")
    verifier, lines = trust(disk, tmp_path, KEYS[0])
    assert verifier.key == KEYS[0]
    assert lines == [f"key record: damaged (no whole copy); using the initramfs's {KEYS[0].name}"]


def test_one_torn_copy_leaves_the_other(disk, tmp_path):
    keyring.write(disk, KEYS[2])
    keyring.write(disk, KEYS[3])
    disk.write(keyring.COPIES[1] + 20, b"X")
    assert trust(disk, tmp_path, KEYS[0])[0].key == KEYS[2]


def test_an_unsigned_rack_ignores_the_record(disk):
    keyring.write(disk, KEYS[2])
    verifier = keyring.trusted(disk, Verifier(None), lambda line: None)
    assert not verifier.required and verifier.key is None


# --- the readers -------------------------------------------------------------------------


def test_a_link_is_read():
    got = formats.parse_key_link(link())
    assert (got.n, got.raw, got.retires) == (1, KEYS[1].raw, KEYS[0].fingerprint)


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"n": 0}, "n: must be >= 1, got 0"),
        ({"n": True}, "n: expected an integer"),
        ({"n": 1 << 31}, "n: must be <= 2147483647"),
        ({"key": base64.b64encode(bytes(31)).decode()}, "key: .* is not 32 bytes in base64"),
        ({"key": base64.b64encode(bytes(33)).decode()}, "key: .* is not 32 bytes in base64"),
        ({"key": formats.encode_key(KEYS[1].raw)[:-2] + "R="}, "key: .* is not 32 bytes in base64"),  # stray bits
        ({"key": formats.encode_key(KEYS[1].raw).rstrip("=")}, "key: .* is not 32 bytes in base64"),
        ({"key": formats.encode_key(KEYS[0].raw)}, "key: is the key it retires"),
        ({"retires": KEYS[0].fingerprint.upper()}, "retires: .* is not 64 lowercase hex digits"),
        ({"created": -1}, "created: must be >= 0"),
        ({"format": 2}, r"format: unsupported format 2"),
    ],
)
def test_a_bad_link_is_refused_with_one_line(fields, problem):
    with pytest.raises(UpdaterError, match=rf"^key link: {problem}"):
        formats.parse_key_link(link(**fields))


def test_a_link_without_a_field_is_refused():
    for field in ("n", "key", "retires", "created"):
        doc = json.loads(link())
        del doc[field]
        with pytest.raises(UpdaterError, match=rf"^key link: {field}: missing$"):
            formats.parse_key_link(json.dumps(doc))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_the_link_reader_takes_any_bytes(data):
    try:
        formats.parse_key_link(data)
    except UpdaterError:
        pass


def test_public_key_files():
    pem = KEYS[1].pem()
    assert parse_public_key(pem, "f") == MasterKey(0, KEYS[1].raw)
    assert parse_public_key(b"rackboot master key 7\n" + pem, "f") == MasterKey(7, KEYS[1].raw)
    spki_ed448 = base64.b64encode(bytes.fromhex("302a300506032b6571032100") + bytes(32))  # Ed448's OID
    for bad in (
        b"rackboot master key 07\n" + pem,
        b"hello\n" + pem,
        pem.replace(b"PUBLIC", b"PRIVATE"),
        b"-----BEGIN PUBLIC KEY-----\n" + spki_ed448 + b"\n-----END PUBLIC KEY-----\n",
        b"-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(ED25519_SPKI + bytes(31)) + b"\n-----END PUBLIC KEY-----\n",
        b"rackboot master key 1\n" + pem + b"trailing\n",
        b"\xff" + pem,
    ):
        with pytest.raises(UpdaterError, match="^f: not an Ed25519 public key in PEM"):
            parse_public_key(bad, "f")


def test_a_key_file_that_does_not_read_refuses_every_check(tmp_path):
    path = tmp_path / "master.pub"
    path.write_bytes(b"not a key\n")
    verifier = Verifier(str(path))
    assert verifier.required and verifier.key is None
    with pytest.raises(UpdaterError, match=r"^/plans/x.json: cannot check the signature: master key .* not an Ed25519"):
        verifier.check("/plans/x.json", b"{}", bytes(64))


# --- the walk ------------------------------------------------------------------------------


def golden_chain() -> dict[str, bytes]:
    """keys/1.json (the golden sample, signed by key 0) and keys/2.json (signed by key 1)."""
    from rackboot.master import signing

    from tests.data import make_golden_keys as golden

    second = formats.KeyLink(
        n=2,
        key=formats.encode_key(golden.key(golden.KEY2).raw),
        retires=golden.key(golden.KEY1).fingerprint,
        created=golden.CREATED,
    )
    link2 = formats.dump(second)
    first = (golden.HERE / "keychain.format1.rev1.json").read_bytes()
    return {
        "/keys/1.json": first,
        "/keys/1.json.sig": signing.sign(golden.KEY0, first),
        "/keys/2.json": link2,
        "/keys/2.json.sig": signing.sign(golden.KEY1, link2),
    }


def test_the_walk_takes_every_link_and_ends_at_the_first_missing_one():
    from tests.data import make_golden_keys as golden

    lines: list[str] = []
    start = Verifier(str(golden.KEYS / "test-master.key.pub"))
    followed = keyring.follow(golden_chain().get, start, lines.append)
    assert followed.stopped is None and followed.verifier.key == golden.key(golden.KEY2)
    assert [line.split(" from ")[1] for line in lines] == [
        "/keys/1.json: signed by key 0, which it retires",
        "/keys/2.json: signed by key 1, which it retires",
    ]
    assert keyring.follow(golden_chain().get, start, lines.append, limit=1).verifier.key.n == 1  # the next boot goes on


def test_a_master_that_stops_answering_mid_walk_keeps_the_keys_taken():
    from tests.data import make_golden_keys as golden

    chain = golden_chain()

    def get(path: str) -> bytes | None:
        if path.startswith("/keys/2"):
            raise UpdaterError("master http://10.0.2.2:8080: GET /keys/2.json: timed out (after 4 attempts)")
        return chain.get(path)

    followed = keyring.follow(get, Verifier(str(golden.KEYS / "test-master.key.pub")), lambda line: None)
    assert followed.verifier.key == golden.key(golden.KEY1)
    assert type(followed.stopped) is UpdaterError and "timed out" in str(followed.stopped)
