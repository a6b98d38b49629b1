"""fetch: documents and resumable streams against a real loopback HTTP server."""

from __future__ import annotations

import socket

import pytest
from rackboot.initramfs.updater import fetch, formats, report
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.fetch import MasterClient, NoRange

from tests.integration.updater_master import CannedServer, Server

DATA = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images/blob").write_bytes(DATA)
    (tmp_path / "doc.json").write_bytes(
        b'{"format":1,"image":"x","version":3,"manifest":"/images/x/3/manifest.json"}\n'
    )
    yield srv.master
    srv.close()


def client(url, **kw):
    sleeps = []
    m = MasterClient(
        url,
        connect_timeout=1.0,
        read_timeout=0.5,
        retries=2,
        backoff=0.01,
        sleep=sleeps.append,
        report_timeout=0.5,
        **kw,
    )
    return m, sleeps


def test_get_doc_parses(server):
    m, _ = client(server.url)
    assert m.get_doc("/doc.json", formats.parse_latest).version == 3


def test_url_with_a_prefix(server, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/doc.json").write_bytes((tmp_path / "doc.json").read_bytes())
    m, _ = client(server.url + "/sub/")
    assert m.get_doc("/doc.json", formats.parse_latest).image == "x"


def test_404_is_not_retried(server):
    m, sleeps = client(server.url)
    with pytest.raises(UpdaterError, match="GET /nope.json: 404 not found"):
        m.get("/nope.json")
    assert len(server.requests) == 1 and sleeps == []


def test_500_is_retried_a_bounded_number_of_times_with_backoff(server):
    server.faults.status = 500
    m, sleeps = client(server.url)
    with pytest.raises(UpdaterError, match=r"GET /doc.json: HTTP 500 .*\(after 3 attempts\)"):
        m.get("/doc.json")
    assert len(server.requests) == 3 and sleeps == [0.01, 0.02]


def test_hang_times_out(server):
    server.faults.hang = 2.0
    m = MasterClient(server.url, read_timeout=0.3, retries=0)
    with pytest.raises(UpdaterError, match="timed out"):
        m.get("/doc.json")


def test_refused_connection(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        m, sleeps = client(f"http://127.0.0.1:{s.getsockname()[1]}")
        with pytest.raises(UpdaterError, match=r"connection refused \(after 3 attempts\)"):
            m.get("/x")
    assert len(sleeps) == 2


def test_bad_urls():
    for url in ["https://x", "ftp://x/", "http://", "http://h:notaport"]:
        with pytest.raises(UpdaterError, match="master: "):
            MasterClient(url)


def test_stream_resumes_with_range(server):
    server.faults.drop_after = 300000
    m, _ = client(server.url)
    assert b"".join(m.stream("/images/blob", len(DATA), chunk=65536)) == DATA
    assert [r.headers["Range"] for r in server.range_requests()] == ["bytes=300000-"]
    assert m.range_requests == 1 and server.image_bytes == len(DATA)


def test_stream_restarts_when_range_is_ignored(server):
    server.faults.drop_after = 300000
    server.faults.ignore_range = True
    m, _ = client(server.url)
    assert b"".join(m.stream("/images/blob", len(DATA))) == DATA
    assert m.stream_bytes == 300000 + len(DATA)


def test_stream_of_the_wrong_size_is_refused(server):
    m, _ = client(server.url)
    with pytest.raises(UpdaterError, match="1048576 bytes on the master, the manifest says 1000"):
        list(m.stream("/images/blob", 1000))


def test_stream_gives_up_after_repeated_failures_without_progress(server):
    server.faults.status = 503
    m, sleeps = client(server.url)
    with pytest.raises(UpdaterError, match=r"HTTP 503 .*after 3 attempts"):
        list(m.stream("/images/blob", len(DATA)))
    assert len(sleeps) == 2


def test_stream_404(server):
    m, _ = client(server.url)
    with pytest.raises(UpdaterError, match="404"):
        list(m.stream("/images/none", 10))


def test_report_is_best_effort(server):
    m, _ = client(server.url)
    r = report.make("n-1", "boot", bytes=5, seconds=1.23456, error="two\nlines")
    assert report.send(m, r)
    assert server.reports[0]["error"] == "two lines" and server.reports[0]["seconds"] == 1.235
    server.faults.status = 500
    assert not report.send(m, r)
    server.faults.status = None
    server.faults.hang = 2.0
    assert not report.send(m, r)  # short timeout, no exception
    assert not report.send(None, r)


def test_several_ranges_from_a_server_that_ignores_range_raise_norange_unread(server):
    server.faults.ignore_range = True
    m, _ = client(server.url)
    with pytest.raises(NoRange, match="answered 200 to a multi-range request"):
        m.get_ranges("/images/blob", [(0, 2), (10, 20)])
    assert m.stream_bytes == 0  # the whole file it offered was not read


def test_one_part_that_covers_every_range_is_cut_into_them(server):
    """A server may answer several ranges with one that spans them (this one sends from the
    first to the end of the file): each range is cut from it."""
    m, _ = client(server.url)
    spans = [(0, 2), (500_000, 500_100), (len(DATA) - 10, len(DATA))]
    assert m.get_ranges("/images/blob", spans) == [DATA[a:b] for a, b in spans]


def test_an_answer_far_larger_than_the_ranges_is_not_read(server):
    m, _ = client(server.url)
    with pytest.raises(NoRange, match="a multi-range answer of 1048576 bytes"):
        m.get_ranges("/images/blob", [(0, 2), (10, 20)])
    assert m.stream_bytes == 0


def test_a_multipart_body_is_split_by_its_parts_lengths_not_by_searching_for_the_boundary():
    data = b"\r\n--b\r\n\r\n" * 3  # a part's bytes may look like a boundary and a header end
    body = (
        b"\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-26/99\r\n\r\n"
        + data
        + b"\r\n--b\r\ncontent-range: bytes 40-41/99\r\n\r\nok\r\n--b--\r\n"
    )
    parts = fetch._byteranges(body)
    assert parts == [(0, data), (40, b"ok")]
    assert fetch._cut(parts, 5, 9) == data[5:9] and fetch._cut(parts, 40, 42) == b"ok"
    with pytest.raises(fetch._Retry):
        fetch._cut(parts, 30, 41)  # between two parts: not in the answer


@pytest.mark.parametrize("text", ["²", "\u0661\u0662", "12 ", "+12", "1_2", "-1", "", None, "9" * 5000])
def test_a_number_off_the_wire_is_ascii_digits_alone(text):
    """str.isdigit takes '²' (int() then raises); int() takes Arabic-Indic digits, '+12' and '1_2'."""
    assert fetch.wire_int(text) is None
    assert fetch.wire_int("0012") == 12


@pytest.mark.parametrize(
    "value", ["bytes ²-5/10", "bytes \u0661-\u0665/\u0661\u0660", "bytes +0-5/10", "bytes 0-5/1_0", "bytes 0-5"]
)
def test_a_content_range_of_other_digits_is_a_transient_failure(value):
    with pytest.raises(fetch._Retry, match="bad Content-Range"):
        fetch._content_range(value)
    assert fetch._content_range("bytes 0-5/*") == (0, 5, None)


@pytest.fixture
def canned():
    srv = CannedServer()
    yield srv
    srv.close()


def answer(status: str, *headers: bytes, body: bytes = b"") -> bytes:
    return f"HTTP/1.1 {status}\r\n".encode() + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


SUPERSCRIPT_TWO = b"\xb2"  # '²' in the ISO-8859-1 that HTTP headers are read as


@pytest.mark.parametrize(
    ("response", "call", "error"),
    [
        (
            answer("200 OK", b"Content-Length: " + SUPERSCRIPT_TWO, body=b"{}"),
            lambda m: m.get("/doc.json"),
            r"^master http://[^ ]+: GET /doc.json: a bad Content-Length '²' \(after 3 attempts\)$",
        ),
        (
            answer("200 OK", b"Content-Length: " + SUPERSCRIPT_TWO, body=b"xy"),
            lambda m: b"".join(m.stream("/images/blob", 2)),
            r"^master http://[^ ]+: GET /images/blob: a bad Content-Length '²' \(after 3 attempts\)$",
        ),
        (
            answer("503 Busy", b"Retry-After: " + SUPERSCRIPT_TWO, b"Content-Length: 0"),
            lambda m: b"".join(m.stream("/images/blob", 2)),
            r"^master http://[^ ]+: GET /images/blob: HTTP 503 Busy \(after 3 attempts\)$",
        ),
        (
            answer("206 Partial", b"Content-Range: bytes 0-1/2", b"Content-Length: " + SUPERSCRIPT_TWO, body=b"xy"),
            lambda m: m.get_ranges("/images/blob", [(0, 1), (1, 2)]),
            r"^master http://[^ ]+: GET /images/blob: a multi-range answer of ² bytes$",
        ),
    ],
    ids=["document-length", "stream-length", "retry-after", "multi-range-length"],
)
def test_a_header_of_other_digits_is_a_failed_fetch_in_one_line(canned, response, call, error):
    """'²' passed isdigit and then crashed int(): the ValueError escaped the updater into rescue."""
    canned.answer = response
    m, _ = client(canned.url)
    with pytest.raises(UpdaterError, match=error) as caught:
        call(m)
    assert "\n" not in str(caught.value)
