"""rackboot.master.serve as a real server on 127.0.0.1: ranges (checked against curl), plans, reports."""

from __future__ import annotations

import email
import email.policy
import hashlib
import http.client
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.master import publish, serve

STREAM = "/images/example/1/rootfs.ext4.gz"
DEFAULT_PLAN = b'{"format":1,"node":"default"}\n'
NODE_PLAN = b'{"format":1,"node":"52-54-00-12-34-56"}\n'


@pytest.fixture
def master(tmp_path) -> Path:
    m = tmp_path / "master"
    stream = m / STREAM.lstrip("/")
    stream.parent.mkdir(parents=True)
    stream.write_bytes(os.urandom(100_000))
    (m / "plans").mkdir()
    (m / "plans/52-54-00-12-34-56.json").write_bytes(NODE_PLAN)
    (tmp_path / "secret").write_text("outside the master\n")
    return m


def running(master, **kw):
    srv = serve.make_server(master, "127.0.0.1", 0, **{"quiet": True, **kw})
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return srv


@pytest.fixture
def server(master):
    srv = running(master)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def strict_server(master):
    """A server with a short per-operation timeout and room for only a few connections."""
    srv = running(master, idle_timeout=2.0, max_connections=4)
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def curl(srv, path: str, *args: str) -> tuple[int, bytes]:
    """Body and status as curl sees them (curl -r sends the Range header)."""
    proc = subprocess.run(
        [
            "curl",
            "-s",
            "--path-as-is",
            "-o",
            "-",
            "-w",
            "%{http_code}",
            *args,
            f"http://127.0.0.1:{srv.server_address[1]}{path}",
        ],
        capture_output=True,
        check=True,
    )
    return int(proc.stdout[-3:]), proc.stdout[:-3]


def test_get_whole_file(server, master):
    data = (master / STREAM.lstrip("/")).read_bytes()
    resp, body = request(server, "GET", STREAM)
    assert (resp.status, body) == (200, data)
    assert resp.getheader("Content-Length") == str(len(data))
    assert resp.getheader("Accept-Ranges") == "bytes"


@pytest.mark.parametrize(
    "spec,python_slice",
    [
        ("0-0", slice(0, 1)),
        ("10-20", slice(10, 21)),
        ("99990-", slice(99990, None)),
        ("-50", slice(-50, None)),
        ("90000-999999999", slice(90000, None)),
        ("0-99999", slice(0, None)),
    ],
)
def test_ranges_match_curl(server, master, spec, python_slice):
    data = (master / STREAM.lstrip("/")).read_bytes()
    status, body = curl(server, STREAM, "-r", spec)
    assert (status, body) == (206, data[python_slice])
    resp, raw = request(server, "GET", STREAM, {"Range": f"bytes={spec}"})
    start = range(len(data))[python_slice][0]
    assert resp.getheader("Content-Range") == f"bytes {start}-{start + len(raw) - 1}/{len(data)}"
    assert resp.getheader("Content-Length") == str(len(raw)) and raw == data[python_slice]


@pytest.mark.parametrize("spec", ["100000-", "200000-200010", "-0"])
def test_unsatisfiable_range_is_416(server, spec):
    resp, body = request(server, "GET", STREAM, {"Range": f"bytes={spec}"})
    assert (resp.status, body) == (416, b"")
    assert resp.getheader("Content-Range") == "bytes */100000"
    assert curl(server, STREAM, "-r", spec)[0] == 416


MANY = "bytes=" + ",".join(f"{2 * k}-{2 * k}" for k in range(serve.MAX_RANGES + 1))


@pytest.mark.parametrize(
    "header",
    [
        "bytes=20-10",
        "items=0-5",
        "bytes=x-",
        "bytes=5-6,0-1",  # backwards
        "bytes=0-5,3-8",  # overlapping: the same bytes twice
        "bytes=0-1,-5",  # a suffix among several
        "bytes=0-1,7-",  # an open end among several
        MANY,  # more ranges than a request may ask for
    ],
)
def test_invalid_ranges_send_the_whole_file(server, master, header):
    resp, body = request(server, "GET", STREAM, {"Range": header})
    assert (resp.status, body) == (200, (master / STREAM.lstrip("/")).read_bytes())


def multipart(resp, body: bytes) -> list[tuple[str, bytes]]:
    """The parts of a multipart/byteranges answer as the email package reads them: (Content-Range, bytes)."""
    message = email.message_from_bytes(
        f"Content-Type: {resp.getheader('Content-Type')}\r\n\r\n".encode() + body, policy=email.policy.HTTP
    )
    assert message.is_multipart()
    return [(part["Content-Range"], part.get_payload(decode=True)) for part in message.iter_parts()]


def test_several_ranges_come_as_one_multipart_answer(server, master):
    data = (master / STREAM.lstrip("/")).read_bytes()
    resp, body = request(server, "GET", STREAM, {"Range": "bytes=0-1, 10-19,99990-100500"})
    assert resp.status == 206 and resp.getheader("Content-Type").startswith("multipart/byteranges; boundary=")
    assert int(resp.getheader("Content-Length")) == len(body)
    assert multipart(resp, body) == [
        ("bytes 0-1/100000", data[0:2]),
        ("bytes 10-19/100000", data[10:20]),
        ("bytes 99990-99999/100000", data[99990:]),  # the last range ends at the file's end
    ]
    assert server.stats()["bytes_sent"] == {STREAM: len(body)}  # the parts' headers too: the body as sent
    status, curled = curl(server, STREAM, "-r", "0-1,10-19,99990-100500")
    assert status == 206 and curled.count(b"Content-Range: bytes ") == 3 and data[10:20] in curled


def test_the_updater_takes_several_ranges_in_one_request(server, master):
    data = (master / STREAM.lstrip("/")).read_bytes()
    client = MasterClient(f"http://127.0.0.1:{server.server_address[1]}")
    spans = [(0, 2), (4096, 8192), (50_000, 50_001), (99_000, 100_000)]
    assert client.get_ranges(STREAM, spans) == [data[a:b] for a, b in spans]
    assert client.stream_bytes == server.stats()["bytes_sent"][STREAM]


def test_head_sends_headers_only_and_counts_nothing(server):
    resp, body = request(server, "HEAD", STREAM)
    assert (resp.status, body, resp.getheader("Content-Length")) == (200, b"", "100000")
    resp, _ = request(server, "HEAD", STREAM, {"Range": "bytes=10-19"})
    assert (resp.status, resp.getheader("Content-Length")) == (206, "10")
    assert server.stats()["bytes_sent"] == {}


def test_keep_alive_serves_several_requests_on_one_connection(server, master):
    data = (master / STREAM.lstrip("/")).read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    got = b""
    for first in range(0, len(data), 30_000):
        conn.request("GET", STREAM, headers={"Range": f"bytes={first}-{first + 29_999}"})
        resp = conn.getresponse()
        assert resp.status == 206
        got += resp.read()
    conn.close()
    assert got == data


@pytest.mark.parametrize(
    "path",
    [
        "/../secret",
        "/images/../../secret",
        "/images/%2e%2e/%2e%2e/secret",
        "/%2E%2E/secret",
        "/images%2f..%2f..%2fsecret",
        "//secret",
        "/images/example/./1/rootfs.ext4.gz",
        "/images/",
        "/images",
        "/plans/..%2f..%2fsecret.json",
        "/images/.publish-1-x/out",
    ],
)
def test_traversal_hidden_files_and_directories_are_refused(server, master, path):
    (master / "images/.publish-1-x").mkdir()
    (master / "images/.publish-1-x/out").write_text("half-written")
    status, body = curl(server, path)
    assert status in (400, 404) and b"outside" not in body and b"half-written" not in body
    assert b"<" not in body  # no directory listing, no HTML


def test_absolute_form_and_symlinks_out_of_the_tree_are_refused(server, master):
    (master / "images/escape").symlink_to(master.parent / "secret")
    for path in ("http://127.0.0.1/../secret", "/images/escape", "secret"):
        resp, body = request(server, "GET", path)
        assert resp.status in (400, 404) and b"outside" not in body


def test_plan_for_a_known_node(server):
    resp, body = request(server, "GET", "/plans/52-54-00-12-34-56.json")
    assert (resp.status, body) == (200, NODE_PLAN)
    assert resp.getheader("Content-Type") == "application/json"


def test_unknown_node_is_404_until_there_is_a_default(server, master):
    resp, body = request(server, "GET", "/plans/52-54-00-99-99-99.json")
    assert resp.status == 404
    assert json.loads(body)["error"] == "no plan for node 52-54-00-99-99-99 and no plans/default.json"
    (master / "plans/default.json").write_bytes(DEFAULT_PLAN)
    resp, body = request(server, "GET", "/plans/52-54-00-99-99-99.json")
    assert (resp.status, body) == (200, DEFAULT_PLAN)
    assert request(server, "GET", "/plans/52-54-00-12-34-56.json")[1] == NODE_PLAN  # own plan wins


def report(**kw) -> bytes:
    doc = {
        "node": "52-54-00-12-34-56",
        "phase": "download",
        "bytes": 4096,
        "seconds": 1.5,
        "error": None,
        "slot": "b",
        "version": 2,
        "time": 12.0,
    }
    doc.update(kw)
    return json.dumps(doc).encode()


def test_reports_are_appended_one_line_each(server, master):
    for phase in ("download", "commit"):
        resp, body = request(server, "POST", "/report", {"Content-Type": "application/json"}, report(phase=phase))
        assert (resp.status, body) == (204, b"")
    lines = (master / "reports/52-54-00-12-34-56.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["phase"] for line in lines] == ["download", "commit"]
    first = json.loads(lines[0])
    assert first["received"] > 0 and first["bytes"] == 4096 and first["slot"] == "b"
    assert formats.parse_report(lines[0]).node == "52-54-00-12-34-56"


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"{not json", "report: not valid JSON"),
        (report(phase="dancing"), "report: phase: must be one of"),
        (report(node="../../etc"), "report: node: '../../etc' is not a node id"),
        (json.dumps({"phase": "boot", "bytes": 0, "seconds": 0}).encode(), "report: node: missing"),
        (report(error="done\x1b[2J\x1b[H"), "report: error: control character '\\x1b'"),
        (report(error="failed\r2026-01-01 all good"), "report: error: control character '\\r'"),
        (report(output="ok\n\x1b]0;owned\x07"), "report: output: control character '\\x1b'"),
    ],
)
def test_bad_reports_are_400_with_a_reason(server, master, body, reason):
    resp, data = request(server, "POST", "/report", {}, body)
    assert resp.status == 400
    error = json.loads(data)["error"]
    assert error.startswith(reason) and "\n" not in error
    assert not (master / "reports").exists()


@pytest.mark.parametrize(
    "header",
    [
        "bytes=²-",
        "bytes=-²",
        "bytes=0-²",
        "bytes=0-1,²-5",
        "bytes=\u0661\u0662-",
        "bytes=0-1,\u0661\u0662-\u0661\u0665",
        "bytes=+5-",
        "bytes=1_0-",
    ]
    + ["bytes=" + "9" * 5000 + "-", "bytes=0-1," + "9" * 5000 + "-" + "9" * 5000],
)
def test_range_numbers_are_ascii_digits_alone(header):
    """str.isdigit takes '²' and int() then raised; int() took Arabic-Indic "12" as 12 and 5000 digits not at all."""
    assert serve.parse_range(header, 100) is None and serve.parse_ranges(header, 100) is None


@pytest.mark.parametrize("header", ["bytes=²-", "bytes=0-1,²-5"])
def test_a_range_of_other_digits_gets_the_whole_file(server, master, header):
    resp, body = request(server, "GET", STREAM, {"Range": header})  # '²' goes out as ISO-8859-1, as HTTP reads it
    assert (resp.status, body) == (200, (master / STREAM.lstrip("/")).read_bytes())


@pytest.mark.parametrize(
    ("path", "length", "status", "error"),
    [
        ("/report", "²", 411, "report: Content-Length required, a number of bytes"),
        ("/report", "9" * 5000, 411, "report: Content-Length required, a number of bytes"),
        ("/api/nodes/52-54-00-12-34-56/assign", "²", 400, "action: Content-Length is not a number of bytes"),
    ],
)
def test_a_body_length_of_other_digits_is_answered_not_dropped(server, master, path, length, status, error):
    resp, data = request(server, "POST", path, {"Content-Length": length}, report())
    assert (resp.status, json.loads(data)) == (status, {"error": error})
    assert not (master / "reports").exists()
    assert request(server, "GET", "/stats")[0].status == 200  # and the master goes on


def test_private_keys_and_files_kept_from_others_are_never_sent(server, master):
    keys = master / "keys"
    keys.mkdir()
    (keys / "master.key").write_text("PRIVATE KEY\n")
    (keys / "master.key").chmod(0o644)  # a key is never sent, however readable
    (keys / "master.key.pub").write_text("public key\n")
    (keys / "master.pub").symlink_to("master.key")  # nor under another name
    kept = master / "images/example/1/notes.txt"
    kept.write_text("PRIVATE notes\n")
    kept.chmod(0o600)
    for path in ("/keys/master.key", "/keys/master.pub", "/images/example/1/notes.txt"):
        for method in ("GET", "HEAD"):
            resp, body = request(server, method, path)
            assert resp.status == 404 and b"PRIVATE" not in body
        assert json.loads(request(server, "GET", path)[1]) == {"error": f"no such file: {path}"}  # as if missing
    resp, body = request(server, "GET", "/keys/master.key.pub")
    assert (resp.status, body) == (200, b"public key\n")  # a public key, world-readable: sent


def test_oversized_report_is_refused_unread(server, master):
    resp, _ = request(server, "POST", "/report", {}, report(error="x" * 70_000))
    assert resp.status == 413 and not (master / "reports").exists()


def test_post_elsewhere_is_404(server):
    assert request(server, "POST", "/plans/x.json", {}, b"{}")[0].status == 404


def test_stats_count_body_bytes_per_path(server, master):
    (master / "plans/default.json").write_bytes(DEFAULT_PLAN)
    # One keep-alive connection: the server finishes counting a response before it reads
    # the next request, so /stats sees every byte (a new connection could overtake it).
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    for path, headers in (
        (STREAM, {}),
        (STREAM, {"Range": "bytes=0-999"}),
        ("/plans/aa-bb-cc-dd-ee-ff.json", {}),
        ("/stats", {}),
    ):
        conn.request("GET", path, headers=headers)
        body = conn.getresponse().read()
    conn.close()
    stats = json.loads(body)
    assert stats["bytes_sent"] == {STREAM: 101_000, "/plans/default.json": len(DEFAULT_PLAN)}
    assert stats["total_bytes_sent"] == 101_000 + len(DEFAULT_PLAN)


def test_large_file_is_streamed_in_chunks(server, master):
    big = master / "images/example/1/big.bin"
    with open(big, "wb") as f:  # larger than one sendfile chunk, mostly a hole
        f.truncate(serve.SEND_CHUNK * 2 + 12345)
        f.write(b"head")
    status, body = curl(server, "/images/example/1/big.bin")
    assert status == 200 and len(body) == big.stat().st_size and body[:4] == b"head"
    assert server.stats()["bytes_sent"]["/images/example/1/big.bin"] == big.stat().st_size


def test_published_image_fetched_over_http_matches_its_manifest(tmp_path, server, master):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("worker\n")
    shutil.rmtree(master / "images")
    m = publish.publish_directory(
        root,
        master,
        image="example",
        version=None,
        label="v1",
        size_mib=None,
        kernel_release=None,
        modules_from=None,
        source_date_epoch=0,
    )
    _, latest = request(server, "GET", "/images/example/latest.json")
    manifest_path = formats.parse_latest(latest).manifest
    _, raw = request(server, "GET", manifest_path)
    assert formats.parse_manifest(raw) == m
    half = m.stream_size // 2
    _, a = request(server, "GET", m.stream_path(manifest_path), {"Range": f"bytes=0-{half - 1}"})
    _, b = request(server, "GET", m.stream_path(manifest_path), {"Range": f"bytes={half}-"})
    assert hashlib.sha256(a + b).hexdigest() == m.stream_sha256


def test_missing_master_is_a_clean_error(tmp_path):
    with pytest.raises(RackbootError, match="master directory .*nowhere does not exist"):
        serve.make_server(tmp_path / "nowhere", "127.0.0.1", 0)


def test_request_lines_are_logged_unless_quiet(master, capfd):
    srv = serve.make_server(master, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        request(srv, "GET", "/plans/52-54-00-12-34-56.json")
    finally:
        srv.shutdown()
        srv.server_close()
    lines = [line for line in capfd.readouterr().err.splitlines() if line and not line.startswith("inventory: ")]
    assert len(lines) == 1 and '"GET /plans/52-54-00-12-34-56.json HTTP/1.1" 200' in lines[0]


@pytest.mark.parametrize(
    "node",
    [
        "hello",
        "default",
        "52:54:00:12:34:56",
        "52-54-00-12-34-5A",
        "52-54-00-12-34-56-78",
        "5254.0012.3456",
        "52-54-00-12-34",
    ],
)
def test_reports_only_for_canonical_node_ids(master, capfd, node):
    srv = running(master, quiet=False)
    try:
        resp, data = request(srv, "POST", "/report", {}, report(node=node))
    finally:
        srv.shutdown()
        srv.server_close()
    assert resp.status == 400
    assert json.loads(data)["error"] == (
        f"report: node: {node!r} is not a node id (a MAC in lowercase with dashes, e.g. 52-54-00-12-34-56)"
    )
    assert not (master / "reports").exists()
    refused = [line for line in capfd.readouterr().err.splitlines() if "report refused" in line]
    assert len(refused) == 1 and repr(node) in refused[0]


def stalled_report(srv) -> socket.socket:
    """A client that sends half a report and then nothing more."""
    sock = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10)
    sock.sendall(b'POST /report HTTP/1.1\r\nHost: master\r\nContent-Length: 1000\r\n\r\n{"node": ')
    return sock


def until_closed(socks: list[socket.socket], on_wait=lambda: None) -> list[bytes]:
    """What each connection received before the server closed it (bounded: 60 s at most)."""
    got = {s: b"" for s in socks}
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while sel.get_map() and time.monotonic() < deadline:
            on_wait()
            for key, _ in sel.select(timeout=0.1):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                got[key.fileobj] += data
                if not data:
                    sel.unregister(key.fileobj)
        still_open = len(sel.get_map())
    for s in socks:
        s.close()
    assert still_open == 0, f"{still_open} stalled connections still held"
    return [got[s] for s in socks]


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer else 0


def get_with_retries(srv, path: str) -> tuple[int, bytes]:
    """A well-behaved client: 503 or a refused connection means try again a little later."""
    for _ in range(200):
        try:
            resp, body = request(srv, "GET", path)
        except ConnectionError:
            resp, body = None, b""
        if resp is not None and resp.status != 503:
            return resp.status, body
        time.sleep(0.1)
    raise AssertionError(f"GET {path}: still refused after 200 tries")


@pytest.mark.slow
def test_stalled_clients_are_closed_and_bounded_while_others_are_served(strict_server, master):
    threads = threading.active_count()
    most = [0]

    def sample() -> None:
        most[0] = max(most[0], threading.active_count() - threads)

    stalled = [stalled_report(strict_server) for _ in range(3)]
    # room left: a well-behaved client is served at once while three connections stall
    resp, body = request(strict_server, "GET", "/plans/52-54-00-12-34-56.json")
    assert (resp.status, body) == (200, NODE_PLAN)
    stalled += [stalled_report(strict_server) for _ in range(27)]
    sample()
    # the bound is full: a client that retries after a 503 is served once the stalled ones time out
    assert get_with_retries(strict_server, "/plans/52-54-00-12-34-56.json") == (200, NODE_PLAN)
    statuses = [status_of(a) for a in until_closed(stalled, sample)]
    assert most[0] <= 4, f"{most[0]} connection threads for max_connections=4"
    assert set(statuses) <= {408, 503} and 503 in statuses and 408 in statuses, statuses
    assert not (master / "reports").exists()


@pytest.mark.slow
def test_refused_connection_gets_a_503_and_is_closed(master, capfd):
    srv = running(master, quiet=False, idle_timeout=2.0, max_connections=4)
    try:
        stalled = [stalled_report(srv) for _ in range(4)]
        extra = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10)
        [answer] = until_closed([extra])
        until_closed(stalled)
    finally:
        srv.shutdown()
        srv.server_close()
    assert status_of(answer) == 503 and b"Retry-After: 1\r\n" in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"].startswith("busy")
    assert "127.0.0.1 refused: all 4 connections busy" in capfd.readouterr().err


@pytest.mark.slow
def test_idle_keep_alive_connection_is_closed(strict_server):
    sock = socket.create_connection(("127.0.0.1", strict_server.server_address[1]), timeout=10)
    sock.sendall(b"GET /plans/52-54-00-12-34-56.json HTTP/1.1\r\nHost: master\r\n\r\n")
    [answer] = until_closed([sock])  # one answer, then nothing: the server hangs up
    assert status_of(answer) == 200 and answer.endswith(NODE_PLAN)


@pytest.mark.slow
def test_slow_reader_is_not_cut_off_while_data_moves(master):
    """The timeout is per socket operation: a stream that takes far longer than it still arrives."""
    srv = running(master, idle_timeout=0.5)
    big = master / "images/example/1/big.bin"
    with open(big, "wb") as f:
        f.truncate(serve.SEND_CHUNK + 12345)
        f.write(os.urandom(4096))
    want = hashlib.sha256(big.read_bytes()).hexdigest()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.settimeout(10)
    try:
        sock.connect(("127.0.0.1", srv.server_address[1]))
        sock.sendall(b"GET /images/example/1/big.bin HTTP/1.1\r\nHost: master\r\nConnection: close\r\n\r\n")
        got = bytearray()
        while piece := sock.recv(64 << 10):
            got += piece
            time.sleep(0.01)  # at most 6.4 MB/s: the 8 MiB take longer than the timeout
    finally:
        sock.close()
        srv.shutdown()
        srv.server_close()
    head, body = bytes(got).split(b"\r\n\r\n", 1)
    assert status_of(head) == 200 and hashlib.sha256(body).hexdigest() == want


@pytest.mark.slow
def test_cli_takes_the_timeout_and_the_connection_bound(tmp_path, master):
    (tmp_path / "rackboot.toml").write_text('[master]\ndirectory = "master"\n')
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rackboot",
            "serve",
            "-c",
            str(tmp_path / "rackboot.toml"),
            "--port",
            "0",
            "--timeout",
            "2",
            "--max-connections",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stderr.readline()
        assert first.startswith(f"serving {master} on http://127.0.0.1:"), first
        port = int(first.rsplit(":", 1)[1])
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"POST /report HTTP/1.1\r\nHost: master\r\nContent-Length: 100\r\n\r\n{")
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert [status_of(a) for a in until_closed([extra, held])] == [503, 408]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def test_the_fleets_log_lines_escape_what_the_rack_sent(master, capfd):
    """The inventory and rollouts log lines that quote reports (a halt quotes the failures)."""
    srv = running(master, quiet=False)
    try:
        srv.fleet.log("rollout 1: halted in wave 1: 52-54-00-12-34-56: bad\x1b[2J\r2026-01-01 all good")
    finally:
        srv.shutdown()
        srv.server_close()
    err = capfd.readouterr().err
    assert "\x1b" not in err and "\r" not in err
    assert "52-54-00-12-34-56: bad\\x1b[2J\\x0d2026-01-01 all good\n" in err


def test_log_lines_escape_what_the_client_sent(master, capfd):
    srv = running(master, quiet=False)
    try:
        sock = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10)
        sock.sendall(b"GET /\x1b[2J\x07 HTTP/1.1\r\nHost: master\r\nConnection: close\r\n\r\n")
        until_closed([sock])
    finally:
        srv.shutdown()
        srv.server_close()
    err = capfd.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert '"GET /\\x1b[2J\\x07 HTTP/1.1" 404' in err
