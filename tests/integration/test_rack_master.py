"""Rack masters on loopback: a real region (rackboot serve's HTTP and its rsync daemon with
the ``published`` module) and a rack master (master/rack.py) mirroring it with real rsync,
checking the region's signatures, serving a worker (the real updater on a file-backed
card) from its mirror and relaying the worker's reports to the region.

A good sync serves v1 with nothing but what the plans reference; a tampered region tree
(a manifest signature broken, a stream byte flipped, a key the rack does not trust) is
refused and the old tree served; a region that goes away leaves the rack serving, its
reports spooled and then forwarded, in order, when the region is back."""

from __future__ import annotations

import os
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import Action, Plan
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import plans, publish, rsyncd, serve, signing
from rackboot.master.rack import RackMaster

from tests.integration.updater_master import MAC, NODE, layout

IMAGE = "example"
RACK = "rack-a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _root(where: Path, version: int) -> Path:
    root = where / f"root-v{version}"
    (root / "etc").mkdir(parents=True)
    (root / "etc/rackboot-release").write_text(f"v{version}\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(random.Random(1).randbytes(400_000))
    return root


def _serve(server: serve.MasterServer) -> None:
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def _wait(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


class Region:
    """The region: rackboot serve's HTTP and rsync daemon over one signed tree."""

    def __init__(self, root: Path, key: Path):
        self.root, self.key = root, key
        self.port = _free_port()
        self.rsync = rsyncd.RsyncService(root, "127.0.0.1", _free_port(), log=False)
        self.rsync.start()
        self.http: serve.MasterServer | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.http = serve.make_server(self.root, "127.0.0.1", self.port, quiet=True)
        _serve(self.http)

    def down(self) -> None:
        assert self.http is not None
        self.http.shutdown()
        self.http.server_close()
        self.http = None

    def release(self, src: Path, version: int) -> str:
        publish.publish_directory(src, self.root, image=IMAGE, version=version, key=self.key)
        path = formats.manifest_path(IMAGE, version)
        plans.write_plan(self.root, NODE, Plan(node=NODE, layout=layout(), image=path), key=self.key)
        return path

    def close(self) -> None:
        if self.http is not None:
            self.down()
        self.rsync.stop()


@pytest.fixture
def region(tmp_path, keys):
    if os.geteuid() != 0 or not shutil.which("rsync") or not shutil.which("mke2fs"):
        pytest.fail("the rack master tests need root (the rsync daemon), rsync and e2fsprogs (make test installs them)")
    (tmp_path / "region").mkdir()
    r = Region(tmp_path / "region", keys["master"])
    yield r
    r.close()


class Rack:
    """A rack master over the region: its mirror, its relay and its HTTP side."""

    def __init__(self, root: Path, region: Region, key: Path):
        self.lines: list[str] = []
        self.master = RackMaster(
            root,
            region.url,
            key=key,
            rsync_port=region.rsync.port,
            name=RACK,
            interval=3600,  # the tests sync by hand
            log=self.lines.append,
            retry=0.1,
        )
        self.http: serve.MasterServer | None = None

    def start(self) -> Rack:
        self.master.first_sync()
        self.http = serve.make_server(self.master.root, "127.0.0.1", 0, quiet=True, rack=self.master)
        _serve(self.http)
        self.master.start()
        return self

    @property
    def url(self) -> str:
        assert self.http is not None
        return self.http.url

    def close(self) -> None:
        self.master.stop()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()

    def plan(self) -> Plan:
        return formats.parse_plan(MasterClient(self.url, retries=0).get(f"/plans/{NODE}.json"))


@pytest.fixture
def rack(tmp_path, region, keys):
    r = Rack(tmp_path / "rack", region, signing.public_key_path(keys["master"]))
    yield r
    r.close()


def update(card: str, url: str, keys: dict, lines: list[str] | None = None):
    client = MasterClient(url, connect_timeout=1.0, read_timeout=5.0, retries=1, backoff=0.01, report_timeout=2.0)
    verifier = Verifier(str(signing.public_key_path(keys["master"])))
    return run(
        card, url, Identity(MAC), master=client, log=(lines.append if lines is not None else print), verifier=verifier
    )


def mirrored(rack: Rack) -> set[str]:
    tree = rack.master.mirror.current()
    assert tree is not None
    return {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()}


def test_a_worker_installs_from_the_rack_masters_verified_mirror_and_its_report_reaches_the_region(
    tmp_path, region, rack, keys, card
):
    manifest = region.release(_root(tmp_path, 1), 1)
    (region.root / "reports").mkdir()
    (region.root / "reports/secret.jsonl").write_text("{}\n")
    rack.start()
    assert any("mirror: synced" in line and "1 plans, 1 versions" in line for line in rack.lines), rack.lines
    files = mirrored(rack)
    # what the plans reference, verified; nothing of the region's own (reports, inventory, version trees)
    assert f"plans/{NODE}.json.sig" in files and manifest.lstrip("/") in files
    assert not any(f.startswith(("reports", "inventory")) or "/." in f for f in files), files
    assert {f for f in files if f.startswith(".")} == {".verified"}  # the mirror's own, a dot name
    tree = rack.master.mirror.current()
    assert tree is not None and (tree / ".verified").is_file()  # a dot name: HTTP never serves it
    stream = formats.parse_manifest((tree / manifest.lstrip("/")).read_bytes()).stream_path(manifest)
    region_stream = region.root / stream.lstrip("/")
    assert (tree / stream.lstrip("/")).read_bytes() == region_stream.read_bytes()

    lines: list[str] = []
    result = update(card, rack.url, keys, lines)
    assert (result.action, result.version) == (Action.INSTALLED, 1), lines[-5:]
    # the region never served the image: the rack did
    assert region.http is not None and not any(p.startswith("/images/") for p in region.http.sent), region.http.sent
    # the worker's report went through the rack's spool to the region, which checked it and names the rack
    assert region.http is not None
    inventory = region.http.fleet.inventory
    _wait("the relayed report at the region", lambda: (n := inventory.node(NODE)) is not None and n.rack == RACK)
    assert inventory.node(NODE).ip == "127.0.0.1"  # the worker's address, as its rack master saw it
    _wait("the spool forwarded", lambda: rack.master.relay.waiting() == [])

    # the next sync after a second release: an unchanged file is a hard link to the old tree's
    region.release(_root(tmp_path, 2), 2)
    old = rack.master.mirror.current()
    assert rack.master.sync()
    new = rack.master.mirror.current()
    assert new != old and rack.plan().image == formats.manifest_path(IMAGE, 2)
    assert old is not None and new is not None
    files = mirrored(rack)
    assert not any(f.startswith(f"images/{IMAGE}/1/") for f in files), files  # no plan names v1 now
    # v2's index as a diff against v1's: checked by rebuilding v2's signed index from v1's
    # (v1's manifest and index fetched to check it, then left out)
    diffs = [f for f in files if ".index.from-" in f]
    assert len(diffs) == 1 and diffs[0].startswith(f"images/{IMAGE}/2/"), files
    sig = f"plans/{NODE}.json.sig"
    assert (new / sig).stat().st_ino != (old / sig).stat().st_ino  # the re-signed plan came anew


def test_a_tampered_region_tree_is_refused_and_the_old_tree_served(tmp_path, region, rack, keys):
    region.release(_root(tmp_path, 1), 1)
    rack.start()
    good = rack.master.mirror.current()
    assert rack.plan().image == formats.manifest_path(IMAGE, 1)

    v2 = region.release(_root(tmp_path, 2), 2)
    sig = region.root / (v2.lstrip("/") + ".sig")
    signature = sig.read_bytes()
    sig.write_bytes(bytes([signature[0] ^ 1]) + signature[1:])
    rack.lines.clear()
    assert not rack.master.sync()
    assert len(rack.lines) == 1 and "refused" in rack.lines[0] and "signature does not verify" in rack.lines[0]
    assert "still serving the tree synced at" in rack.lines[0], rack.lines
    assert rack.master.mirror.current() == good and rack.plan().image == formats.manifest_path(IMAGE, 1)

    sig.write_bytes(signature)  # the signature whole again, a byte of the stream flipped
    manifest = formats.parse_manifest((region.root / v2.lstrip("/")).read_bytes())
    stream = region.root / manifest.stream_path(v2).lstrip("/")
    data = bytearray(stream.read_bytes())
    data[len(data) // 2] ^= 0x40
    stream.write_bytes(bytes(data))
    rack.lines.clear()
    assert not rack.master.sync()
    assert len(rack.lines) == 1 and "sha256" in rack.lines[0] and manifest.stream in rack.lines[0], rack.lines
    assert rack.master.mirror.current() == good and rack.plan().image == formats.manifest_path(IMAGE, 1)
    # the half-synced tree is gone, and nothing of it was ever under current
    assert [p.name for p in (rack.master.root / "trees").iterdir()] == [good.name]

    data[len(data) // 2] ^= 0x40
    stream.write_bytes(bytes(data))
    assert rack.master.sync()
    assert rack.plan().image == formats.manifest_path(IMAGE, 2)
    assert any(".index.from-" in f for f in mirrored(rack))

    # a damaged index diff costs the workers the diff, not the sync: it is left out
    (diff,) = (region.root / f"images/{IMAGE}/2").glob("*.index.from-*")
    raw = bytearray(diff.read_bytes())
    raw[-12] ^= 0xFF  # inside the deflate data or its CRC: it no longer rebuilds the signed index
    diff.write_bytes(bytes(raw))
    before = rack.master.mirror.current()
    rack.lines.clear()
    assert rack.master.sync()
    assert not any(".index.from-" in f for f in mirrored(rack))
    # the stream, unchanged at the region, is the old tree's file (rsync --link-dest), not a copy
    after = rack.master.mirror.current()
    assert before is not None and after is not None and after != before
    rel = manifest.stream_path(v2).lstrip("/")
    assert (after / rel).stat().st_ino == (before / rel).stat().st_ino
    assert "1 index diffs not checkable, left out" in rack.lines[-1], rack.lines


def test_a_region_signed_with_a_key_the_rack_does_not_hold_is_refused(tmp_path, region, keys):
    region.release(_root(tmp_path, 1), 1)
    lines: list[str] = []
    other = RackMaster(
        tmp_path / "rack",
        region.url,
        key=signing.public_key_path(keys["other"]),
        rsync_port=region.rsync.port,
        name=RACK,
        log=lines.append,
    )
    with pytest.raises(RackbootError, match="first sync .* failed .*signature does not verify .* no mirror"):
        other.first_sync()
    assert other.mirror.current() is None


def test_the_region_down_leaves_the_rack_serving_and_its_reports_spooled_then_forwarded_in_order(
    tmp_path, region, rack, keys, card
):
    region.release(_root(tmp_path, 1), 1)
    rack.start()
    good = rack.master.mirror.current()
    region.down()
    region.rsync.stop()
    rack.lines.clear()
    assert not rack.master.sync()
    assert len(rack.lines) == 1 and "rsync from" in rack.lines[0] and "still serving" in rack.lines[0], rack.lines
    assert rack.master.mirror.current() == good
    result = update(card, rack.url, keys)
    assert (result.action, result.version) == (Action.INSTALLED, 1)
    _wait("a report in the spool", lambda: len(rack.master.relay.waiting()) >= 1)
    second = update(card, rack.url, keys)  # the next boot: booted, nothing to do
    assert second.action is not Action.INSTALLED
    _wait("both boots' reports spooled", lambda: len(rack.master.relay.waiting()) >= 2)
    spooled = [p.read_bytes().split(b"\n", 2)[2] for p in rack.master.relay.waiting()]
    assert any("relay: region" in line and "did not take" in line for line in rack.lines), rack.lines

    # a restart of the rack master with the region still away starts with its tree, and says so
    restarted = RackMaster(
        rack.master.root,
        region.url,
        key=signing.public_key_path(keys["master"]),
        rsync_port=region.rsync.port,
        log=rack.lines.append,
    )
    rack.lines.clear()
    restarted.first_sync()
    assert len(rack.lines) == 1 and "failed at start" in rack.lines[0] and "serving the tree synced at" in rack.lines[0]

    region.up()
    _wait("the spool forwarded", lambda: rack.master.relay.waiting() == [])
    assert region.http is not None
    inventory = region.http.fleet.inventory
    node = inventory.node(NODE)
    assert node is not None and node.rack == RACK
    history = inventory.history(NODE)
    assert [h["phase"] for h in history][-len(spooled) :] == [formats.parse_report(b).phase for b in spooled]


def test_the_region_refuses_a_relayed_report_whose_rack_header_is_not_a_rack_name(tmp_path, region):
    import http.client

    body = formats.dump({"format": 1, "node": NODE, "time": 0, "phase": "boot", "bytes": 0, "seconds": 0})
    assert region.http is not None
    conn = http.client.HTTPConnection("127.0.0.1", region.port, timeout=5)
    conn.request("POST", "/report", body=body, headers={"X-Rackboot-Rack": "rack a\x1b[31m"})
    response = conn.getresponse()
    assert response.status == 400 and b"X-Rackboot-Rack" in response.read()
    assert region.http.fleet.inventory.node(NODE) is None
    conn = http.client.HTTPConnection("127.0.0.1", region.port, timeout=5)
    conn.request("POST", "/report", body=body, headers={"X-Rackboot-Rack": "rack-a", "X-Rackboot-Worker": "10.0.0.300"})
    response = conn.getresponse()
    assert response.status == 400 and b"X-Rackboot-Worker" in response.read()
    assert region.http.fleet.inventory.node(NODE) is None


def test_an_unreachable_region_at_the_first_start_is_one_line_and_no_tree(tmp_path, keys):
    rack = RackMaster(
        tmp_path / "rack", "http://127.0.0.1:9", key=signing.public_key_path(keys["master"]), rsync_port=_free_port()
    )
    with pytest.raises(RackbootError) as info:
        rack.first_sync()
    message = str(info.value)
    assert "\n" not in message and "first sync from rsync://127.0.0.1:" in message and "no mirror" in message
    assert rack.mirror.current() is None and not any((tmp_path / "rack/trees").iterdir())


def test_the_spool_is_bounded_and_a_full_one_answers_503(tmp_path, keys):
    from rackboot.master.relay import Relay

    relay = Relay(tmp_path / "spool", "http://127.0.0.1:9", RACK, limit=2)  # no forwarder started
    assert relay.take(b'{"a":1}\n', None) and relay.take(b'{"a":2}\n', "c2ln")
    assert not relay.take(b'{"a":3}\n', None)
    assert [p.read_bytes() for p in relay.waiting()] == [b'\n\n{"a":1}\n', b'c2ln\n\n{"a":2}\n']
    assert relay.flush() == 0 and len(relay.waiting()) == 2  # the region does not answer: both kept


def test_a_sync_with_nothing_new_keeps_the_current_tree_and_says_nothing(tmp_path, region, rack):
    region.release(_root(tmp_path, 1), 1)
    rack.start()
    tree = rack.master.mirror.current()
    rack.lines.clear()
    assert rack.master.sync() and rack.master.sync()
    assert rack.master.mirror.current() == tree and rack.lines == []
    assert [p.name for p in (rack.master.root / "trees").iterdir()] == [tree.name]


def test_a_key_rotation_at_the_region_is_followed_through_its_signed_chain(tmp_path):
    from rackboot.master import keychain

    key = tmp_path / "keys/region.key"
    key.parent.mkdir()
    signing.keygen(key)
    held = tmp_path / "rack-held.pub"  # what the rack master was given: key 0
    held.write_bytes(signing.public_key_path(key).read_bytes())
    (tmp_path / "region").mkdir()
    region = Region(tmp_path / "region", key)
    rack = Rack(tmp_path / "rack", region, held)
    try:
        region.release(_root(tmp_path, 1), 1)
        rack.start()
        keychain.rotate(key, region.root)  # key 1 signs everything from now on, key 0 retired
        rack.lines.clear()
        assert rack.master.sync(), rack.lines
        assert "1 key links" in rack.lines[-1], rack.lines
        assert any("master key 1" in line and "which it retires" in line for line in rack.lines), rack.lines
        assert {"keys/1.json", "keys/1.json.sig"} <= mirrored(rack)  # the workers follow the same chain
        # a link that does not verify ends it: the sync is refused, the tree stays
        link = region.root / "keys/1.json.sig"
        link.write_bytes(bytes([link.read_bytes()[0] ^ 1]) + link.read_bytes()[1:])
        tree = rack.master.mirror.current()
        rack.lines.clear()
        assert not rack.master.sync()
        assert "key chain" in rack.lines[-1] and rack.master.mirror.current() == tree, rack.lines
    finally:
        rack.close()
        region.close()
