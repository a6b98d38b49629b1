"""The node keys' golden samples (tests/data/make_golden_nodekeys.py): the record on the card
and a signed report rev9, read by today's code with their values, written again byte for
byte, the signature checked by the master with openssl and taken by `rackboot serve`."""

from __future__ import annotations

import base64
import http.client
import json
import struct
import threading
import zlib

import pytest
from rackboot.initramfs.updater import formats, nodekey, record
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.formats import Phase, Report
from rackboot.master import nodekeys, serve
from rackboot.master.inventory import Inventory

from tests.data import make_golden_nodekeys as golden
from tests.unit.test_golden_formats import sample

NODE = "52-54-00-12-34-56"


def sample_key() -> nodekey.NodeKey:
    key = nodekey.decode(sample("node-key.format1.rev1.bin"))
    assert key is not None
    return key


def test_the_node_key_record_rev1_is_read_and_written_byte_for_byte():
    raw = sample("node-key.format1.rev1.bin")
    key = sample_key()
    assert (key.node, key.seq, key.format, len(key.public), len(key.private)) == (NODE, 1, 1, 32, 32)
    magic, seq, length = struct.unpack_from("<4sII", raw)
    assert (magic, seq, len(raw)) == (b"RKBN", 1, 12 + length + 4)
    assert struct.unpack_from("<I", raw, 12 + length)[0] == zlib.crc32(raw[: 12 + length])
    assert sorted(json.loads(raw[12 : 12 + length])) == ["format", "node", "private", "public", "seq"]
    assert nodekey.encode(key) == raw


def test_a_card_holding_the_sample_keeps_it_untouched(tmp_path):
    raw = sample("node-key.format1.rev1.bin")
    path = tmp_path / "card"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        for offset in nodekey.COPIES:
            f.seek(offset)
            f.write(raw)
    before = path.read_bytes()
    with Disk(str(path)) as d:
        assert nodekey.ensure(d, NODE, log=pytest.fail) == (sample_key(), None)
    assert path.read_bytes() == before


def test_a_record_with_unknown_keys_is_read_and_a_higher_format_is_refused():
    body = json.loads(formats.dump(sample_key()))
    for doc, expected in ((body | {"later_addition": [1]}, sample_key()), (body | {"format": 2}, None)):
        data = formats.dump(doc)
        head = struct.pack("<4sII", b"RKBN", 1, len(data)) + data
        raw = head + struct.pack("<I", zlib.crc32(head))
        assert nodekey.decode(raw) == expected
    assert record.newer_format(nodekey.MAGIC, raw, nodekey.RESERVED) == 2


REV9 = Report(
    node=NODE,
    phase=Phase.CONFIRM,
    slot="b",
    version=2,
    time=1700000900.5,
    hostname="worker-01",
    pubkey="9aZEwFHdtsnByiWhxkUM6URSup+uae+UCwkL8Dwah5k=",
)


def test_report_rev9_reads_round_trips_and_its_signature_verifies():
    data, signature = sample("report.rev9.signed.json"), sample("report.rev9.signed.json.sig")
    assert formats.parse_report(data) == REV9 == golden.report_rev9(sample_key().public_b64)
    assert formats.dump(REV9) == data
    verify = nodekeys.Verifier()
    assert verify(REV9.pubkey or "", data, signature)
    assert sample_key().sign(data) == signature  # Ed25519 is deterministic
    assert not verify(REV9.pubkey or "", data.replace(b'"version":2', b'"version":3'), signature)
    assert nodekeys.parse_signature(base64.b64encode(signature).decode()) == signature


@pytest.fixture
def master(tmp_path):
    srv = serve.make_server(tmp_path, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv, tmp_path
    srv.shutdown()
    srv.server_close()


def post(srv, body: bytes, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=5)
    conn.request("POST", "/report", body=body, headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def test_serve_takes_the_signed_sample_pins_its_key_and_stores_its_line(master):
    srv, root = master
    header = {nodekeys.SIGNATURE_HEADER: base64.b64encode(sample("report.rev9.signed.json.sig")).decode()}
    assert post(srv, sample("report.rev9.signed.json"), header) == 204
    node = Inventory(root).node(NODE)
    assert node is not None and node.pubkey == REV9.pubkey and node.state == "ok"
    [line] = (root / f"reports/{NODE}.jsonl").read_bytes().splitlines(keepends=True)
    assert formats.parse_report(line) == REV9  # the stored line keeps the key it came with
    # an older updater's unsigned report for the same node is refused from now on
    assert post(srv, sample("report.rev3.json"), {}) == 403
