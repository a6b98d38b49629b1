"""The updater's watchdog feeder, against a FIFO standing in for /dev/watchdog (no host
has a watchdog to spare): fed while the update moves, starved once it stalls, disarmed
with the magic 'V' on a clean stop. The real i6300esb is in tests/e2e/test_watchdog.py."""

from __future__ import annotations

import os
import time

import pytest
from rackboot.initramfs.updater.watchdog import Watchdog


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def device(tmp_path):
    path = tmp_path / "watchdog"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # open first, so the writer's open returns
    yield str(path), lambda: _drain(reader)
    os.close(reader)


def _drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


@pytest.mark.slow
def test_fed_while_moving_starved_after_a_stall_and_disarmed_on_stop(device):
    path, feeds = device
    clock, lines = Clock(), []
    dog = Watchdog(path, stall=10, timeout=1, now=clock, log=lines.append).start()
    assert dog.armed and "armed (1 s)" in lines[0]  # a FIFO takes no ioctl: the asked-for timeout
    time.sleep(1.2)
    assert feeds().count(b"\0") >= 2
    clock.t = 10.5  # the update has not moved for longer than the stall limit
    time.sleep(0.5)
    feeds()
    time.sleep(1.0)
    assert feeds() == b"" and dog.starved
    assert any("no progress for 10 s; no longer feeding it" in line for line in lines)
    list(dog.watch([b"chunk"]))  # progress again: feeding resumes
    time.sleep(0.8)
    assert b"\0" in feeds()
    dog.stop()
    assert feeds().endswith(b"V") and not dog.armed


def test_a_hook_gets_its_timeout_before_the_stall_counts(device):
    path, feeds = device
    clock = Clock()
    with Watchdog(path, stall=10, timeout=1, now=clock) as dog:
        dog.progress(allow=100)
        clock.t = 50
        time.sleep(0.8)
        assert b"\0" in feeds() and not dog.starved


def test_no_device_means_no_watchdog_and_no_error(tmp_path):
    lines = []
    with Watchdog(str(tmp_path / "none"), stall=10, log=lines.append) as dog:
        dog.progress()
        assert not dog.armed
    assert lines == [f"watchdog: {tmp_path / 'none'}: No such file or directory; updating without one"]
