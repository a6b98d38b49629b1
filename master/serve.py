"""`rackboot serve`: the master's HTTP side (plans, manifests, images, reports).

Static GETs serve the master tree that `rackboot publish` writes (any HTTP server could);
the extras are the per-node plan fallback, POST /report, and GET /stats with the bytes
sent per path. Files go out with sendfile in chunks, so a multi-GiB stream costs no memory.

A stalled client cannot pin a thread: every socket operation has a timeout (not the whole
request, so a slow stream that keeps moving is never cut off), and past MAX_CONNECTIONS
open connections a new one gets a quick 503, which the updater retries with backoff.

A rack switched on together must not split the link a hundred ways: at most max_streams
image streams (GETs of the stream and pack files under /images/, not of manifests,
signatures, hooks or block indexes and their diffs) are sent at once. One more gets a 503
with Retry-After at once, which the updater waits out (with jitter) before it asks again;
a stream keeps its slot until its response is sent or its connection drops. /stats shows
the streams at their peak.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections import Counter, deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal
from urllib.parse import unquote, urlsplit

from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.master import nodekeys
from rackboot.master.limits import IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_STREAMS
from rackboot.master.numbers import ascii_int

if TYPE_CHECKING:
    from rackboot.config import Config

    from .web import Reply

MAX_REPORT = 64 * 1024
MAX_ACTION = 4096  # an API action's JSON body
SEND_CHUNK = 8 << 20
_BUSY_BODY = b'{"error":"busy: too many connections, retry later"}\n'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nServer: rackboot\r\nRetry-After: 1\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
    % (len(_BUSY_BODY), _BUSY_BODY)
)
# control characters (and the backslash) as http.server's own log writes them: \x1b, \\
_LOG_ESCAPES = str.maketrans({**{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}, ord("\\"): "\\\\"})
# what socketserver's methods take: a TCP server's is always the connection's socket
_Request = socket.socket | tuple[bytes, socket.socket]
_TYPES = {".json": "application/json", ".jsonl": "application/x-ndjson", ".sig": "application/octet-stream"}
# under /images/: manifests, latest.json, signatures, hook scripts, block indexes and their diffs
# (small, and fetched before a delta's Range requests, which do count)
_NOT_STREAMS = re.compile(r".*(\.json|\.sig|\.sh|\.index|\.index\.from-[0-9a-f]{64})")
RETRY_AFTER = 2  # seconds a refused stream is told to wait while few others wait too
RETRY_AFTER_MAX = 10  # however long the queue: a worker should see its turn soon after it comes


class MasterServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows its master tree and counts what it sends."""

    daemon_threads = True
    request_queue_size = 128  # a rack powering on together connects at once (the default is 5)

    def __init__(
        self,
        master: Path,
        address: tuple[str, int],
        quiet: bool = False,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_streams: int = MAX_STREAMS,
        config: Config | None = None,
        tick: float | None = None,
        proxied_by: str | None = None,
    ):
        from .web import Fleet  # the inventory, the page and the API

        self.master = master.resolve()
        self.quiet = quiet
        self.proxied_by = proxied_by  # a reverse proxy's address: its X-Real-IP names the client
        # the inventory's and rollouts' lines quote the rack's reports: no terminal escapes from them
        log = None if quiet else lambda line: print(line.translate(_LOG_ESCAPES), file=sys.stderr)
        self.fleet = Fleet.open(self.master, config, log=log)
        self.tick = tick  # seconds between looks at a running rollout (None: rollout.TICK)
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections = threading.BoundedSemaphore(max_connections)
        self.sent: Counter[str] = Counter()  # URL path -> body bytes sent
        self.lock = threading.Lock()
        self.max_streams = max_streams
        self.streams = 0  # image streams being sent now
        self.peak_streams = 0
        self.refused_streams = 0
        self.refusals: deque[float] = deque()  # when streams were refused in the last RETRY_AFTER s
        super().__init__(address, MasterHandler)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.fleet.start_ticking(self.tick)  # a silent wave still ends at its timeout
        super().serve_forever(poll_interval)

    def server_close(self) -> None:
        self.fleet.stop()
        super().server_close()

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]  # what server_address holds, as str (the stub allows bytes)
        return f"http://{host}:{port}"

    def count(self, path: str, n: int) -> None:
        with self.lock:
            self.sent[path] += n

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "bytes_sent": dict(self.sent),
                "total_bytes_sent": sum(self.sent.values()),
                "streams": {
                    "max": self.max_streams,
                    "active": self.streams,
                    "peak": self.peak_streams,
                    "refused": self.refused_streams,
                },
            }

    def start_stream(self) -> int | None:
        """Take a stream slot: None when taken, else the seconds to tell the client to wait.
        Each waiting client asks about once per RETRY_AFTER s, so the refusals of the last
        RETRY_AFTER s count the queue: a second more for each max_streams of it."""
        with self.lock:
            if self.streams < self.max_streams:
                self.streams += 1
                self.peak_streams = max(self.peak_streams, self.streams)
                return None
            self.refused_streams += 1
            now = time.monotonic()
            while self.refusals and self.refusals[0] < now - RETRY_AFTER:
                self.refusals.popleft()
            self.refusals.append(now)
            return min(RETRY_AFTER + (len(self.refusals) - 1) // self.max_streams, RETRY_AFTER_MAX)

    def end_stream(self) -> None:
        with self.lock:
            self.streams -= 1

    def process_request(self, request: _Request, client_address: Any) -> None:
        """A thread for the connection while there are fewer than max_connections, else a 503."""
        if not self.connections.acquire(blocking=False):
            assert isinstance(request, socket.socket)  # a TCP server's request is the connection
            return self.refuse(request, client_address)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()  # no thread started to release it
            raise

    def process_request_thread(self, request: _Request, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.fleet.inventory.release()  # its SQLite connection, for the next connection's thread
            self.connections.release()

    def refuse(self, request: socket.socket, client_address: Any) -> None:
        """Answer 503 and close, without waiting on the client: this runs in the accept loop."""
        if not self.quiet:
            sys.stderr.write(f"{client_address[0]} refused: all {self.max_connections} connections busy\n")
        try:
            request.setblocking(False)
            request.send(_BUSY)  # a fresh socket's send buffer takes it whole
            request.recv(65536)  # what already came: closing with it unread would reset the 503 away
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: _Request, client_address: Any) -> None:
        # a worker that loses power resets its connections, a stalled one times out:
        # routine, not worth a traceback
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, TimeoutError)):
            super().handle_error(request, client_address)


def make_server(
    master: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    quiet: bool = False,
    idle_timeout: float = IDLE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    max_streams: int = MAX_STREAMS,
    config: Config | None = None,
    tick: float | None = None,
    proxied_by: str | None = None,
) -> MasterServer:
    """A bound, not yet running server for `master` (port 0 = any free port); ``config``
    gives the inventory its adoption mode, the API its token and rollouts their plans;
    ``tick``: seconds between its looks at a running rollout (default rollout.TICK);
    ``proxied_by``: the address of a reverse proxy whose X-Real-IP header names the client."""
    master = Path(master)
    if proxied_by is not None:
        try:
            proxied_by = str(ipaddress.ip_address(proxied_by))
        except ValueError:
            raise RackbootError(f"--proxied-by: {proxied_by[:100]!r} is not an IP address") from None
    if not master.is_dir():
        raise RackbootError(f"master directory {master} does not exist")
    try:
        return MasterServer(
            master,
            (host, port),
            quiet,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
            max_streams=max_streams,
            config=config,
            tick=tick,
            proxied_by=proxied_by,
        )
    except OSError as e:
        raise RackbootError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def serve_forever(
    master: str | Path,
    host: str,
    port: int,
    *,
    quiet: bool = False,
    idle_timeout: float = IDLE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    max_streams: int = MAX_STREAMS,
    netboot: Config | None = None,
    config: Config | None = None,
    proxied_by: str | None = None,
) -> None:
    """Run the master until interrupted (Ctrl-C returns normally). With ``netboot``, a config
    whose [network] interface is set, dnsmasq serves TFTP (and DHCP) beside it and stops with it."""
    from rackboot.master import rsyncd
    from rackboot.master.dnsmasq import NetbootService, check_can_run

    service = None
    if netboot is not None and netboot.network.interface:
        check_can_run(netboot)  # before anything listens
        service = NetbootService(netboot)
    cfg = config or netboot
    rsync = rsyncd.RsyncService(Path(master), host, cfg.master.rsync_port) if cfg and cfg.master.rsync_port else None
    if rsync is not None:
        rsyncd.check_can_run(rsync.master, host, rsync.port)
    server = make_server(
        master,
        host,
        port,
        quiet=quiet,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        max_streams=max_streams,
        config=config or netboot,
        proxied_by=proxied_by,
    )
    try:
        if service is not None:
            service.start()
        if rsync is not None:
            rsync.start()
        print(f"serving {server.master} on {server.url}", file=sys.stderr)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if rsync is not None:
            rsync.stop()
        if service is not None:
            service.stop()
        server.server_close()


def parse_range(header: str | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """Range header -> (first, last) inclusive, None (send it all) or "unsatisfiable".

    One range only; anything else is ignored as RFC 9110 allows, and the whole file is sent.
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[6:].strip(" \t").partition("-")
    start, stop = ascii_int(first), ascii_int(last)
    if not sep or (start is None and first != "") or (stop is None and last != ""):
        return None
    if start is None:  # suffix: the last N bytes
        if not stop:
            return "unsatisfiable" if stop == 0 else None
        return (max(size - stop, 0), size - 1) if size else "unsatisfiable"
    if stop is not None and stop < start:
        return None  # invalid, not unsatisfiable
    if start >= size:
        return "unsatisfiable"
    return start, size - 1 if stop is None else min(stop, size - 1)


MAX_RANGES = 256  # ranges in one request; more is answered with the whole file, as RFC 9110 allows


def parse_ranges(header: str | None, size: int) -> list[tuple[int, int]] | None:
    """A Range header of two or more ``first-last`` ranges, ascending and apart, within
    the file -> [(first, last)] inclusive; None (send it all) for anything else. Ranges that
    overlap or go backwards are not served one by one: a request cannot make the master
    send the same bytes many times over."""
    if not header or not header.startswith("bytes=") or "," not in header:
        return None
    spans: list[tuple[int, int]] = []
    for part in header[6:].split(","):
        first, sep, last = part.strip(" \t").partition("-")
        start, stop = ascii_int(first), ascii_int(last)
        if not sep or start is None or stop is None or len(spans) == MAX_RANGES:
            return None
        end = min(stop, size - 1)
        if end < start or (spans and start <= spans[-1][1]):
            return None
        spans.append((start, end))
    return spans


def is_private(asked: Path, real: Path) -> bool:
    """Never sent, whatever the tree holds: a private key by the name asked for or the one it
    resolves to (a signing key would let anyone sign hooks that run as root on every worker),
    or a file its owner kept from others (not world-readable)."""
    return asked.name.endswith(".key") or real.name.endswith(".key") or not real.stat().st_mode & 0o004


def check_node_id(node: str) -> None:
    """Reports are kept per node, so only a node id as the updater makes it (formats.node_id:
    a MAC, lowercase, with dashes) names a report file; raises UpdaterError otherwise."""
    try:
        canonical = formats.node_id(node.replace("-", ":")) == node
    except UpdaterError:
        canonical = False
    if not canonical:
        raise UpdaterError(
            f"report: node: {node[:128]!r} is not a node id (a MAC in lowercase with dashes, e.g. 52-54-00-12-34-56)"
        )


class MasterHandler(BaseHTTPRequestHandler):
    server: MasterServer
    protocol_version = "HTTP/1.1"  # keep-alive: the updater makes many range requests
    server_version = "rackboot"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)  # per socket operation, for reads and writes

    # --- dispatch -----------------------------------------------------------------------

    def do_GET(self) -> None:
        self._get(body=True)

    def do_HEAD(self) -> None:
        self._get(body=False)

    def do_POST(self) -> None:
        if self._url_path() == "/report":
            self._report()
        elif (path := self._url_path() or "").startswith("/api/"):
            self._web_post(path)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": "only POST /report is accepted"})

    def _get(self, body: bool) -> None:
        path = self._url_path()
        if path is None:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "malformed request path"}, body)
        if path == "/stats":
            return self._json(HTTPStatus.OK, self.server.stats(), body)
        if path == "/" or path.startswith("/api/"):  # the fleet page and its API (master/web.py)
            return self._reply(self.server.fleet.get(path), body)
        parts = path.split("/")[1:]
        if any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such file: {path[:200]}"}, body)
        if len(parts) == 2 and parts[0] == "plans":
            for suffix in (".json", ".json.sig"):  # a plan and its signature fall back together
                if parts[1].endswith(suffix):
                    return self._plan(parts[1][: -len(suffix)], body, suffix)
        stream = body and parts[0] == "images" and not _NOT_STREAMS.fullmatch(parts[-1])
        self._file(path, self.server.master.joinpath(*parts), body, stream=stream)

    def client_ip(self) -> str:
        """The client's address: the connection's, or through the trusted reverse proxy
        (serve --proxied-by) the one its X-Real-IP names, when that is an IP address."""
        ip: str = self.client_address[0]
        if ip == self.server.proxied_by:
            try:
                return str(ipaddress.ip_address((self.headers.get("X-Real-IP") or "").strip()))
            except ValueError:
                pass
        return ip

    def _url_path(self) -> str | None:
        """The decoded path of the request target, or None when it cannot be one."""
        target = urlsplit(self.path).path
        if not target.startswith("/"):
            return None
        try:
            decoded = unquote(target, errors="strict")
        except UnicodeDecodeError:
            return None
        return None if "\0" in decoded else decoded

    # --- GET: plans and files --------------------------------------------------------------

    def _plan(self, node: str, body: bool, suffix: str = ".json") -> None:
        fleet = self.server.fleet
        candidate = fleet.plan_for(node, suffix)  # its own, else the default one (unless not adopted)
        if suffix == ".json" and body:  # the inventory: a GET is a node seen (its .sig comes next); a HEAD is not
            fleet.saw_plan_request(node, self.client_ip(), self.headers.get("X-Rackboot-Serial"), candidate)
        if candidate is not None and (named := fleet.named_default(node, candidate, suffix, spend=body)) is not None:
            return self._reply(named, body)
        if candidate is not None:
            return self._file(f"/plans/{candidate.name}", candidate, body)
        why = f": it is not adopted yet (rackboot adopt {node[:128]})" if fleet.manual else " and no plans/default.json"
        self._json(
            HTTPStatus.NOT_FOUND,
            {"error": f"no plan for node {node[:128]}{why}", "node": node[:128]},
            body,
        )

    def _file(self, url_path: str, path: Path, body: bool, *, stream: bool = False) -> None:
        try:
            real = path.resolve(strict=True)
            inside = real.is_relative_to(self.server.master) and real.is_file()
            private = inside and is_private(path, real)
        except (OSError, RuntimeError):
            inside = private = False
        if private:  # answered like a missing file: a client learns nothing of it
            self.log_message("not sent: %s is a private key or not world-readable", url_path[:200])
        if not inside or private:  # missing, a directory (no listings) or a symlink out of the tree
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such file: {url_path[:200]}"}, body)
        with open(real, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            wanted = parse_range(self.headers.get("Range"), size)
            if isinstance(wanted, str):  # "unsatisfiable"
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            spans = None if wanted else parse_ranges(self.headers.get("Range"), size)
            if stream and (wait := self.server.start_stream()) is not None:
                return self._busy(wait)
            try:
                if spans:
                    return self._send_ranges(url_path, f, spans, size, body)
                first, last = wanted if wanted else (0, size - 1)
                self.send_response(HTTPStatus.PARTIAL_CONTENT if wanted else HTTPStatus.OK)
                if wanted:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.send_header("Content-Type", _TYPES.get(real.suffix, "application/octet-stream"))
                self.send_header("Content-Length", str(last - first + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    self._send_file(url_path, f, first, last - first + 1)
            finally:
                if stream:  # sent, or the connection dropped: the next worker's turn
                    self.server.end_stream()

    def _send_ranges(self, url_path: str, f: BinaryIO, spans: list[tuple[int, int]], size: int, body: bool) -> None:
        """206 multipart/byteranges: each range as a part with its own Content-Range (a block
        delta asks for hundreds of scattered blocks in a few requests this way)."""
        boundary = f"rackboot-{secrets.token_hex(12)}"
        heads = [
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n".encode()
            for first, last in spans
        ]
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = sum(map(len, heads)) + sum(last - first + 1 for first, last in spans) + len(tail)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", f"multipart/byteranges; boundary={boundary}")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        for head, (first, last) in zip(heads, spans, strict=True):
            self.wfile.write(head)
            self.server.count(url_path, len(head))  # the body's bytes, as the updater counts them
            self._send_file(url_path, f, first, last - first + 1)
            if self.close_connection:
                return
        self.server.count(url_path, len(tail))  # before: a client that has it all may look at /stats at once
        self.wfile.write(tail)

    def _busy(self, wait: int) -> None:
        """All stream slots taken: come back in ``wait`` s (and free this thread now)."""
        self.close_connection = True
        data = formats.dump({"error": f"busy: all {self.server.max_streams} image streams in use, retry in {wait} s"})
        self.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
        self.send_header("Retry-After", str(wait))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_file(self, url_path: str, f: BinaryIO, offset: int, count: int) -> None:
        """sendfile in chunks, counting as it goes so /stats is right even after a hang-up."""
        while count > 0:
            try:
                n = self.connection.sendfile(f, offset, min(count, SEND_CHUNK))
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            if n == 0:
                self.close_connection = True  # the file shrank under us; the length is now a lie
                return
            self.server.count(url_path, n)
            offset, count = offset + n, count - n

    # --- POST /report -----------------------------------------------------------------------

    def _report(self) -> None:
        length = ascii_int(self.headers.get("Content-Length", "").strip(" \t"))
        if length is None:
            self.close_connection = True  # a body of unknown length: the connection cannot go on
            return self._json(
                HTTPStatus.LENGTH_REQUIRED, {"error": "report: Content-Length required, a number of bytes"}
            )
        if length > MAX_REPORT:
            self.close_connection = True  # not reading a body that big
            return self._json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"report: {length} bytes is more than {MAX_REPORT}"}
            )
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            return self._json(
                HTTPStatus.REQUEST_TIMEOUT, {"error": f"report: body not sent within {self.server.idle_timeout:g} s"}
            )
        try:
            report = formats.parse_report(data)
            check_node_id(report.node)
            signature = nodekeys.parse_signature(self.headers.get(nodekeys.SIGNATURE_HEADER))
        except (UpdaterError, ValueError) as e:
            self.log_message("report refused: %s", e)
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        received = round(time.time(), 3)
        try:
            taken = self.server.fleet.inventory.ingest(
                report, received=received, ip=self.client_ip(), body=data, signature=signature
            )
        except (nodekeys.Busy, nodekeys.Unavailable) as e:  # not checked, so not taken: one line, and a 503
            self.log_message("report not taken: %s", e)
            return self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"report: {e}"})
        except Exception as e:  # the inventory must never cost the master a report: the file below keeps it
            self.log_message("report kept only in reports/: inventory: %s: %s", type(e).__name__, e)
        else:
            if taken.outcome == "replay":  # (the inventory logged why)
                return self._json(HTTPStatus.OK, {"ignored": taken.reason})
            if taken.outcome == "refused":  # kept in the history, marked refused; never counted
                return self._json(HTTPStatus.FORBIDDEN, {"error": f"report refused: {taken.reason}"})
        line = {**report.to_dict(), "received": received}
        reports = self.server.master / "reports"
        with self.server.lock:  # one writer at a time keeps lines whole
            reports.mkdir(exist_ok=True)
            with open(reports / f"{report.node}.jsonl", "ab") as out:
                out.write(formats.dump(line))
        self.send_response(HTTPStatus.NO_CONTENT)
        self.send_header("Content-Length", "0")
        self.end_headers()

    # --- the fleet API's actions (master/web.py) ------------------------------------------------

    def _web_post(self, path: str) -> None:
        length = ascii_int(self.headers.get("Content-Length", "0").strip(" \t"))
        if length is None:
            self.close_connection = True  # a body of unknown length: the connection cannot go on
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "action: Content-Length is not a number of bytes"})
        if length > MAX_ACTION:
            self.close_connection = True
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"action: body over {MAX_ACTION} bytes"})
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            return self._json(HTTPStatus.REQUEST_TIMEOUT, {"error": "action: body not sent in time"})
        reply = self.server.fleet.post(path, self.headers.get("Authorization"), data)
        if reply.status != HTTPStatus.OK:
            self.log_message("action refused: POST %s: %s", path[:200], reply.body[:200].decode(errors="replace"))
        self._reply(reply)

    def _reply(self, reply: Reply, body: bool = True) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(reply.body)

    # --- replies and logging --------------------------------------------------------------------

    def _json(self, status: HTTPStatus, obj: dict[str, Any], body: bool = True) -> None:
        data = formats.dump(obj)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:  # a client must not write terminal escapes into the master's log
            message = (format % args).translate(_LOG_ESCAPES)
            sys.stderr.write(f"{self.address_string()} {message}\n")
