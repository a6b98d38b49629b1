"""A rack switched on together against the real master (`rackboot serve`'s server) capped
at one image stream: the others are told 503 + Retry-After, wait their turn (the watchdog
fed meanwhile) and say so in their reports; a master that never has room ends in a
fallback instead of a wait without end."""

from __future__ import annotations

import json
import os
import random
import threading
import time

import pytest
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.fetch import JITTER, MasterClient
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.watchdog import Watchdog
from rackboot.master import serve

from tests.integration.updater_master import MAC, NODE, image_bytes, publish, write_plan


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def master(tmp_path):
    """The master capped at one stream, with version 1 assigned to every node."""
    root = tmp_path / "master"
    root.mkdir()
    server = serve.make_server(root, quiet=True, max_streams=1)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    write_plan(root, publish(root, 1, image_bytes(5)), node="default")
    yield root, server
    server.shutdown()
    server.server_close()


def blank_card(path) -> str:
    with open(path, "wb") as f:
        f.truncate(256 << 20)
    return str(path)


def reports(root, node: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"reports/{node}.jsonl").read_text().splitlines()]


@pytest.fixture
def watchdog_device(tmp_path):
    """A FIFO standing in for /dev/watchdog (as in tests/unit/test_updater_watchdog.py)."""
    path = tmp_path / "watchdog"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    yield str(path)
    os.close(reader)


def test_a_busy_master_is_waited_out_with_the_watchdog_fed_and_the_wait_reported(master, tmp_path, watchdog_device):
    root, server = master
    assert server.start_stream() is None  # another worker's stream holds the only slot
    clock = Clock()
    dog = Watchdog(watchdog_device, stall=1, timeout=60, now=clock)
    waits: list[tuple[float, bool]] = []

    def sleep(seconds: float) -> None:  # the master's time passes, not the test's
        clock.t += seconds
        waits.append((seconds, clock.t < dog.deadline))  # still fed at the end of the wait?
        if len(waits) == 2:
            server.end_stream()  # the other worker's stream is done

    client = MasterClient(server.url, read_timeout=5.0, retries=1, backoff=0.01, sleep=sleep, rng=random.Random(3))
    lines: list[str] = []
    with dog:
        result = run(
            blank_card(tmp_path / "card.img"),
            server.url,
            Identity(MAC),
            master=client,
            log=lines.append,
            now=clock,
            watchdog=dog,
        )
    assert (result.slot, result.action) == ("a", "installed")
    assert len(waits) == 2 and all(fed for _, fed in waits)  # stall is 1 s, each wait is 2 s or more
    told = [serve.RETRY_AFTER, serve.RETRY_AFTER + 1]  # the second refusal saw one more in the queue
    assert all(after <= w <= after * (1 + JITTER) for (w, _), after in zip(waits, told, strict=True))
    assert server.stats()["streams"] == {"max": 1, "active": 0, "peak": 1, "refused": 2}
    assert sum("master busy: waiting" in line for line in lines) == 2
    phases = [(r["phase"], r["seconds"]) for r in reports(root, NODE)]
    wait = phases.index(("wait", round(waits[0][0] + waits[1][0], 3)))
    assert phases[wait + 1][0] == "download"  # the wait, then the download it held up


def test_a_master_that_stays_busy_ends_the_wait_in_a_fallback(master, tmp_path):
    root, server = master
    assert server.start_stream() is None  # and never given back
    waited: list[float] = []
    client = MasterClient(
        server.url, read_timeout=5.0, retries=1, backoff=0.01, sleep=waited.append, busy_limit=30, rng=random.Random(4)
    )
    with pytest.raises(UpdaterError, match=r"no good slot to boot \(download: .*busy for \d+ s of waiting, more than"):
        run(blank_card(tmp_path / "card.img"), server.url, Identity(MAC), master=client, log=lambda m: None)
    assert waited and sum(waited) <= 30
    error = [r for r in reports(root, NODE) if r["phase"] == "error"][-1]
    assert "more than the 30 s a transfer waits" in error["error"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [4])
def test_a_rack_switched_on_together_is_served_one_stream_at_a_time(master, tmp_path, workers):
    root, server = master
    write_plan(root, publish(root, 2, image_bytes(6, 24 << 20)), node="default")  # streams that take a while
    macs = [f"52:54:00:00:10:{i:02x}" for i in range(workers)]
    results: dict[str, object] = {}
    assert server.start_stream() is None  # a stream under way when the rack comes on

    def worker(i: int, mac: str) -> None:
        client = MasterClient(server.url, read_timeout=10.0, retries=2, backoff=0.1, rng=random.Random(i))
        card = blank_card(tmp_path / f"card{i}.img")
        try:
            results[mac] = run(card, server.url, Identity(mac), master=client, log=lambda m: None)
        except UpdaterError as e:
            results[mac] = e

    threads = [threading.Thread(target=worker, args=(i, mac)) for i, mac in enumerate(macs)]
    for t in threads:
        t.start()
    for _ in range(600):  # until each worker has been told to wait (a minute at most)
        if server.stats()["streams"]["refused"] >= workers:
            break
        time.sleep(0.1)
    server.end_stream()
    for t in threads:
        t.join(timeout=120)
    assert [getattr(results.get(mac), "action", results.get(mac)) for mac in macs] == ["installed"] * workers
    streams = server.stats()["streams"]
    assert streams["peak"] == 1 and streams["active"] == 0 and streams["refused"] >= workers
    for mac in macs:  # each waited its turn, and said so
        assert any(r["phase"] == "wait" and r["seconds"] > 0 for r in reports(root, mac.replace(":", "-")))
