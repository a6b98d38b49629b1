"""The node's key on the card (updater/nodekey.py) and what the master makes of its signatures
(master/nodekeys.py): keys made and reports signed by the real openssl, checked in process
and by openssl; the
record's round trip, every torn write, damage, a card in another board, fuzzed bytes."""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from dataclasses import replace

import pytest
from rackboot.initramfs.updater import formats, nodekey
from rackboot.initramfs.updater import report as reports
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import Phase, Report
from rackboot.master import nodekeys

NODE = "52-54-00-12-34-56"
OTHER = "52-54-00-12-34-57"
CARD = 4 << 20


@pytest.fixture(scope="module")
def key() -> nodekey.NodeKey:
    return nodekey.generate(NODE)


@pytest.fixture(scope="module")
def stranger() -> nodekey.NodeKey:
    return nodekey.generate(NODE)


@pytest.fixture
def card(tmp_path) -> str:
    path = tmp_path / "card"
    with open(path, "wb") as f:
        f.truncate(CARD)
    return str(path)


def copies_with(first: bytes = b"", second: bytes = b"") -> tuple[bytes, bytes]:
    """The two copies' reserved areas holding these bytes at their start, zero after."""
    return tuple(raw + bytes(nodekey.RESERVED - len(raw)) for raw in (first, second))  # type: ignore[return-value]


def test_a_key_made_by_openssl_signs_what_the_master_verifies(key, stranger):
    assert len(key.public) == len(key.private) == 32 and key.public != stranger.public
    body = b'{"node":"52-54-00-12-34-56","phase":"boot"}\n'
    signature = key.sign(body)
    verify = nodekeys.Verifier()
    assert verify(key.public_b64, body, signature)
    assert not verify(key.public_b64, body.replace(b"boot", b"confirm"), signature)
    assert not verify(stranger.public_b64, body, signature)
    assert key.fingerprint.startswith("SHA256:") and len(key.fingerprint) == 7 + 43
    assert nodekeys.fingerprint(key.public_b64) == f"ed25519 {key.fingerprint}"


def test_the_record_round_trips_and_is_laid_out_as_formats_md_says(key):
    record = nodekey.encode(key)
    assert nodekey.decode(record) == key
    magic, seq, length = struct.unpack_from("<4sII", record)
    assert (magic, seq, len(record)) == (b"RKBN", 1, 12 + length + 4)
    assert struct.unpack_from("<I", record, 12 + length)[0] == zlib.crc32(record[: 12 + length])
    body = json.loads(record[12 : 12 + length])
    assert body == {"format": 1, "seq": 1, "node": NODE, "public": key.public_b64, "private": body["private"]}
    assert base64.b64decode(body["private"]) == key.private
    assert "private" not in repr(key)  # a log line never shows it


def test_a_blank_card_gets_a_key_kept_in_both_copies(card):
    said: list[str] = []
    with Disk(card) as d:
        made, problem = nodekey.ensure(d, NODE, log=said.append)
        assert problem is None and made is not None and made.node == NODE
        raws = nodekey.read_copies(d)
        assert [nodekey.decode(r) for r in raws] == [made, made]
        again, problem = nodekey.ensure(d, NODE, log=said.append)  # the next boot finds it
        assert (again, problem) == (made, None)
        assert nodekey.read(d, NODE) == made and nodekey.read(d, OTHER) is None
    assert said[0] == f"node key: making a key for {NODE}: none on the card"
    assert said[1] == f"node key: ed25519 {made.fingerprint} kept on the card" and len(said) == 2


@pytest.mark.parametrize("copy", [0, 1])
def test_a_cut_while_the_key_is_written_leaves_no_key_or_the_whole_key(key, copy):
    """The writer puts copy 1 whole (and synced) before it touches copy 2: a cut at any byte
    of copy 1 leaves no key and nothing to report (the next boot makes one, and none was ever
    reported); a cut at any byte of copy 2 leaves copy 1's key, and copy 2 is rewritten."""
    record = nodekey.encode(key)
    for n in range(len(record)):
        torn = record[:n]
        if copy == 0:
            found = nodekey.examine(copies_with(torn, b""))
            assert (found.key, found.problem) == (None, None), n
        else:
            found = nodekey.examine(copies_with(record, torn))
            assert (found.key, found.repair, found.problem) == (key, (1,), None), n
    garbage = bytes(random.Random(1).randbytes(len(record)))  # a sector torn into noise: the same
    assert nodekey.examine(copies_with(garbage, b"")).key is None


def test_the_writer_goes_copy_by_copy_and_a_cut_in_between_is_finished_next_boot(card, key, monkeypatch):
    """The real writer with the disk failing at the second copy (the power going): the card
    then holds the key in copy 1 only, and the next boot takes it and rewrites copy 2."""
    writes: list[int] = []
    real_write = Disk.write

    def write(self, offset, data):
        writes.append(offset)
        if offset == nodekey.COPIES[1]:
            raise UpdaterError("power cut")
        real_write(self, offset, data)

    with Disk(card) as d:
        monkeypatch.setattr(Disk, "write", write)
        with pytest.raises(UpdaterError, match="power cut"):
            nodekey.store(d, key)
        monkeypatch.setattr(Disk, "write", real_write)
        assert writes == list(nodekey.COPIES)
        found, problem = nodekey.ensure(d, NODE, log=lambda _: None)
        assert (found, problem) == (key, None)
        assert [nodekey.decode(r) for r in nodekey.read_copies(d)] == [key, key]


def test_a_damaged_copy_is_repaired_from_the_other_and_reported(card, key):
    record = nodekey.encode(key)
    with Disk(card) as d:
        nodekey.store(d, key)
        d.write(nodekey.COPIES[0] + 20, b"\xff\xff")  # a flipped byte in copy 1's body
        said: list[str] = []
        found, problem = nodekey.ensure(d, NODE, log=said.append)
        assert found == key and problem == "the copy at 3 MiB + 256 KiB is damaged, the one at 3 MiB + 320 KiB whole"
        assert d.read(nodekey.COPIES[0], len(record)) == record
        assert said == ["node key: rewriting the copy at 3 MiB + 256 KiB from the whole one"]


def test_both_copies_damaged_make_a_new_key_and_say_so(card, key):
    with Disk(card) as d:
        nodekey.store(d, key)
        for offset in nodekey.COPIES:
            d.write(offset + 30, b"\0\1\2")
        made, problem = nodekey.ensure(d, NODE, log=lambda _: None)
    assert made is not None and made != key
    assert problem is not None and problem.startswith("both copies are damaged: the key is lost; a new key")
    assert f"rackboot adopt --replace {NODE}" in problem


def test_a_card_in_another_board_makes_that_node_a_key_of_its_own(card, key):
    with Disk(card) as d:
        nodekey.store(d, key)
        said: list[str] = []
        made, problem = nodekey.ensure(d, OTHER, log=said.append)
        assert made is not None and problem is None
        assert (made.node, made.seq) == (OTHER, 2) and made.public != key.public
        assert said[0] == f"node key: making a key for {OTHER}: the card's key is {NODE}'s (this card moved)"
        assert nodekey.read(d, NODE) is None and nodekey.read(d, OTHER) == made
        # that rewrite cut after copy 1: the newer key wins, copy 2 is finished
        d.write(nodekey.COPIES[1], nodekey.encode(key))
        assert nodekey.ensure(d, OTHER, log=lambda _: None) == (made, None)


def test_a_record_of_a_newer_format_is_left_alone(card, key):
    body = formats.dump({**key.to_dict(), "format": 2})
    head = struct.pack("<4sII", b"RKBN", 1, len(body)) + body
    newer = head + struct.pack("<I", zlib.crc32(head))
    with Disk(card) as d:
        d.write(nodekey.COPIES[0], newer)
        found, problem = nodekey.ensure(d, NODE, log=lambda _: None)
        assert found is None and problem is not None and "format 2, newer than this updater reads (1)" in problem
        assert d.read(nodekey.COPIES[0], len(newer)) == newer


def test_without_openssl_there_is_no_key_and_one_line_says_why(card):
    with Disk(card) as d, pytest.raises(UpdaterError, match=r"^node key: cannot run /nonexistent/openssl to make"):
        nodekey.ensure(d, NODE, log=lambda _: None, openssl="/nonexistent/openssl")


def test_fuzzed_records_are_read_as_a_key_or_as_none_never_an_exception(key):
    rng = random.Random(20)
    record = nodekey.encode(key)
    for _ in range(3000):
        raw = bytearray(record)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        if rng.random() < 0.3:
            raw = raw[: rng.randrange(len(raw))]
        found = nodekey.decode(bytes(raw))
        assert found is None or found == key
        assert nodekey.examine(copies_with(bytes(raw), bytes(raw))).key in (None, key)
    # records that pass the CRC but hold nonsense: a key of 31 bytes, a JSON list, a huge length
    for body in (
        formats.dump({**key.to_dict(), "public": base64.b64encode(b"x" * 31).decode()}),
        b"[1,2]\n",
        b"\xff\xfe not json",
    ):
        head = struct.pack("<4sII", b"RKBN", 1, len(body)) + body
        assert nodekey.decode(head + struct.pack("<I", zlib.crc32(head))) is None
    assert nodekey.decode(struct.pack("<4sII", b"RKBN", 1, 1 << 31)) is None


# --- reports: signed by the node, judged by the master --------------------------------------


def test_a_signed_report_names_its_key_and_verifies_over_the_exact_body(key, stranger):
    report = reports.make(NODE, Phase.CONFIRM, slot="b", version=2)
    body, headers = reports.signed(report, key)
    parsed = formats.parse_report(body)
    assert parsed == replace(report, pubkey=key.public_b64)
    signature = nodekeys.parse_signature(headers[reports.SIGNATURE_HEADER])
    assert signature is not None and nodekeys.Verifier()(key.public_b64, body, signature)
    # no key, or another node's key: the plain report, as an older updater sends it
    assert reports.signed(report, None) == (formats.dump(report), {})
    assert reports.signed(report, replace(stranger, node=OTHER)) == (formats.dump(report), {})


@pytest.mark.parametrize(
    "header, problem",
    [
        ("not base64!", "not the base64 of a 64-byte signature"),
        (base64.b64encode(b"x" * 63).decode(), "not the base64 of a 64-byte signature"),
    ],
)
def test_a_malformed_signature_header_is_one_line(header, problem):
    with pytest.raises(ValueError, match=rf"^report: X-Rackboot-Signature: {problem}$"):
        nodekeys.parse_signature(header)
    assert nodekeys.parse_signature(None) is None


def test_a_report_key_must_be_the_canonical_base64_of_32_bytes(key):
    doc = json.loads(formats.dump(Report(node=NODE, phase=Phase.BOOT, pubkey=key.public_b64)))
    assert formats.parse_report(json.dumps(doc)).pubkey == key.public_b64
    raw = base64.b64decode(key.public_b64)
    for bad in (base64.b64encode(raw[:31]).decode(), key.public_b64[:-2] + "B=", key.public_b64.rstrip("="), 7):
        with pytest.raises(UpdaterError, match="^report: pubkey: "):
            formats.parse_report(json.dumps({**doc, "pubkey": bad}))


def judged(report: Report, key: nodekey.NodeKey | None, pinned: str | None, *, may_pin: bool = True):
    body = formats.dump(report)
    return nodekeys.judge(
        report, body, key.sign(body) if key else None, pinned, may_pin=may_pin, verify=nodekeys.Verifier()
    )


def test_the_master_judges_each_report_by_the_key_pinned_for_its_node(key, stranger):
    mine = Report(node=NODE, phase=Phase.CONFIRM, slot="b", version=2, pubkey=key.public_b64)
    theirs = replace(mine, pubkey=stranger.public_b64)
    plain = replace(mine, pubkey=None)
    pinned = key.public_b64
    # pinned: only the pinned key's signature counts
    assert judged(mine, key, pinned) == nodekeys.Auth(signed=True)
    assert (
        judged(plain, None, pinned).refused
        == f"unsigned report for {NODE}, whose key {nodekeys.fingerprint(pinned)} is pinned"
    )
    mismatch = judged(theirs, stranger, pinned)
    assert mismatch.candidate == stranger.public_b64 and not mismatch.signed
    assert mismatch.refused is not None and mismatch.refused.startswith(f"key mismatch: {NODE} presents ")
    assert mismatch.refused.endswith(f"re-adopt with rackboot adopt --replace {NODE}")
    forged = judged(mine, stranger, pinned)  # claims the pinned key, signed by another
    assert forged.refused == f"signature does not verify with {NODE}'s pinned key {nodekeys.fingerprint(pinned)}"
    assert forged.candidate is None
    # nothing pinned: the first key is pinned (auto) or kept as a candidate (manual)
    assert judged(mine, key, None) == nodekeys.Auth(signed=True, pin=key.public_b64)
    assert judged(mine, key, None, may_pin=False) == nodekeys.Auth(candidate=key.public_b64)
    assert judged(plain, None, None) == nodekeys.Auth()  # an older updater's: taken, unsigned
    assert "does not verify with the key" in (judged(theirs, key, None).refused or "")
    assert "is not signed" in (judged(mine, None, None).refused or "")
    assert "without the key to check it" in (judged(plain, key, None).refused or "")


def test_the_master_checks_in_process_as_openssl_does(key, stranger):
    """The master's in-process check (pyca/cryptography) and Debian's openssl, which the
    updater signs with, agree: on a good signature, a changed body, another key, a changed
    signature, and 32 bytes that are no key at all."""
    body = formats.dump(reports.make(NODE, Phase.BOOT, slot="a", version=1))
    good = key.sign(body)
    cases = [
        (key.public, body, good),
        (key.public, body + b" ", good),
        (stranger.public, body, good),
        (key.public, body, bytes([good[0] ^ 1]) + good[1:]),
        (b"\xff" * 32, body, good),
    ]
    in_process = [nodekeys.verify_in_process(*case) for case in cases]
    by_openssl = [nodekeys.Verifier(openssl="openssl")._openssl("openssl", *case) for case in cases]
    assert in_process == by_openssl == [True, False, False, False, False]


def test_the_verifier_remembers_good_signatures_and_refuses_to_run_without_openssl(key, tmp_path):
    body = b"{}\n"
    signature = key.sign(body)
    verify = nodekeys.Verifier()
    assert verify(key.public_b64, body, signature) and verify(key.public_b64, body, signature)
    assert verify.runs == 1  # the replay cost no check
    assert not verify(key.public_b64, body + b" ", signature) and verify.runs == 2
    with pytest.raises(nodekeys.Unavailable, match="cannot run /nonexistent/openssl"):
        nodekeys.Verifier(openssl="/nonexistent/openssl")(key.public_b64, body, signature)
