"""`rackboot serve` as a rack master ([master] upstream set): the mirror (mirror.py) synced
every [master] sync_interval seconds, the reports relay (relay.py), and what serve's HTTP
side asks of them. Under [master] directory: ``current`` and ``trees/`` (the mirror) and
``spool/`` (reports waiting for the region).

At start one sync is tried before anything listens. When it fails, a rack master that has a
tree from an earlier run starts with it and says so (a rack cut off from the region keeps
booting its workers); one without a tree has nothing to serve, and says that instead.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackboot.errors import RackbootError

from .mirror import Mirror, SyncError, describe, synced_at
from .relay import RETRY, Relay

if TYPE_CHECKING:
    from rackboot.config import Config

SPOOL = "spool"
EMPTY = ".empty"  # what HTTP serves before the first good sync: nothing


class RackMaster:
    def __init__(
        self,
        root: Path,
        upstream: str,
        *,
        key: Path,
        rsync_port: int = 873,
        name: str = "",
        interval: float = 300,
        log: Callable[[str], None] = lambda _line: None,
        retry: float | None = None,
    ):
        self.root = Path(root).resolve()
        self.upstream = upstream.rstrip("/")
        self.name = name or socket.gethostname()
        self.interval = interval
        self.log = log
        self.mirror = Mirror(self.root, self.upstream, rsync_port, key, log=log)
        self.relay = Relay(self.root / SPOOL, self.upstream, self.name, log=log, retry=retry or RETRY)
        (self.root / EMPTY).mkdir(exist_ok=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, cfg: Config, log: Callable[[str], None]) -> RackMaster:
        assert cfg.master.upstream_key is not None  # config.py requires it with upstream
        return cls(
            cfg.master.directory,
            cfg.master.upstream,
            key=cfg.master.upstream_key,
            rsync_port=cfg.master.upstream_rsync_port,
            name=cfg.master.rack,
            interval=cfg.master.sync_interval,
            log=log,
        )

    def tree(self) -> Path:
        """The directory HTTP serves from now."""
        return self.mirror.current() or self.root / EMPTY

    def first_sync(self) -> None:
        """The sync at start: RackbootError when it fails and there is no tree to fall back on."""
        self.mirror.check_key()  # a key that does not read stops serve here, in one line
        try:
            self._sync_once(say_unchanged=True)
        except SyncError as e:
            current = self.mirror.current()
            if current is None:
                raise RackbootError(
                    f"rack master: the first sync from {self.mirror.url} failed ({e}) and there is no mirror "
                    "from an earlier run to serve; start it again once the region answers"
                ) from None
            self.log(
                f"mirror: sync from {self.mirror.url} failed at start ({e}); "
                f"serving the tree synced at {synced_at(current)}"
            )

    def _sync_once(self, *, say_unchanged: bool = False) -> None:
        checked = self.mirror.sync()
        if checked.changed:  # an unchanged region is not worth a line every sync_interval
            self.log(f"mirror: synced from {self.mirror.url}: {describe(checked)}")
        elif say_unchanged:
            self.log(
                f"mirror: {self.mirror.url} unchanged since {synced_at(self.mirror.current())}: {describe(checked)}"
            )

    def sync(self) -> bool:
        """One periodic sync; a failure is one line and the old tree stays. True when taken."""
        try:
            self._sync_once()
            return True
        except (SyncError, RackbootError, OSError) as e:
            self.log(
                f"mirror: sync from {self.mirror.url} refused: {e}; "
                f"still serving the tree synced at {synced_at(self.mirror.current())}"
            )
            return False

    def start(self) -> RackMaster:
        self.relay.start()
        self._thread = threading.Thread(target=self._run, name="rackboot-mirror", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sync()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.relay.stop()

    def status(self) -> dict[str, Any]:
        """GET / and /api/ on a rack master: what it mirrors and relays (the fleet is the region's)."""
        return {
            "rack": self.name,
            "upstream": self.upstream,
            "mirror": self.mirror.url,
            "synced": synced_at(self.mirror.current()),
            "spooled_reports": len(self.relay.waiting()),
        }
