"""Running the host tools rackboot drives (mke2fs, mtools, openssl, apt-get, ...)."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from .errors import RackbootError

_PR_SET_PDEATHSIG = 1


def run(
    cmd: list[str],
    what: str,
    *,
    env: Mapping[str, str] | None = None,
    data: bytes | None = None,
    cwd: Path | None = None,
    missing: str = "",
) -> bytes:
    """Run ``cmd`` and return its stdout; a failure is one RackbootError line, ``what``
    followed by the tool's last line of complaint. ``missing`` says how to install it."""
    try:
        done = subprocess.run(cmd, input=data, capture_output=True, cwd=cwd, env=None if env is None else dict(env))
    except FileNotFoundError:
        hint = f" ({missing})" if missing else ""
        raise RackbootError(f"{cmd[0]} is not installed{hint}; needed to {what}") from None
    if done.returncode != 0:
        text = (done.stderr or done.stdout).decode("utf-8", "replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        raise RackbootError(f"{what}: {lines[-1] if lines else f'{cmd[0]} exit status {done.returncode}'}")
    return done.stdout


def dies_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` for the daemons serve runs (dnsmasq, rsync): the child gets SIGTERM
    when serve's process ends, even by SIGKILL, so none outlives it. The kernel clears this
    if the child changes its uid (dnsmasq dropping root: see dnsmasq.end_orphan)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


def stop_child(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL if it lingers past ``grace`` seconds; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


class ChildWatch:
    """The thread that minds a daemon serve runs (dnsmasq, rsync): every ``interval`` seconds
    it calls ``refresh`` (which regenerates the daemon's files; an OSError or RackbootError
    there waits for the next look), and once the child has exited it calls ``died`` with its
    exit status, once, and ends: the rest of serve goes on without that daemon. ``stop``
    ends it sooner and waits for it."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        interval: float,
        *,
        refresh: Callable[[], object],
        died: Callable[[int], None],
        name: str,
    ):
        self.proc = proc
        self.interval = interval
        self.refresh = refresh
        self.died = died
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> ChildWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.proc.poll() is not None:
                self.died(self.proc.returncode)
                return
            try:
                self.refresh()
            except (OSError, RackbootError):
                continue  # the next look tries again

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
