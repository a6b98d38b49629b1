"""A real PostgreSQL server for the tests: Debian's binaries, a cluster in a temporary
directory, listening on a free loopback port and a socket in that directory; one fresh
database per test (CREATE DATABASE is cheap). PostgreSQL refuses to run as root: as root,
initdb and postgres run as the `postgres` system user (as runuser -u postgres would, but as
our own child, so that a signal reaches it), the directory chowned to it."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

START_WAIT = 60.0  # seconds for the server to accept connections


def bindir() -> Path | None:
    """PostgreSQL's server binaries (pg_config --bindir names the client's on Debian)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
        if (out / "postgres").exists():
            return out
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One PostgreSQL cluster; ``database()`` makes a new empty database and returns its URL."""

    def __init__(self, bin: Path):
        self.bin = bin
        self.dir = Path(tempfile.mkdtemp(prefix="rackboot-pg-"))  # (not under pytest's root-only tmp)
        self.data = self.dir / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

    def _owner(self) -> dict[str, object]:
        return {"user": self.user, "group": self.user, "extra_groups": []} if self.user else {}

    def start(self) -> Server:
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            cwd=self.dir,
            **self._owner(),  # type: ignore[call-overload]
        )
        log = open(self.dir / "server.log", "wb")  # noqa: SIM115 (the server's, kept open while it runs)
        self.proc = subprocess.Popen(  # type: ignore[call-overload]
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.dir),
                "-c",
                "fsync=off",  # a test cluster: thrown away, never crash-safe
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=log,
            cwd=self.dir,
            **self._owner(),
        )
        deadline = time.monotonic() + START_WAIT
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres did not start: {(self.dir / 'server.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.1)

    def url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def database(self) -> str:
        name = f"rackboot_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: clients still connected are cut off
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
