"""The updater against the real master (`rackboot serve`), not just the test double."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.main import Identity, run
from rackboot.master import serve

from tests.integration.updater_master import MAC, NODE, image_bytes, publish, write_plan


@pytest.fixture
def master(tmp_path):
    root = tmp_path / "master"
    root.mkdir()
    server = serve.make_server(root, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, server
    server.shutdown()
    server.server_close()


def test_install_then_up_to_date_against_rackboot_serve(master, tmp_path):
    root, server = master
    card = tmp_path / "card.img"
    with open(card, "wb") as f:
        f.truncate(256 << 20)
    data = image_bytes(7)
    write_plan(root, publish(root, 1, data))

    def update():
        return run(
            str(card),
            server.url,
            Identity(MAC),
            log=lambda m: None,
            master=MasterClient(server.url, read_timeout=5.0, retries=1, backoff=0.01),
        )

    first = update()
    assert (first.slot, first.action) == ("a", "installed")
    with open(card, "rb") as f:
        f.seek(20 << 20)
        assert f.read(len(data)) == data
    stream = "/images/example/1/rootfs.ext4.gz"
    sent = server.stats()["bytes_sent"][stream]
    second = update()
    assert (second.slot, second.action, second.bytes_fetched) == ("a", "up-to-date", 0)
    assert server.stats()["bytes_sent"][stream] == sent
    phases = [json.loads(line)["phase"] for line in (root / f"reports/{NODE}.jsonl").read_text().splitlines()]
    assert phases.count("boot") == 2 and "commit" in phases


@pytest.mark.slow
def test_updater_waits_out_a_master_full_of_stalled_connections(tmp_path):
    """Past max_connections the master answers 503; the updater retries until stalled clients
    time out and it gets a connection, instead of hanging on one that never comes."""
    root = tmp_path / "master"
    root.mkdir()
    server = serve.make_server(root, quiet=True, idle_timeout=1.0, max_connections=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    card = tmp_path / "card.img"
    with open(card, "wb") as f:
        f.truncate(256 << 20)
    write_plan(root, publish(root, 1, image_bytes(3)))
    stalled = [socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) for _ in range(2)]
    try:
        for sock in stalled:
            sock.sendall(b"POST /report HTTP/1.1\r\nHost: master\r\nContent-Length: 500\r\n\r\n{")
        probe = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
        busy = probe.recv(100)  # the bound is full: a quick 503, no thread
        probe.close()
        result = run(
            str(card),
            server.url,
            Identity(MAC),
            log=lambda m: None,
            master=MasterClient(server.url, read_timeout=5.0, retries=6, backoff=0.25),
        )
    finally:
        for sock in stalled:
            sock.close()
        server.shutdown()
        server.server_close()
    assert busy.startswith(b"HTTP/1.1 503 ")
    assert (result.slot, result.action) == ("a", "installed")
