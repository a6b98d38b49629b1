"""Debian's nginx with `rackboot nginx-config`'s config on loopback, a real `rackboot serve`
behind it: the static tree as serve sends it (plan fallback, ranges, refusals), the dynamic
parts proxied, and the updater's MasterClient taking documents and ranges from it."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from rackboot import config
from rackboot.errors import RackbootError
from rackboot.initramfs.updater.fetch import MasterClient, NotFound
from rackboot.master import bootfiles, serve

from tests.e2e.rack import free_port
from tests.helpers import write_config
from tests.nginx import Nginx, open_dir

NODE = "52-54-00-12-34-56"
OTHER = "52-54-00-00-00-07"
PACK = "/images/example/1/rootfs.ext4.pack"
STREAM = "/images/example/1/rootfs.ext4.gz"
DEFAULT_PLAN = b'{"format":1,"node":"default"}\n'
NODE_PLAN = b'{"format":1,"node":"52-54-00-12-34-56"}\n'


@dataclass
class Site:
    master: Path
    nginx: Nginx
    serve: serve.MasterServer

    def request(
        self, method: str, path: str, headers: dict | None = None, body: bytes | None = None, source: str = ""
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """One request to nginx, from ``source`` (another loopback address) when given."""
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.nginx.port, timeout=10, source_address=(source, 0) if source else None
        )
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp, resp.read()
        finally:
            conn.close()


def tree(master: Path) -> None:
    for path, data in (
        (PACK, os.urandom(300_000)),
        (STREAM, os.urandom(100_000)),
        ("/images/example/1/manifest.json", b'{"format":1}\n'),
        ("/plans/default.json", DEFAULT_PLAN),
        ("/plans/default.json.sig", b"default signature"),
        (f"/plans/{NODE}.json", NODE_PLAN),
        (f"/plans/{NODE}.json.sig", b"node signature"),
        ("/keys/1.json", b'{"key":1}\n'),
        ("/keys/master.pub", b"public key\n"),
        ("/boot/boot.scr.uimg", b"boot script"),
    ):
        (master / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (master / path.lstrip("/")).write_bytes(data)


@contextmanager
def running(**master: object) -> Iterator[Site]:
    """nginx and serve on loopback over a tree of its own, ``master`` settings in the config."""
    with open_dir("rackboot-nginx-") as base:
        cfg = config.load(write_config(base, master=master))
        master = cfg.master.directory
        tree(master)
        srv = serve.make_server(master, "127.0.0.1", 0, quiet=True, config=cfg, proxied_by="127.0.0.1")
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            with Nginx(cfg, free_port(), srv.url, base / "nginx") as nginx:
                yield Site(master, nginx, srv)
        finally:
            srv.shutdown()
            srv.server_close()


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with running() as s:
        yield s


def test_a_plan_and_its_signature_fall_back_together(site):
    assert site.request("GET", f"/plans/{NODE}.json")[1] == NODE_PLAN  # its own
    assert site.request("GET", f"/plans/{NODE}.json.sig")[1] == b"node signature"
    resp, body = site.request("GET", f"/plans/{OTHER}.json")
    assert (resp.status, body) == (200, DEFAULT_PLAN)  # unknown: the default plan
    assert site.request("GET", f"/plans/{OTHER}.json.sig")[1] == b"default signature"  # and its signature
    assert resp.getheader("Content-Type") == "application/json"


def test_without_a_default_plan_an_unknown_node_gets_404(site):
    (site.master / "plans/default.json").rename(site.master / "plans/kept")
    try:
        assert site.request("GET", f"/plans/{OTHER}.json")[0].status == 404
        assert site.request("GET", f"/plans/{OTHER}.json.sig")[1] == b"default signature"  # each on its own
        assert site.request("GET", f"/plans/{NODE}.json")[1] == NODE_PLAN
    finally:
        (site.master / "plans/kept").rename(site.master / "plans/default.json")


def test_ranges_multi_ranges_and_416(site):
    data = (site.master / PACK.lstrip("/")).read_bytes()
    resp, body = site.request("GET", PACK, {"Range": "bytes=100-199"})
    assert (resp.status, body, resp.getheader("Content-Range")) == (206, data[100:200], f"bytes 100-199/{len(data)}")
    resp, body = site.request("GET", PACK, {"Range": "bytes=-10"})
    assert (resp.status, body) == (206, data[-10:])
    resp, body = site.request("GET", PACK, {"Range": f"bytes={len(data)}-"})
    assert resp.status == 416 and resp.getheader("Content-Range") == f"bytes */{len(data)}"
    resp, body = site.request("GET", PACK, {"Range": "bytes=0-9,1000-1099,200000-200009"})
    assert resp.status == 206 and resp.getheader("Content-Type").startswith("multipart/byteranges; boundary=")
    for part in (data[0:10], data[1000:1100], data[200000:200010]):
        assert part in body
    assert len(body) < 1000  # the parts, not the file


def test_the_updater_takes_documents_ranges_and_multi_ranges_from_nginx(site):
    client = MasterClient(site.nginx.url, retries=0)
    data = (site.master / PACK.lstrip("/")).read_bytes()
    assert client.get(f"/plans/{OTHER}.json") == DEFAULT_PLAN
    assert client.get("/keys/1.json") == b'{"key":1}\n'
    assert client.get_range(PACK, 5000, 9096) == data[5000:9096]
    spans = [(i * 2000, i * 2000 + 700) for i in range(128)]  # a block delta's batch of runs
    assert client.get_ranges(PACK, spans) == [data[a:b] for a, b in spans]
    assert client.get_ranges(PACK, [(0, 1), (2, 3)]) == [data[0:1], data[2:3]]  # the delta's probe
    stream = (site.master / STREAM.lstrip("/")).read_bytes()
    assert hashlib.sha256(b"".join(client.stream(STREAM, len(stream)))).digest() == hashlib.sha256(stream).digest()
    with pytest.raises(NotFound):
        client.get("/images/example/1/nothing.json")
    assert any('"multipart/byteranges; boundary=' in line for line in site.nginx.access_log())


def test_keys_dot_files_private_files_symlinks_and_directories_are_refused(site):
    keys = site.master / "keys"
    (keys / "master.key").write_text("PRIVATE KEY\n")
    (keys / "master.key").chmod(0o644)  # a key is never sent, however readable
    kept = site.master / "images/example/1/notes.txt"
    kept.write_text("PRIVATE notes\n")
    kept.chmod(0o600)
    (site.master / ".inventory-copy").write_text("PRIVATE dot file\n")
    (site.master / "images/.hidden").mkdir()
    (site.master / "images/.hidden/plain.json").write_text("PRIVATE under a dot directory\n")
    (site.master / "images/outside").symlink_to("/etc")
    (site.master / "plans/.x.json").write_text("PRIVATE dot plan\n")
    for path in (
        "/keys/master.key",
        "/images/example/1/notes.txt",
        "/.inventory-copy",
        "/images/.hidden/plain.json",
        "/images/outside/hostname",
        "/plans/.x.json",
        "/images/",
        "/images/example/1/",
        "/images/example",
        "/images/example/1/..%2f..%2f.inventory-copy",
        "/images/example%5c1/manifest.json",
    ):
        for method in ("GET", "HEAD"):
            resp, body = site.request(method, path)
            assert resp.status == 404 and b"PRIVATE" not in body and b"<" not in body, (path, resp.status, body)
    resp, body = site.request("GET", "/keys/master.pub")
    assert (resp.status, body) == (200, b"public key\n")  # a public key, world-readable: sent
    assert site.request("GET", "/boot/boot.scr.uimg")[1] == b"boot script"


def report(node: str = NODE, **kw) -> bytes:
    doc = {"node": node, "phase": "boot", "bytes": 0, "seconds": 1.5, "error": None, "slot": "a", "version": 1}
    return json.dumps({**doc, "time": 12.0, **kw}).encode()


def test_reports_reach_serve_and_plan_requests_are_mirrored_to_it(site):
    """The report is serve's, with the worker's address (X-Real-IP); a plan GET that nginx
    answers reaches serve's inventory too (the node's address and its serial)."""
    node = "52-54-00-00-00-42"
    resp, body = site.request("GET", f"/plans/{node}.json", {"X-Rackboot-Serial": "ab12cd34"}, source="127.0.0.5")
    assert (resp.status, body) == (200, DEFAULT_PLAN)
    resp, _ = site.request("POST", "/report", {"Content-Type": "application/json"}, report(node), source="127.0.0.6")
    assert resp.status == 204
    lines = (site.master / f"reports/{node}.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["phase"] for line in lines] == ["boot"]
    resp, body = site.request("GET", f"/api/nodes/{node}")
    seen = json.loads(body)
    assert resp.status == 200 and (seen["ip"], seen["serial"]) == ("127.0.0.6", "ab12cd34"), seen
    site.request("GET", f"/plans/{node}.json", source="127.0.0.9")  # the mirror is answered after the worker
    for _ in range(100):
        if json.loads(site.request("GET", f"/api/nodes/{node}")[1])["ip"] == "127.0.0.9":
            break
        threading.Event().wait(0.05)
    else:
        pytest.fail("the plan request never reached serve's inventory")
    assert site.request("HEAD", "/stats")[0].status == 200
    assert b"<html" in site.request("GET", "/")[1].lower()  # the fleet page


def test_a_bad_report_is_answered_by_serve(site):
    resp, body = site.request("POST", "/report", {}, report(node="../../etc"))
    assert resp.status == 400 and b"is not a node id" in body
    resp, body = site.request("POST", "/report", {}, report(error="x" * 70_000))
    assert resp.status == 413


def test_with_manual_adoption_plans_are_serves():
    """Only an adopted node gets the default plan: nginx cannot know which, serve answers."""
    with running(adopt="manual") as site:
        resp, body = site.request("GET", f"/plans/{OTHER}.json")
        assert resp.status == 404 and b"it is not adopted yet" in body
        assert site.request("GET", f"/plans/{OTHER}.json.sig")[0].status == 404
        assert site.request("GET", f"/plans/{NODE}.json")[1] == NODE_PLAN  # its own plan: adopted by it
        site.serve.fleet.inventory.adopt(OTHER)
        assert site.request("GET", f"/plans/{OTHER}.json")[1] == DEFAULT_PLAN
        assert site.request("GET", f"/plans/{OTHER}.json.sig")[1] == b"default signature"
        assert site.request("GET", "/images/example/1/manifest.json")[1] == b'{"format":1}\n'  # still nginx's


def test_image_streams_past_max_streams_are_told_to_come_back():
    """One stream held open (its reader stalled) takes the only slot: the next stream gets
    503 with Retry-After, a manifest still goes out, and the slot is free once it closes."""
    with running(max_streams=1) as site:
        big = site.master / "images/example/1/big.gz"
        with open(big, "wb") as f:
            f.truncate(256 << 20)  # far more than the socket buffers take
        held = socket.create_connection(("127.0.0.1", site.nginx.port), timeout=10)
        try:
            held.sendall(b"GET /images/example/1/big.gz HTTP/1.1\r\nHost: master\r\n\r\n")
            assert held.recv(12) == b"HTTP/1.1 200"
            resp, body = site.request("GET", STREAM)
            assert (resp.status, resp.getheader("Retry-After")) == (503, "2") and b"busy" in body
            assert site.request("GET", "/images/example/1/manifest.json")[0].status == 200
        finally:
            held.close()
        for _ in range(100):  # nginx sees the hang-up at its next write
            if site.request("GET", STREAM)[0].status == 200:
                break
            threading.Event().wait(0.05)
        else:
            pytest.fail("the stream slot was not freed when its connection closed")


def test_boot_files_as_the_master_publishes_them_go_out(site, tmp_path):
    """bootfiles.publish_image builds in a temporary directory renamed into place: nginx's
    workers (nobody) must be able to enter it."""
    image = tmp_path / "boot.vfat"
    image.write_bytes(os.urandom(4096))
    path = bootfiles.publish_image(image, site.master)
    resp, body = site.request("GET", "/" + path.lstrip("/"))
    assert resp.status == 200 and body == (site.master / path.lstrip("/")).read_bytes()


def test_serve_takes_x_real_ip_from_its_proxy_alone(site, tmp_path):
    node = "52-54-00-00-00-43"
    port = site.serve.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=("127.0.0.3", 0))
    conn.request("POST", "/report", body=report(node), headers={"X-Real-IP": "10.9.9.9"})  # straight to serve
    assert conn.getresponse().status == 204
    conn.close()
    assert json.loads(site.request("GET", f"/api/nodes/{node}")[1])["ip"] == "127.0.0.3"
    with pytest.raises(RackbootError, match=r"^--proxied-by: 'nginx' is not an IP address$"):
        serve.make_server(tmp_path, "127.0.0.1", 0, quiet=True, proxied_by="nginx")
