"""Sources with failover, on real HTTP on loopback: a worker given five sources installs v1
(full stream) and v2 (block delta) through them and reports where its bytes came from.

The sources: real `rackboot serve`s over three copies of one signed master tree (the good
one; one whose signatures are all damaged; one whose image streams are valid gzip of the
wrong bytes, the very length the manifest says, and whose packs have every byte flipped),
a port nobody listens on, and a server that accepts and never answers. Only the good copy
holds bytes that verify, so everything the card commits must have come from it, and the
report's bytes per source must be what each serve sent.
"""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import threading
from pathlib import Path

import pytest
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.fetch import NotFound
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.signature import Verifier
from rackboot.initramfs.updater.sources import Sources
from rackboot.master import publish, serve, signing

from tests.integration.signed_rack import sign
from tests.integration.test_delta import EPOCH, SLOT_A, SLOT_B, Sent, image, manifest, slot_bytes, tree, wait_for
from tests.integration.updater_master import MAC, NODE, Server, write_plan

READ_TIMEOUT = 3.0  # short, so the stalled source costs seconds; long enough for a loaded serve


@pytest.fixture(scope="module")
def trees(tmp_path_factory, keys):
    """The good tree (v1 and v2 published and signed) and its two damaged copies."""
    base = tmp_path_factory.mktemp("sources")
    good = base / "good"
    for version, extra in ((1, False), (2, True)):
        src = tree(base / f"tree{version}", extra=extra)
        publish.publish_directory(src, good, image="example", version=version, source_date_epoch=EPOCH)
        sign(good, f"/images/example/{version}/manifest.json", keys["master"])
    bad_signatures = base / "bad-signatures"
    shutil.copytree(good, bad_signatures)
    bad_images = base / "bad-images"
    shutil.copytree(good, bad_images)
    for version in (1, 2):
        m = manifest(good, version)
        folder = bad_images / f"images/example/{version}"
        stream = folder / m.stream
        stream.write_bytes(wrong_gzip(stream.read_bytes(), m.size))
        assert m.delta is not None
        pack = folder / m.delta.pack
        pack.write_bytes(bytes(b ^ 0xFF for b in pack.read_bytes()))
    return good, bad_signatures, bad_images


def wrong_gzip(original: bytes, size: int) -> bytes:
    """A valid gzip stream of ``size`` zero bytes, exactly as long as ``original`` (the rest is a
    header comment): its length and its inflated size match the manifest, so only the sha256
    checks can tell it is not the image."""
    body = gzip.compress(bytes(size), mtime=0)
    pad = len(original) - len(body)
    assert pad >= 2, "the image must compress worse than zeros"
    header = bytearray(body[:10])
    header[3] |= 0x10  # FCOMMENT: a NUL-terminated comment follows the header
    return bytes(header) + b"x" * (pad - 1) + b"\0" + body[10:]


def signed_plan(roots: list[Path], version: int, key: Path) -> None:
    """The node's plan for ``version``, signed, in each tree; spoiled in the bad-signatures one."""
    for root in roots:
        write_plan(root, f"/images/example/{version}/manifest.json")
        sign(root, f"/plans/{NODE}.json", key)


def spoil_signatures(root: Path) -> None:
    for sig in root.rglob("*.sig"):
        sig.write_bytes(bytes(b ^ 0x01 for b in sig.read_bytes()))


class Serve:
    def __init__(self, root: Path):
        self.root = root
        self.server = serve.make_server(root, quiet=True)
        self.url = self.server.url
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Stalled:
    """Accepts connections and never answers: only the client's timeouts end a request."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except TimeoutError:
                continue

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=5)
        for conn in self.held:
            conn.close()
        self.sock.close()


def refused_url() -> str:
    """A loopback port with nothing listening on it: connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def rack(trees, tmp_path, keys):
    copies = []
    for tree_root in trees:
        copy = tmp_path / tree_root.name
        shutil.copytree(tree_root, copy)
        copies.append(copy)
    servers = [Serve(root) for root in copies]
    stalled = Stalled()
    yield {"good": servers[0], "bad-signatures": servers[1], "bad-images": servers[2], "stalled": stalled}
    for s in (*servers, stalled):
        s.close()


def boot(card: Path, urls: list[str], keys, log: list[str]):
    sources = Sources.of(
        urls[0],
        urls[1:],
        connect_timeout=READ_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        backoff=0.01,
        report_timeout=READ_TIMEOUT,
    )
    verifier = Verifier(str(signing.public_key_path(keys["master"])))
    return run(str(card), urls[0], Identity(MAC), master=sources, log=log.append, verifier=verifier)


def image_bytes_sent(sent: dict[str, int]) -> int:
    """What a serve sent of images (streams, indexes, packs): the bytes a report counts."""
    return sum(n for path, n in sent.items() if path.startswith("/images/") and not path.endswith((".json", ".sig")))


def last_boot_report(root: Path) -> dict:
    lines = [json.loads(line) for line in (root / f"reports/{NODE}.jsonl").read_text().splitlines()]
    return [r for r in lines if r["phase"] == "boot"][-1]


@pytest.fixture
def card(tmp_path) -> Path:
    path = tmp_path / "card.img"
    with open(path, "wb") as f:
        f.truncate(256 << 20)
    return path


def test_v1_by_stream_and_v2_by_delta_come_from_the_one_good_source_of_five(rack, card, keys):
    good, bad_sigs, bad_images, stalled = rack["good"], rack["bad-signatures"], rack["bad-images"], rack["stalled"]
    signed_plan([good.root, bad_sigs.root, bad_images.root], 1, keys["master"])
    spoil_signatures(bad_sigs.root)
    down = refused_url()

    # boot 1: the master is reachable but its signatures are bad (reports still go to it);
    # the stalled source is asked for the plan next and must be passed over by the read timeout
    urls = [bad_sigs.url, stalled.url, down, bad_images.url, good.url]
    sent = {name: Sent(s.server) for name, s in (("good", good), ("bad-images", bad_images))}
    log: list[str] = []
    first = boot(card, urls, keys, log)
    assert (first.slot, first.action, first.version) == ("a", "installed", 1), log
    assert slot_bytes(card, SLOT_A, manifest(good.root, 1).size) == image(good.root, 1)
    report = last_boot_report(bad_sigs.root)
    uses = {u["url"]: u for u in report["sources"]}
    assert [u["url"] for u in report["sources"]] == urls  # in the configured order
    assert uses[bad_sigs.url]["bytes"] == 0 and "does not verify" in uses[bad_sigs.url]["failed"]
    assert uses[stalled.url]["bytes"] == 0 and "timed out" in uses[stalled.url]["failed"]
    assert uses[down]["bytes"] == 0 and "refused" in uses[down]["failed"]
    assert "sha256" in uses[bad_images.url]["failed"]
    assert uses[good.url]["failed"] is None
    good_sent = image_bytes_sent(wait_for(sent["good"]))
    m1 = manifest(good.root, 1)
    assert m1.delta is not None
    assert uses[good.url]["bytes"] == good_sent == m1.stream_size + m1.delta.index_size  # stream, kept index
    # the damaged stream was read whole (its length is right): only its sha256 gave it away
    assert uses[bad_images.url]["bytes"] == m1.stream_size
    assert report["bytes"] == sum(u["bytes"] for u in report["sources"]) == first.bytes_fetched
    assert any(f"source {bad_images.url} passed over" in line for line in log)

    # boot 2: the master is down, so reports go to the next source that can be reached (the
    # stalled one is passed over by the report's timeout); v2 comes by block delta
    signed_plan([good.root, bad_images.root], 2, keys["master"])
    write_plan(bad_sigs.root, "/images/example/2/manifest.json")  # its signature stays spoiled
    urls = [down, stalled.url, bad_sigs.url, bad_images.url, good.url]
    sent = {name: Sent(s.server) for name, s in (("good", good), ("bad-images", bad_images))}
    log = []
    second = boot(card, urls, keys, log)
    assert (second.slot, second.action, second.version) == ("b", "installed", 2), log
    assert slot_bytes(card, SLOT_B, manifest(good.root, 2).size) == image(good.root, 2)
    assert any(line.startswith("delta: ") and "fetched" in line for line in log), log
    report = last_boot_report(bad_sigs.root)  # the first source that could be reached
    assert report["slot"] == "b" and report["version"] == 2
    uses = {u["url"]: u for u in report["sources"]}
    assert "refused" in uses[down]["failed"] and "timed out" in uses[stalled.url]["failed"]
    assert "does not verify" in uses[bad_sigs.url]["failed"]
    assert "hash" in uses[bad_images.url]["failed"] or "deflate" in uses[bad_images.url]["failed"]
    assert uses[good.url]["failed"] is None and uses[good.url]["bytes"] > 0
    assert uses[good.url]["bytes"] == image_bytes_sent(wait_for(sent["good"]))
    assert uses[bad_images.url]["bytes"] == image_bytes_sent(wait_for(sent["bad-images"]))
    assert report["bytes"] == sum(u["bytes"] for u in report["sources"]) == second.bytes_fetched
    assert formats.parse_report(json.dumps(report)).sources is not None


# --- the choice, piece by piece --------------------------------------------------------------


@pytest.fixture
def two(tmp_path):
    """Two loopback masters (updater_master.py's), each with a tree of its own."""
    servers = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        servers.append(Server(tmp_path / name))
    yield [s.master for s in servers]
    for s in servers:
        s.close()


def client_of(*urls: str) -> Sources:
    return Sources.of(urls[0], urls[1:], connect_timeout=READ_TIMEOUT, read_timeout=1.0, backoff=0.01)


def test_a_file_one_source_lacks_comes_from_the_next_and_a_404_demotes_nobody(two):
    one, other = two
    (other.root / "doc.json").write_bytes(b"{}")
    sources = client_of(one.url, other.url)
    assert sources.get("/doc.json") == b"{}"
    assert sources.failed == {}  # one still comes first
    (one.root / "doc.json").write_bytes(b"[]")
    assert sources.get("/doc.json") == b"[]"
    with pytest.raises(NotFound, match="no source has it"):
        sources.get("/missing.json")


def test_a_document_that_does_not_parse_is_taken_from_the_next_source(two):
    one, other = two
    (one.root / "doc.json").write_bytes(b"not json")
    (other.root / "doc.json").write_bytes(b'{"ok": true}')
    sources = client_of(one.url, other.url)
    assert sources.get_doc("/doc.json", lambda b: formats.load_json("doc", b)) == {"ok": True}
    assert list(sources.failed) == [0] and [c.url for c in sources.in_order()] == [other.url, one.url]


def test_an_unreachable_source_is_not_asked_for_what_another_lacks(two):
    one, _ = two
    stalled = Stalled()
    try:
        sources = client_of(one.url, stalled.url)
        moves: list[int] = []
        sources.progress = lambda: moves.append(1)  # the watchdog's feed: passing over is progress
        (one.root / "doc.json").write_bytes(b"{}")
        one.faults.status = 500  # one fails: the stalled source is asked, and times out
        with pytest.raises(UpdaterError, match="every source failed"):
            sources.get("/doc.json")
        asked = len(stalled.held)
        assert asked == 2 and sources.unreachable == {1} and moves == [1]
        one.faults.status = None
        with pytest.raises(NotFound):  # one says 404: the stalled source is not asked again
            sources.get("/keys/1.json")
        assert len(stalled.held) == asked
    finally:
        stalled.close()


def test_a_report_goes_to_the_first_source_that_can_be_reached(two):
    one, other = two
    down = refused_url()
    sources = client_of(down, one.url, other.url)
    body = formats.dump(formats.Report(node=NODE, phase=formats.Phase.PLAN))
    assert sources.post("/report", body) == 204
    assert sources.post("/report", body) == 204
    assert len(one.reports) == 2 and other.reports == []
    assert "refused" in (sources.failed[0] or "") and sources.unreachable == {0}
    one.faults.status = 503  # an answer, however bad, is the answer: not passed on
    assert sources.post("/report", body) == 503
    assert other.reports == []
