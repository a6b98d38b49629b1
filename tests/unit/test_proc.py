"""rackboot.proc's ChildWatch, the one loop that minds serve's daemons (dnsmasq, rsync), on
real child processes: it refreshes while the child runs, says the child's death once, keeps
looking past a refresh that fails, and ends at once when stopped."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest
from rackboot.errors import RackbootError
from rackboot.proc import ChildWatch, stop_child

LOOK = 0.01  # seconds between looks: the loop's cadence, never asserted on
ENDS = 30.0  # seconds a watch that should end gets before the test fails instead of hanging


@pytest.fixture
def child():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    stop_child(proc, 1.0)


def die_now(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL and wait for the exit without reaping it: the watch's poll finds it gone, as
    it would a daemon that crashed between two looks."""
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)


def ended(watch: ChildWatch) -> bool:
    watch._thread.join(ENDS)
    return not watch._thread.is_alive()


def test_refreshes_while_the_child_runs_and_says_its_death_once(child):
    refreshed: list[int] = []
    died: list[int] = []

    def refresh() -> None:
        refreshed.append(1)
        if len(refreshed) == 3:
            die_now(child)

    watch = ChildWatch(child, LOOK, refresh=refresh, died=died.append, name="test-watch").start()
    assert ended(watch)  # it ends by itself once the child is gone
    watch.stop()  # and stopping an ended watch says nothing more
    assert len(refreshed) == 3  # no refresh after the death
    assert died == [-9]


def test_a_child_that_exits_on_its_own_is_said_with_its_status():
    died: list[int] = []
    proc = subprocess.Popen(["sh", "-c", "exit 3"])
    try:
        watch = ChildWatch(proc, LOOK, refresh=lambda: None, died=died.append, name="test-watch").start()
        assert ended(watch)
        assert died == [3]
    finally:
        stop_child(proc, 1.0)


@pytest.mark.parametrize("error", [OSError("disk full"), RackbootError("bad tree")])
def test_a_failing_refresh_waits_for_the_next_look(child, error):
    calls: list[int] = []
    died: list[int] = []

    def refresh() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise error
        die_now(child)

    watch = ChildWatch(child, LOOK, refresh=refresh, died=died.append, name="test-watch").start()
    assert ended(watch)
    assert len(calls) == 3 and died == [-9]


def test_stop_ends_the_watch_at_once_and_leaves_the_child_running(child):
    refreshed: list[int] = []
    died: list[int] = []
    # an hour between looks: a stop that waited out the interval would not end within ENDS
    watch = ChildWatch(child, 3600.0, refresh=lambda: refreshed.append(1), died=died.append, name="test-watch")
    watch.start()
    stopper = threading.Thread(target=watch.stop)
    stopper.start()
    stopper.join(ENDS)
    assert not stopper.is_alive() and not watch._thread.is_alive()
    assert refreshed == [] and died == []
    assert child.poll() is None  # the watch minds the child; ending it is stop_child's
