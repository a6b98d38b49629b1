"""A real HTTP master on loopback for the updater tests, with faults on demand.

Serves a tmp tree laid out as notes/formats.md says (plans with default.json
fallback, images with Range), records every request, counts image-stream bytes,
collects POSTed reports, and can drop a stream after N bytes (once), answer 500,
hang past the client's timeout, or ignore Range (a 200 to a resumed request).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import Layout, Manifest, Partition, Plan

MAC = "52:54:00:12:34:56"
NODE = "52-54-00-12-34-56"


@dataclass
class Faults:
    drop_after: int | None = None  # close a stream after this many body bytes, once
    status: int | None = None  # answer every request with this status
    hang: float = 0.0  # sleep this long before answering
    ignore_range: bool = False  # always 200 with the whole file


@dataclass
class Request:
    method: str
    path: str
    headers: dict


@dataclass
class FakeMaster:
    root: Path
    faults: Faults = field(default_factory=Faults)
    requests: list = field(default_factory=list)
    reports: list = field(default_factory=list)
    image_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def range_requests(self) -> list[Request]:
        return [r for r in self.requests if "Range" in r.headers]


def _handler(master: FakeMaster):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args) -> None:  # quiet tests
            pass

        def do_GET(self) -> None:
            with master.lock:
                master.requests.append(Request("GET", self.path, dict(self.headers)))
            if self._fault():
                return
            path = self.path.split("?")[0]
            file = master.root / path.lstrip("/")
            if path.startswith("/plans/") and not file.is_file():
                file = master.root / ("plans/default.json.sig" if path.endswith(".sig") else "plans/default.json")
            if ".." in path or not file.is_file():
                return self._send(404, b"not found\n")
            data = file.read_bytes()
            start = 0
            status = 200
            rng = self.headers.get("Range")
            if rng and not master.faults.ignore_range:
                start = int(rng.split("=", 1)[1].split("-", 1)[0])
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(len(data) - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            body = data[start:]
            counted = not path.endswith((".json", ".sig", ".sh"))  # image streams only, not hooks
            drop = master.faults.drop_after
            if counted and drop is not None:
                master.faults.drop_after = None
                body = body[:drop]
            if counted:  # count before sending: the client may finish before we return
                with master.lock:
                    master.image_bytes += len(body)
            self.wfile.write(body)
            if counted and drop is not None:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            with master.lock:
                master.requests.append(Request("POST", self.path, dict(self.headers)))
            if self._fault():
                return
            if self.path == "/report":
                try:  # as strict as rackboot serve: a report it would refuse is not kept
                    formats.parse_report(body)
                except UpdaterError as e:
                    return self._send(400, f"{e}\n".encode())
                master.reports.append(json.loads(body))
                return self._send(204, b"")
            self._send(404, b"")

        def _fault(self) -> bool:
            if master.faults.hang:
                time.sleep(master.faults.hang)
            if master.faults.status:
                self._send(master.faults.status, b"injected\n")
                return True
            return False

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class Server:
    def __init__(self, root: Path):
        self.master = FakeMaster(root)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.master))
        self.httpd.daemon_threads = True
        self.master.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # shutdown() waits for the loop's next poll: the default 0.5 s would end each test with a wait
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class CannedServer:
    """A master that answers every request with the same raw bytes, headers no HTTP library
    would write included (a Content-Length of '²'); ``answer`` may be changed between requests."""

    def __init__(self, answer: bytes = b""):
        self.answer = answer
        self.requests = 0
        self.closed = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)  # the accept loop looks at ``closed`` this often
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.settimeout(5)
                    seen = b""
                    while b"\r\n\r\n" not in seen and (chunk := conn.recv(65536)):
                        seen += chunk
                    self.requests += 1
                    conn.sendall(self.answer)
                    conn.shutdown(socket.SHUT_WR)
                except OSError:  # the client hung up first
                    pass

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=5)
        self.sock.close()


# --- the master's tree ---------------------------------------------------------------


def image_bytes(seed: int, size: int = 3 << 20) -> bytes:
    """Small ext4-sized stand-in: random head (incompressible) and a zero tail."""
    head = random.Random(seed).randbytes(size // 3)
    return head + bytes(size - len(head))


def publish(
    root: Path, version: int, data: bytes, *, image: str = "example", stream: bytes | None = None, **override
) -> str:
    """Write images/<image>/<version>/{manifest.json,rootfs.ext4.gz}; returns the manifest path."""
    compressed = gzip.compress(data, mtime=0) if stream is None else stream
    fields = dict(
        image=image,
        version=version,
        label=f"v{version}",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        crc32=f"{zlib.crc32(data):08x}",
        stream="rootfs.ext4.gz",
        stream_size=len(compressed),
        stream_sha256=hashlib.sha256(compressed).hexdigest(),
    )
    fields.update(override)
    manifest = Manifest(**fields)
    where = root / "images" / image / str(version)
    where.mkdir(parents=True, exist_ok=True)
    (where / "rootfs.ext4.gz").write_bytes(compressed)
    (where / "manifest.json").write_bytes(formats.dump(manifest))
    return f"/images/{image}/{version}/manifest.json"


STANDARD = (("boot", 4, 16, "0c"), ("a", None, 64, "83"), ("b", None, 64, "83"), ("data", None, "rest", "83"))


def layout(parts=STANDARD, repartition: str = "allowed") -> Layout:
    out, start = [], None
    for name, first, size, ptype in parts:
        start = first if first is not None else start
        out.append(Partition(name, start, size, ptype))
        start = start + size if size != "rest" else None
    return Layout(tuple(out), repartition)


def write_plan(
    root: Path,
    manifest_path: str | None,
    *,
    node: str = NODE,
    parts=STANDARD,
    repartition: str = "allowed",
    mount: str = "ro+overlay:tmpfs",
    pin: bool = False,
    tries: int = 3,
) -> Plan:
    """plans/<node>.json, a plan for that node (or the default plan)."""
    plan = Plan(
        node=node,
        layout=layout(parts, repartition),
        image=manifest_path,
        mount=mount,
        pin=pin,
        tries=tries,
    )
    (root / "plans").mkdir(parents=True, exist_ok=True)
    (root / "plans" / f"{node}.json").write_bytes(formats.dump(plan))
    return plan
