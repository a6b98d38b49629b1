"""Which GETs `rackboot serve` counts as image streams under max_streams: the stream and the
pack's ranges (the bytes of an install) do; manifests, signatures, hooks, block indexes and
their diffs (small, fetched before a delta's first pack range) do not, so a worker holding
an index diff in hand never queues for it behind other workers' streams."""

from __future__ import annotations

import http.client
import threading
from pathlib import Path

import pytest
from rackboot.master import serve

VERSION = "/images/example/2/"
DIFF = "rootfs.ext4.index.from-" + "0123456789abcdef" * 4
NOT_STREAMS = ["manifest.json", "manifest.json.sig", "pre-install.sh", "rootfs.ext4.index", DIFF]
STREAMS = [("rootfs.ext4.gz", None), ("rootfs.ext4.pack", "bytes=100-4195"), ("rootfs.ext4.pack", None)]


@pytest.fixture
def server(tmp_path: Path):
    """A master with one version's files and a single stream slot."""
    d = tmp_path / VERSION.strip("/")
    d.mkdir(parents=True)
    for name in NOT_STREAMS + [name for name, _ in STREAMS]:
        (d / name).write_bytes(name.encode() * 500)
    srv = serve.make_server(tmp_path, "127.0.0.1", 0, quiet=True, max_streams=1)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(srv, path: str, byte_range: str | None = None) -> tuple[int, bytes, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    try:
        conn.request("GET", path, headers={"Range": byte_range} if byte_range else {})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Retry-After")
    finally:
        conn.close()


@pytest.mark.parametrize("name", NOT_STREAMS)
def test_documents_indexes_and_diffs_are_served_while_every_stream_slot_is_taken(server, name):
    assert server.start_stream() is None  # another worker's stream holds the only slot
    status, body, _ = get(server, VERSION + name)
    assert (status, body) == (200, name.encode() * 500)
    assert server.stats()["streams"]["refused"] == 0


@pytest.mark.parametrize(("name", "byte_range"), STREAMS)
def test_streams_and_pack_ranges_wait_for_a_slot(server, name, byte_range):
    assert server.start_stream() is None
    status, _, retry_after = get(server, VERSION + name, byte_range)
    assert status == 503 and retry_after is not None and int(retry_after) >= 1
    assert server.stats()["streams"]["refused"] == 1
    server.end_stream()  # the other stream is done: this one's turn
    status, body, _ = get(server, VERSION + name, byte_range)
    data = name.encode() * 500
    assert (status, body) == ((206, data[100:4196]) if byte_range else (200, data))
    assert server.stats()["streams"]["peak"] == 1


def test_an_index_and_its_diff_never_take_a_stream_slot(server):
    for name in ("rootfs.ext4.index", DIFF):
        assert get(server, VERSION + name)[0] == 200
    streams = server.stats()["streams"]
    assert (streams["peak"], streams["active"], streams["refused"]) == (0, 0, 0)
    assert get(server, VERSION + "rootfs.ext4.pack", "bytes=0-0")[0] == 206
    assert server.stats()["streams"]["peak"] == 1  # the pack does
