"""rackboot.serve as a real server on 127.0.0.1: ranges (checked against curl), plans, reports."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from rackboot import publish, serve
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats

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


@pytest.fixture
def server(master):
    srv = serve.make_server(master, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
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
    proc = subprocess.run(["curl", "-s", "--path-as-is", "-o", "-", "-w", "%{http_code}", *args,
                           f"http://127.0.0.1:{srv.server_address[1]}{path}"],
                          capture_output=True, check=True)
    return int(proc.stdout[-3:]), proc.stdout[:-3]


def test_get_whole_file(server, master):
    data = (master / STREAM.lstrip("/")).read_bytes()
    resp, body = request(server, "GET", STREAM)
    assert (resp.status, body) == (200, data)
    assert resp.getheader("Content-Length") == str(len(data))
    assert resp.getheader("Accept-Ranges") == "bytes"


@pytest.mark.parametrize("spec,python_slice", [
    ("0-0", slice(0, 1)), ("10-20", slice(10, 21)), ("99990-", slice(99990, None)),
    ("-50", slice(-50, None)), ("90000-999999999", slice(90000, None)), ("0-99999", slice(0, None))])
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


@pytest.mark.parametrize("header", ["bytes=20-10", "bytes=0-1,5-6", "items=0-5", "bytes=x-"])
def test_invalid_or_multi_ranges_send_the_whole_file(server, master, header):
    resp, body = request(server, "GET", STREAM, {"Range": header})
    assert (resp.status, body) == (200, (master / STREAM.lstrip("/")).read_bytes())


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


@pytest.mark.parametrize("path", [
    "/../secret", "/images/../../secret", "/images/%2e%2e/%2e%2e/secret", "/%2E%2E/secret",
    "/images%2f..%2f..%2fsecret", "//secret", "/images/example/./1/rootfs.ext4.gz", "/images/",
    "/images", "/", "/plans/..%2f..%2fsecret.json", "/images/.publish-1-x/out"])
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
    doc = {"node": "52-54-00-12-34-56", "phase": "download", "bytes": 4096, "seconds": 1.5,
           "error": None, "slot": "b", "version": 2, "time": 12.0}
    doc.update(kw)
    return json.dumps(doc).encode()


def test_reports_are_appended_one_line_each(server, master):
    for phase in ("download", "commit"):
        resp, body = request(server, "POST", "/report", {"Content-Type": "application/json"},
                             report(phase=phase))
        assert (resp.status, body) == (204, b"")
    lines = (master / "reports/52-54-00-12-34-56.jsonl").read_bytes().splitlines()
    assert [json.loads(l)["phase"] for l in lines] == ["download", "commit"]
    first = json.loads(lines[0])
    assert first["received"] > 0 and first["bytes"] == 4096 and first["slot"] == "b"
    assert formats.parse_report(lines[0]).node == "52-54-00-12-34-56"


@pytest.mark.parametrize("body,reason", [
    (b"{not json", "report: not valid JSON"),
    (report(phase="dancing"), "report: phase: must be one of"),
    (report(node="../../etc"), "report: node: '../../etc' is not a node id"),
    (json.dumps({"phase": "boot", "bytes": 0, "seconds": 0}).encode(), "report: node: missing")])
def test_bad_reports_are_400_with_a_reason(server, master, body, reason):
    resp, data = request(server, "POST", "/report", {}, body)
    assert resp.status == 400
    error = json.loads(data)["error"]
    assert error.startswith(reason) and "\n" not in error
    assert not (master / "reports").exists()


def test_oversized_report_is_refused_unread(server, master):
    resp, _ = request(server, "POST", "/report", {}, report(error="x" * 70_000))
    assert resp.status == 413 and not (master / "reports").exists()


def test_post_elsewhere_is_404(server):
    assert request(server, "POST", "/plans/x.json", {}, b"{}")[0].status == 404


def test_stats_count_body_bytes_per_path(server, master):
    request(server, "GET", STREAM)
    request(server, "GET", STREAM, {"Range": "bytes=0-999"})
    (master / "plans/default.json").write_bytes(DEFAULT_PLAN)
    request(server, "GET", "/plans/aa-bb-cc-dd-ee-ff.json")
    resp, body = request(server, "GET", "/stats")
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
    m = publish.publish_directory(root, master, image="example", version=None, label="v1", size_mib=None,
                                  kernel_release=None, modules_from=None, source_date_epoch=0)
    _, latest = request(server, "GET", "/images/example/latest.json")
    manifest_path = formats.parse_latest(latest).manifest
    resp, raw = request(server, "GET", manifest_path)
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
    lines = [l for l in capfd.readouterr().err.splitlines() if l]
    assert len(lines) == 1 and '"GET /plans/52-54-00-12-34-56.json HTTP/1.1" 200' in lines[0]
