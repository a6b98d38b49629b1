"""A rack's network in a namespace of its own: a Linux bridge with the master's address,
loopback, and one tap device per worker. QEMU workers, the master and DHCP servers run
inside it (`ip netns exec`), so nothing on the host's own network ever sees the rack.

    with RackNetwork(workers=4) as rack:
        master = rack.spawn(["rackboot", "serve", ...], log)  # runs in the namespace
        worker = QemuWorker(machine, netns=rack.name, tap=rack.taps[0], mac=rack.mac(0), ...)

Names carry the pid and a counter, so a crashed run's leftovers never collide with the
next run's; teardown removes everything, whatever failed on the way.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from rackboot.errors import RackbootError
from rackboot.proc import run

# A private range used only inside the namespace this module creates.
SUBNET = "10.213.0.0/24"
BRIDGE = "br0"
MAX_WORKERS = 64  # distinct first MAC bytes (see RackNetwork.mac); two leases each from .64-.254
_counter = itertools.count()


def _ip(*args: str, what: str) -> None:
    run(["ip", *args], what, missing="apt-get install iproute2")


class RackNetwork:
    """A network namespace with a bridge (the master's address on it) and ``workers`` taps."""

    def __init__(self, workers: int, *, subnet: str = SUBNET, name: str | None = None):
        if workers < 1:
            raise RackbootError(f"a rack network needs at least one worker, not {workers}")
        self.network = ipaddress.IPv4Network(subnet)
        if self.network.prefixlen != 24 or workers > MAX_WORKERS:
            raise RackbootError(f"a rack network is a /24 of at most {MAX_WORKERS} workers, not {workers} on {subnet}")
        self.name = name or f"rackboot-{os.getpid()}-{next(_counter)}"
        self.workers = workers
        self.bridge = BRIDGE
        self.taps = [f"tap{i}" for i in range(workers)]
        self._spawned: list[subprocess.Popen[bytes]] = []
        self._created = False

    # --- addresses -----------------------------------------------------------------------

    @property
    def master(self) -> str:
        """The master's address: the subnet's first host, on the bridge."""
        return str(self.network.network_address + 1)

    @property
    def prefix(self) -> int:
        return self.network.prefixlen

    def host(self, n: int) -> str:
        """The subnet's ``n``-th address (1 is the master's)."""
        return str(self.network.network_address + n)

    def dhcp_range(self) -> tuple[str, str]:
        """Leases for the workers, clear of the master's and servers' low addresses."""
        return self.host(64), self.host(254)

    def mac(self, i: int) -> str:
        """Worker ``i``'s MAC, unicast and locally administered. Distinct in its first byte:
        Debian's U-Boot 2023.01 reads a virtio NIC's MAC as its first byte six times
        (52:52:52:52:52:52 for QEMU's default), so workers that share a first byte share
        a MAC, and a lease, in U-Boot."""
        return f"{0x02 + 4 * i:02x}:52:00:d5:00:{i:02x}"

    # --- lifecycle -----------------------------------------------------------------------

    def up(self) -> RackNetwork:
        """Create the namespace, its bridge (with the master's address) and the taps; on
        any failure, remove what was made and raise."""
        try:
            _ip("netns", "add", self.name, what=f"create network namespace {self.name} (needs root)")
            self._created = True
            _ip("-n", self.name, "link", "set", "lo", "up", what=f"{self.name}: bring up loopback")
            _ip(
                "-n",
                self.name,
                "link",
                "add",
                self.bridge,
                "type",
                "bridge",
                "forward_delay",
                "0",  # a port forwards at once: U-Boot's first DHCP request must get through
                what=f"{self.name}: create bridge {self.bridge}",
            )
            _ip(
                "-n",
                self.name,
                "addr",
                "add",
                f"{self.master}/{self.prefix}",
                "dev",
                self.bridge,
                what=f"{self.name}: address the bridge",
            )
            _ip("-n", self.name, "link", "set", self.bridge, "up", what=f"{self.name}: bring up {self.bridge}")
            for tap in self.taps:
                _ip("-n", self.name, "tuntap", "add", "dev", tap, "mode", "tap", what=f"{self.name}: create {tap}")
                _ip("-n", self.name, "link", "set", tap, "master", self.bridge, "up", what=f"{self.name}: {tap} up")
        except BaseException:
            self.down()
            raise
        return self

    def uplink(self, other: RackNetwork, address: str) -> None:
        """A veth pair from this namespace to ``other``'s bridge, ``address`` (in ``other``'s
        subnet) on this end: a rack master's way to the region, while its own bridge stays
        its rack's. Deleting either namespace deletes the pair."""
        here, there = f"up{next(_counter)}", f"rk{next(_counter)}"
        what = f"{self.name}: uplink to {other.name}"
        _ip("-n", self.name, "link", "add", here, "type", "veth", "peer", "name", there, "netns", other.name, what=what)
        _ip("-n", self.name, "addr", "add", f"{address}/{other.prefix}", "dev", here, what=what)
        _ip("-n", self.name, "link", "set", here, "up", what=what)
        _ip("-n", other.name, "link", "set", there, "master", other.bridge, "up", what=what)

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` as run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def spawn(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside the namespace in a session of its own, its output to
        ``log``; it is killed at teardown if it still runs."""
        if not self._created:
            raise RackbootError(f"the rack network {self.name} is not up")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                self.command(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._spawned.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
        """SIGTERM ``proc``'s session, then SIGKILL it if it has not ended within ``timeout``."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                return
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def pids(self) -> list[int]:
        """Every process inside the namespace (workers and servers others started there too)."""
        done = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    def down(self) -> None:
        """Kill what runs in the namespace, delete the taps, the bridge and the namespace.
        Never raises: it runs after failures, and each step is tried whatever the last did."""
        for proc in self._spawned:
            self.stop(proc, timeout=5)
        self._spawned.clear()
        if self._created:
            self._kill_the_rest()
            for device in (*self.taps, self.bridge):
                subprocess.run(["ip", "-n", self.name, "link", "del", device], capture_output=True)
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self._created = False

    def _kill_the_rest(self) -> None:
        """SIGKILL whatever still runs in the namespace, until nothing does (at most 10 s)."""
        deadline = time.monotonic() + 10
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def __enter__(self) -> RackNetwork:
        return self.up()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()
