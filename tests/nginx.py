"""Debian's nginx run by a test: the config `rackboot nginx-config` prints, its own prefix
(pid file, logs, temp directories) in a tmp dir, in the foreground on a loopback port.

nginx's workers read the master's tree as ``nobody``, which must be able to walk down to it:
pytest's tmp dirs are private to root, so a tree nginx serves lives in ``open_dir()``."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rackboot import config
from rackboot.master import nginx

START_WAIT = 10.0  # seconds nginx gets to listen


@contextmanager
def open_dir(prefix: str) -> Iterator[Path]:
    """A directory under /tmp that any user may walk through (0755), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Nginx:
    """nginx serving ``cfg``'s master tree on 127.0.0.1:``port``, with serve at ``serve_url``."""

    def __init__(self, cfg: config.Config, port: int, serve_url: str, prefix: Path):
        if shutil.which("nginx") is None:
            pytest.fail("nginx is not installed: run `make deps`, which installs Debian's nginx")
        self.port = port
        self.prefix = prefix
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(nginx.render_config(cfg, f"127.0.0.1:{port}", serve_url))
        self.log = prefix / "error.log"
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(prefix), "-c", str(self.conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )
        self._wait_up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_up(self) -> None:
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"nginx exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"nginx did not listen on port {self.port} within {START_WAIT:g} s")

    def access_log(self) -> list[str]:
        """The access log's lines: '$remote_addr [time] "$request" $status $bytes "$content_type"'."""
        path = self.prefix / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a fast shutdown of the master and its workers
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
