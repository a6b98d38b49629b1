"""Fleet-scale numbers: WORKERS simulated workers booting against one real `rackboot serve`.

    python benchmarks/bench_fleet.py [WORKERS]

Each simulated worker is a light client that asks what a blank card's first two boots
ask, through the updater's own HTTP client (fetch.MasterClient: a connection per request,
its retries and report timeout), and posts the reports a real install sends, signed with a
node key of its own as report.signed makes them (rev9, the key in ``pubkey``, its Ed25519
signature over the exact body in X-Rackboot-Signature):

  first boot:  report plan (first contact); GET /keys/<n+1>.json (404: no newer master
               key); GET plans/<node>.json and its .sig (X-Rackboot-Serial); report layout
               (a blank card is partitioned); GET the manifest and its .sig; report
               download, commit, boot (installed). No image bytes: the stream is
               bench_stream's and bench_rack's subject, this one's is the master's per-worker
               work.
  second boot: report confirm (the trial slot confirmed itself); the key link, the plan and
               the manifest again, each with its .sig; report boot (up to date).

Plans and manifests are checked against the master key as a card does (in-process here:
a thousand openssl runs would load the client, not the master). The keys are made with
pyca/cryptography; one worker's first report is signed by the updater's own code (openssl)
too, and must come out byte for byte the same.

The boot storm: workers arrive evenly spread over the first RAMP seconds (a rack's power
switched on row by row), at most CONCURRENCY of them talking to the master at once (a
worker that arrives while all are busy waits its turn, and its lateness is printed).
Printed: reports counted by the inventory against those sent (all must be), the plan
latency (the plan's GET and its signature's, as a worker waits for both) at p50 and p99,
the master's CPU seconds per worker boot (utime + stime of the serve process from /proc),
and the seconds from the first arrival until the last worker's last report, each against
its goal.

Each scenario is one function of the workers returning a Run: one_master (its inventory in
SQLite), and two_racks (as root: the region with its rsync daemon and two rack masters
mirroring it, worker i asking rack i % 2, the reports counted in the region's inventory once
the rack masters' spools have drained into it). The region keeps the fleet in a real
PostgreSQL ([master] database; Debian's server in a temporary directory, as the tests run
it: tests/postgres.py), whose processes' CPU counts as the master's with the three serve
processes'.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rackboot import config
from rackboot.initramfs.updater import formats, nodekey
from rackboot.initramfs.updater import report as reports
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.fetch import MasterClient, NotFound
from rackboot.initramfs.updater.formats import Phase, Plan, Report
from rackboot.master import plans, publish, signing
from rackboot.master.inventory import Inventory
from rackboot.qemu.harness import rackboot_command
from tiny import pick

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/postgres.py
from tests import postgres

WORKERS = pick(1000, 6)
RAMP = pick(30.0, 1.0)  # seconds over which the workers arrive, evenly spread
CONCURRENCY = pick(64, 3)  # workers talking to the master at once
GOAL_SECONDS = 60.0  # first arrival -> every worker's last report
GOAL_P99 = 1.0  # plan latency at p99, seconds
IMAGE = "fleet"
SERIAL_HEADER = "X-Rackboot-Serial"
REPORTS_PER_WORKER = 7  # plan, layout, download, commit, boot; confirm, boot


@dataclass
class Worker:
    """A simulated worker: its node id, board serial and node key."""

    node: str
    serial: str
    key: Ed25519PrivateKey
    public_b64: str

    @classmethod
    def make(cls, i: int) -> Worker:
        key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(
            f"02-00-00-{i >> 16 & 0xFF:02x}-{i >> 8 & 0xFF:02x}-{i & 0xFF:02x}", f"{i:016x}", key, nodekey.b64(public)
        )

    def signed(self, report: Report) -> tuple[bytes, dict[str, str]]:
        """The body and headers report.signed makes with this worker's key."""
        body = formats.dump(replace(report, pubkey=self.public_b64))
        return body, {reports.SIGNATURE_HEADER: base64.b64encode(self.key.sign(body)).decode("ascii")}

    def node_key(self) -> nodekey.NodeKey:
        """The key as the updater keeps it on the card (for the check against its own signing)."""
        private = self.key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return nodekey.NodeKey(self.node, base64.b64decode(self.public_b64), private)


@dataclass
class Boots:
    """What the simulated workers saw, gathered across their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    plan_latency: list[float] = field(default_factory=list)
    boot_seconds: list[float] = field(default_factory=list)  # arrival -> last report, per worker
    lateness: list[float] = field(default_factory=list)  # arrival -> its first request
    statuses: Counter[str] = field(default_factory=Counter)  # report answers: "204", "503", "error: ..."
    failures: list[str] = field(default_factory=list)

    def add(self, **values: float) -> None:
        with self.lock:
            for name, value in values.items():
                getattr(self, name).append(value)


@dataclass
class Run:
    """One scenario's figures."""

    scenario: str
    workers: int
    reports_sent: int
    reports_counted: int  # in the inventory, signed by the node's pinned key
    nodes_pinned: int
    states: dict[str, int]  # nodes by the inventory's state: all "ok" (confirmed, booted up to date)
    statuses: dict[str, int]
    failures: list[str]
    plan_p50: float
    plan_p99: float
    boot_p50: float
    boot_p99: float
    most_late: float
    seconds: float  # first arrival -> the last worker's last report
    serve_cpu: float  # the serve processes' and the database server's (db_cpu) together
    client_cpu: float
    db_cpu: float | None = None  # PostgreSQL's processes', None for SQLite (inside serve)

    @property
    def counted_all(self) -> bool:
        return (
            self.reports_counted == self.reports_sent == self.workers * REPORTS_PER_WORKER
            and self.nodes_pinned == self.workers
            and self.states == {"ok": self.workers}
        )


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Card:
    """What one simulated worker's card checks documents against: the master's public key."""

    def __init__(self, public: Path):
        master = signing.read_public(public)
        self.n = master.n
        self.key = Ed25519PublicKey.from_public_bytes(master.raw)

    def signed_doc(self, client: MasterClient, path: str, headers: dict[str, str] | None = None) -> bytes:
        data = client.get(path, headers=headers)
        self.key.verify(client.get(path + ".sig", headers=headers), data)  # InvalidSignature: a failed boot
        return data


def boot_twice(worker: Worker, url: str, card: Card, boots: Boots, arrival: float) -> None:
    """One worker's first two boots from a blank card, as the updater makes them."""
    client = MasterClient(url)
    started = time.monotonic()
    boots.add(lateness=started - arrival)
    plan: Plan | None = None

    def report(phase: Phase, seconds: float = 0.0, size: int = 0, version: int | None = None) -> None:
        slot = "a" if version is not None else None  # a blank card's first install goes into slot a
        hostname = plan.hostname if plan else None
        made = reports.make(
            worker.node, phase, bytes=size, seconds=seconds, slot=slot, version=version, hostname=hostname
        )
        body, headers = worker.signed(made)
        try:
            status = str(client.post("/report", body, headers=headers))
        except Exception as e:  # the updater's send: best effort, one attempt, lost on any error
            status = f"error: {type(e).__name__}"
        with boots.lock:
            boots.statuses[status] += 1

    def plan_and_manifest() -> tuple[Plan, bytes]:
        try:
            client.get(formats.key_link_path(card.n + 1))
        except NotFound:
            pass
        t0 = time.monotonic()
        data = card.signed_doc(client, f"/plans/{worker.node}.json", {SERIAL_HEADER: worker.serial})
        boots.add(plan_latency=time.monotonic() - t0)
        got = formats.parse_plan(data)
        assert got.image is not None, f"{worker.node}: the plan assigns no image"
        return got, card.signed_doc(client, got.image)

    try:
        report(Phase.PLAN)
        plan, manifest_bytes = plan_and_manifest()
        manifest = formats.parse_manifest(manifest_bytes)
        size, version = manifest.stream_size, manifest.version  # (its reports count the bytes fetched)
        report(Phase.LAYOUT, time.monotonic() - started)
        report(Phase.DOWNLOAD, 0.5, size, version)  # the stream's own seconds, as a worker times it
        report(Phase.COMMIT, time.monotonic() - started, size, version)
        report(Phase.BOOT, time.monotonic() - started, size, version)
        second = time.monotonic()
        report(Phase.CONFIRM, 0.0, 0, version)
        plan, _ = plan_and_manifest()
        report(Phase.BOOT, time.monotonic() - second, 0, version)
    except Exception as e:  # a boot that could not go on (a refused signature too): counted, shown
        with boots.lock:
            boots.failures.append(f"{worker.node}: {type(e).__name__}: {e}")
    boots.add(boot_seconds=time.monotonic() - arrival)


def check_signing(worker: Worker) -> None:
    """The simulated worker's signed report is the updater's own, byte for byte (openssl signs
    it there; Ed25519 signatures are deterministic)."""
    made = reports.make(worker.node, Phase.PLAN)
    assert worker.signed(made) == reports.signed(made, worker.node_key()), (
        "simulated signing differs from the updater's"
    )


def storm(workers: list[Worker], urls: list[str], card: Card) -> tuple[Boots, float]:
    """The boot storm: arrivals evenly over RAMP s, CONCURRENCY at once, worker i asking
    urls[i % len(urls)] (its rack's master). (Boots, seconds)."""
    boots = Boots()
    start = time.monotonic() + 0.2
    arrivals = [start + RAMP * i / len(workers) for i in range(len(workers))]

    def one(i: int) -> None:
        time.sleep(max(0.0, arrivals[i] - time.monotonic()))
        boot_twice(workers[i], urls[i % len(urls)], card, boots, arrivals[i])

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, range(len(workers))))
    return boots, time.monotonic() - start


# --- the master --------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its children it waited for (openssl runs): fields 14
    to 17 of /proc/<pid>/stat, after the command's parentheses."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(f) for f in fields[11:15]) / _TICK


def tree_cpu(pid: int) -> float:
    """cpu_seconds of ``pid`` and of its children alive now: PostgreSQL's postmaster, whose
    backends it waited for count in its own, and those still serving a connection."""
    total = cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:  # the parent's pid: field 4
                total += cpu_seconds(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def master_tree(base: Path) -> config.Config:
    """A master with a signing key, one image published and the default plan on it."""
    (base / "root" / "etc").mkdir(parents=True)
    (base / "root" / "etc" / "hostname").write_text("fleet\n")
    key = base / "keys" / "master.key"
    signing.keygen(key)
    port = free_port()
    path = base / "rackboot.toml"
    path.write_text(
        '[board]\nname = "qemu-virt"\narch = "arm64"\n'
        f'[master]\naddress = "127.0.0.1"\nport = {port}\ndirectory = "master"\nkey = "keys/master.key"\n'
        '[output]\ndirectory = "build"\n'
    )
    cfg = config.load(path)
    cfg.master.directory.mkdir()
    publish.publish_directory(base / "root", cfg.master.directory, image=IMAGE, version=1, key=key)
    plans.assign(cfg, node="default", image=IMAGE)
    return cfg


class Serve:
    """`rackboot serve` as a process of its own (its CPU time is read from /proc), HTTP only."""

    def __init__(self, cfg: config.Config, log: Path):
        self.url = f"http://127.0.0.1:{cfg.master.port}"
        command = [str(rackboot_command()), "serve", "-c", str(cfg.path), "--no-netboot"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        client = MasterClient(self.url, retries=0)
        while True:
            try:
                client.get("/stats")
                return
            except UpdaterError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"bench_fleet: rackboot serve did not start: {log.read_text()[-500:]}") from None
                time.sleep(0.1)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # serve's clean stop
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- scenarios --------------------------------------------------------------------------------


def figures(
    name: str,
    workers: list[Worker],
    boots: Boots,
    seconds: float,
    serve_cpu: float,
    client_cpu: float,
    inventory: Inventory,
    db_cpu: float | None = None,
) -> Run:
    counted = inventory.db.execute("SELECT COUNT(*) FROM reports WHERE signed = 1 AND refused IS NULL").fetchone()[0]
    keys = dict(inventory.db.execute("SELECT id, pubkey FROM nodes").fetchall())
    pinned = sum(keys.get(w.node) == w.public_b64 for w in workers)  # each its own key
    states = Counter(row[0] for row in inventory.db.execute("SELECT state FROM nodes"))
    return Run(
        scenario=name,
        workers=len(workers),
        reports_sent=sum(boots.statuses.values()),
        reports_counted=counted,
        nodes_pinned=pinned,
        states=dict(states),
        statuses=dict(boots.statuses),
        failures=boots.failures,
        plan_p50=quantile(boots.plan_latency, 0.5),
        plan_p99=quantile(boots.plan_latency, 0.99),
        boot_p50=quantile(boots.boot_seconds, 0.5),
        boot_p99=quantile(boots.boot_seconds, 0.99),
        most_late=max(boots.lateness, default=0.0),
        seconds=seconds,
        serve_cpu=serve_cpu,
        client_cpu=client_cpu,
        db_cpu=db_cpu,
    )


def one_master(workers: list[Worker]) -> Run:
    """One `rackboot serve` with its SQLite inventory, [master] adopt = "auto" (the first key
    a node presents is pinned), every worker following the default plan."""
    with tempfile.TemporaryDirectory(prefix="rackboot-bench-fleet-") as tmp:
        base = Path(tmp)
        cfg = master_tree(base)
        assert cfg.master.key is not None
        card = Card(signing.public_key_path(cfg.master.key))
        serve = Serve(cfg, base / "serve.log")
        try:
            cpu, client = serve.cpu(), time.process_time()
            boots, seconds = storm(workers, [serve.url], card)
            serve_cpu, client_cpu = serve.cpu() - cpu, time.process_time() - client
        finally:
            serve.stop()
        return figures(
            "one master (SQLite)", workers, boots, seconds, serve_cpu, client_cpu, Inventory(cfg.master.directory)
        )


DRAIN_WAIT = 300.0  # seconds the rack masters get to forward their spools to the region


def rack_master(base: Path, name: str, region: config.Config, rsync_port: int) -> config.Config:
    """A rack master of ``region`` under base/<name>: its own port, no key, the region's public one."""
    assert region.master.key is not None
    directory = base / name
    directory.mkdir()
    path = directory / "rackboot.toml"
    path.write_text(
        '[board]\nname = "qemu-virt"\narch = "arm64"\n'
        f'[master]\naddress = "127.0.0.1"\nport = {free_port()}\ndirectory = "master"\n'
        f'upstream = "http://127.0.0.1:{region.master.port}"\n'
        f'upstream_key = "{signing.public_key_path(region.master.key)}"\n'
        f'upstream_rsync_port = {rsync_port}\nrack = "{name}"\n'
        '[output]\ndirectory = "build"\n'
    )
    return config.load(path)


def two_racks(workers: list[Worker]) -> Run:
    """The region (its inventory on PostgreSQL, its rsync daemon: serve as root) and two rack
    masters mirroring it ([master] upstream): worker i boots from rack i % 2, whose spool
    relays its reports to the region. Timed until the region has counted the last one; the
    CPU is the three serve processes' and PostgreSQL's together."""
    bin = postgres.bindir()
    if bin is None:
        raise SystemExit("bench_fleet: PostgreSQL's server binaries are not installed (make deps)")
    pg = postgres.Server(bin).start()
    assert pg.proc is not None
    postmaster = pg.proc.pid  # its backends and helpers are its children
    try:
        with tempfile.TemporaryDirectory(prefix="rackboot-bench-fleet-") as tmp:
            base = Path(tmp)
            region = master_tree(base)
            rsync_port = free_port()
            url = pg.database()
            text = region.path.read_text().replace(
                "[output]", f'rsync_port = {rsync_port}\ndatabase = "{url}"\n[output]'
            )
            region.path.write_text(text)
            region = config.load(region.path)
            assert region.master.key is not None and region.master.database == url
            card = Card(signing.public_key_path(region.master.key))
            serves = [Serve(region, base / "region.log")]
            try:
                racks = [rack_master(base, f"rack-{k}", region, rsync_port) for k in range(2)]
                serves += [Serve(cfg, base / f"rack-{k}.log") for k, cfg in enumerate(racks)]
                db, cpu, client = tree_cpu(postmaster), sum(s.cpu() for s in serves), time.process_time()
                start = time.monotonic()
                boots, _ = storm(workers, [s.url for s in serves[1:]], card)
                spools = [cfg.master.directory / "spool" for cfg in racks]
                deadline = time.monotonic() + DRAIN_WAIT
                while any(any(p.suffix == ".report" for p in spool.iterdir()) for spool in spools):
                    if time.monotonic() > deadline:
                        boots.failures.append(f"the rack masters' spools not forwarded within {DRAIN_WAIT:g} s")
                        break
                    time.sleep(0.1)
                seconds = time.monotonic() - start - 0.2  # storm's arrivals start 0.2 s in
                db_cpu = tree_cpu(postmaster) - db
                serve_cpu = sum(s.cpu() for s in serves) - cpu + db_cpu
                client_cpu = time.process_time() - client
            finally:
                for serve in serves:
                    serve.stop()
            return figures(
                "two rack masters relaying to the region (PostgreSQL)",
                workers,
                boots,
                seconds,
                serve_cpu,
                client_cpu,
                Inventory.for_config(region),
                db_cpu,
            )
    finally:
        pg.stop()


SCENARIOS: dict[str, Callable[[list[Worker]], Run]] = {"one master": one_master}
if os.geteuid() == 0:  # the region's rsync daemon, which the rack masters mirror from, runs as root
    SCENARIOS["two racks"] = two_racks


def bench(count: int = WORKERS) -> list[Run]:
    t0 = time.monotonic()
    workers = [Worker.make(i) for i in range(count)]
    made = time.monotonic() - t0
    check_signing(workers[0])
    print(f"  {count} node keys made in {made:.2f} s (pyca/cryptography)", flush=True)
    return [scenario(workers) for scenario in SCENARIOS.values()]


def ok(good: bool) -> str:
    return "ok" if good else "MISSED"


def db_part(r: Run) -> str:
    return "" if r.db_cpu is None else f", of which PostgreSQL {r.db_cpu:.1f} s"


def report(runs: list[Run]) -> str:
    lines = []
    for r in runs:
        statuses = ", ".join(f"{n} {status}" for status, n in sorted(r.statuses.items()))
        lines += [
            f"  {r.scenario}: {r.workers} workers arriving over {RAMP:g} s, at most {CONCURRENCY} at once",
            f"    reports counted: {r.reports_counted} of {r.reports_sent} sent ({r.workers} x {REPORTS_PER_WORKER} "
            f"expected; answers: {statuses}); nodes with their key pinned: {r.nodes_pinned}, by state: "
            f"{', '.join(f'{n} {state}' for state, n in sorted(r.states.items()))} (goal: all: {ok(r.counted_all)})",
            f"    plan latency (GET plan + .sig): p50 {r.plan_p50 * 1000:.0f} ms, p99 {r.plan_p99 * 1000:.0f} ms, "
            f"{r.plan_p99 / GOAL_P99:.2f} of the goal's {GOAL_P99:g} s ({ok(r.plan_p99 < GOAL_P99)})",
            f"    all {r.workers} booted twice in {r.seconds:.1f} s, {r.seconds / GOAL_SECONDS:.2f} of the goal's "
            f"{GOAL_SECONDS:g} s ({ok(r.seconds < GOAL_SECONDS and not r.failures)}); one worker's two boots: "
            f"p50 {r.boot_p50:.2f} s, p99 {r.boot_p99:.2f} s; waited for a turn at most {r.most_late:.2f} s",
            f"    master CPU: {r.serve_cpu / r.workers * 1000:.1f} ms per worker (its two boots; "
            f"{r.serve_cpu:.1f} s in all{db_part(r)}, {r.serve_cpu / r.seconds:.2f} of one core); "
            f"the workers' side (this process): {r.client_cpu:.1f} s",
        ]
        lines += [f"    failed: {failure}" for failure in r.failures[:5]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(bench(int(sys.argv[1]) if len(sys.argv) > 1 else WORKERS)))
    sys.exit(0)
