"""v1 -> v2 of a realistic root, one Debian package upgraded, installed on the host updater
by each method: bytes fetched from the master, bytes written to the slot, the share of the
full compressed stream, and seconds, side by side.

    python benchmarks/bench_delta.py [libssl3] [openssl] [--json]

The root is Debian bookworm arm64 packages through rackboot's own package cache (a base
system with Python, systemd, OpenSSH, nginx, rsyslog, cron: a few hundred MiB), unpacked
with dpkg-deb -x. v1 has one package from bookworm-updates (3.0.17), v2 bookworm's (3.0.20):
one package upgraded, the rest byte for byte the same; libssl3 (a 5.6 MiB library) and
openssl (the command) each in turn. Both are published by `rackboot
publish` (mke2fs -d, seeded per image name) and served by `rackboot serve` on loopback;
the card is a file. Every method starts from the same card: v1 installed in slot a.

Methods are functions of (Setup) -> Row in METHODS; a new one (rsync) is one more entry.
The reference: the full stream, measured in the same run; RAUC's adaptive updates report
~10% of the bundle for a one-package change (its docs), the goal here is <= 3%.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import bench_rsync
from rackboot.initramfs.updater import formats, layout, slotindex
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import Layout, Plan
from rackboot.initramfs.updater.main import Identity, run
from rackboot.master import plans, publish, serve
from rackboot.sources import PackageCache, PackageRef, parse_records
from tiny import pick

FULL_ROOT = (
    "python3",
    "systemd",
    "systemd-sysv",
    "openssh-server",
    "nginx-light",
    "rsyslog",
    "cron",
    "iproute2",
    "curl",
    "less",
    "procps",
    "ca-certificates",
    "libssl3",
    "openssl",
    "coreutils",
    "bash",
    "util-linux",
    "login",
    "passwd",
)
PACKAGES = pick(FULL_ROOT, ("openssl",))  # tiny: openssl and what it needs (libssl3, libc6)
# One package each: v1 has this version (bookworm-updates), v2 apt's candidate (bookworm's 3.0.20).
# libssl3 is a 5.6 MiB library (the hard case); openssl, the command, is 1.3 MiB with its docs.
UPGRADES = {"libssl3": "3.0.17-1~deb12u2", "openssl": "3.0.17-1~deb12u2"}
SCENARIOS = pick(tuple(UPGRADES), ("openssl",))  # the upgrades a run measures unless told
ARCH = "arm64"
EPOCH = 1_700_000_000
SLOT_MIB = pick(640, 64)
LAYOUT = {
    "partitions": [
        {"name": "boot", "start_mib": 4, "size_mib": 16, "type": "0c"},
        {"name": "a", "size_mib": SLOT_MIB, "type": "83"},
        {"name": "b", "size_mib": SLOT_MIB, "type": "83"},
        {"name": "data", "size_mib": "rest", "type": "83"},
    ],
    "repartition": "allowed",
}
DISK_MIB = 4 + 16 + 2 * SLOT_MIB + 16
MAC = "52:54:00:12:34:56"
RAUC_SHARE = 0.10  # RAUC's adaptive block-hash index, one package changed (its documentation)
GOAL_SHARE = 0.03


@dataclass(frozen=True)
class Setup:
    tmp: Path
    master: Path  # v1 and v2 published, with their block indexes
    card: Path  # v1 installed in slot a (by the full stream), v2 assigned
    v2: formats.Manifest
    v1_extra: int  # bytes the v1 install fetched beside its stream: the index it kept on the card


@dataclass(frozen=True)
class Row:
    method: str
    fetched: int  # bytes from the master (documents aside): streams, indexes, ranges
    written: int  # bytes written to the card's slot
    seconds: float
    note: str = ""


def roots(name: str) -> tuple[Path, Path]:
    """v1 and v2 trees from the package cache: v2 differs by one upgraded package, ``name``."""
    cache = PackageCache(ARCH)
    refs = cache.resolve(list(PACKAGES))
    version = UPGRADES[name]
    old = _ref(name, version)
    v1 = cache.sysroot([old if r.name == name else r for r in refs])
    v2 = cache.sysroot(refs)
    if v1 == v2:
        raise SystemExit(f"bench_delta: {name} {version} is apt's candidate too; nothing would change")
    return v1, v2


def _ref(name: str, version: str) -> PackageRef:
    done = subprocess.run(["apt-cache", "show", f"{name}:{ARCH}={version}"], capture_output=True, text=True)
    records = parse_records(done.stdout)
    if done.returncode or not records:
        raise SystemExit(f"bench_delta: apt knows no {name}:{ARCH}={version} (is bookworm-updates in the sources?)")
    r = records[0]
    return PackageRef(
        r["Package"], r["Version"], r.get("Architecture", ARCH), r["SHA256"], r["Filename"], int(r["Size"])
    )


class CountingDisk(Disk):
    """The card, counting the bytes written to it (slot-state records included: a few KiB)."""

    written = 0

    def write(self, offset: int, data) -> None:  # type: ignore[no-untyped-def]
        CountingDisk.written += len(memoryview(data))
        super().write(offset, data)


class Master:
    """`rackboot serve` of a master directory on loopback, in a thread."""

    def __init__(self, root: Path):
        self.server = serve.make_server(root, "127.0.0.1", 0, quiet=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def update(card: Path, master: Path, logs: list[str]) -> tuple[formats.Action, int, int, float]:
    """One host updater run against ``master``: its action, bytes fetched, bytes written, seconds."""
    server = Master(master)
    CountingDisk.written = 0
    try:
        start = time.perf_counter()
        decision = run(
            str(card),
            server.url,
            Identity(MAC),
            log=logs.append,
            master=MasterClient(server.url, read_timeout=30.0),
            open_disk=CountingDisk,
        )
        seconds = time.perf_counter() - start
    finally:
        server.close()
    return decision.action, decision.bytes_fetched, CountingDisk.written, seconds


def assign(master: Path, version: int) -> None:
    path = formats.manifest_path("bench", version)
    plans.write_plan(master, "default", Plan(node="bench", layout=Layout.from_dict(LAYOUT), image=path))


def without_index(master: Path, version: int) -> None:
    """As a master from before block indexes serves it: the manifest has no "delta"."""
    path = master / "images/bench" / str(version) / "manifest.json"
    manifest = formats.parse_manifest(path.read_bytes())
    path.unlink()  # a hard link to the shared master's copy: replaced, not rewritten
    path.write_bytes(formats.dump(replace(manifest, delta=None)))


def setup(tmp: Path, package: str, log: Callable[[str], None]) -> Setup:
    v1_root, v2_root = roots(package)
    master = tmp / "master"
    for version, root in ((1, v1_root), (2, v2_root)):
        log(f"publishing v{version} from {root} ...")
        publish.publish_directory(root, master, image="bench", version=version, source_date_epoch=EPOCH)
    card = tmp / "card.img"
    with open(card, "wb") as f:
        f.truncate(DISK_MIB << 20)
    assign(master, 1)
    logs: list[str] = []
    action, v1_fetched, *_ = update(card, master, logs)
    if action != "installed":
        raise SystemExit(f"bench_delta: v1 was not installed: {logs[-1:]}")
    assign(master, 2)
    v1, v2 = (formats.parse_manifest((master / f"images/bench/{v}/manifest.json").read_bytes()) for v in (1, 2))
    return Setup(tmp, master, card, v2, v1_fetched - v1.stream_size)


def without_diffs(master: Path) -> None:
    """As a master that kept no index diffs: the whole v2 index it is."""
    for diff in (master / "images/bench/2").glob("*.index.from-*"):
        diff.unlink()


def without_kept_index(card: Path) -> None:
    """As a card whose slot a was installed by an updater that kept no index: its trailer zeroed."""
    with Disk(str(card)) as disk:
        table = layout.read_table(disk)
        assert table is not None
        offset, capacity = layout.partition_range(table, 2)  # slot a
        disk.write(offset + capacity - slotindex.SECTOR, bytes(slotindex.SECTOR))


def _install_v2(
    s: Setup,
    method: str,
    prepare: Callable[[Path], None] = lambda m: None,
    prepare_card: Callable[[Path], None] = lambda c: None,
) -> Row:
    """v2 onto a copy of the v1 card (which ``prepare_card`` may change), from a copy of the
    master that ``prepare`` may change."""
    card = s.tmp / f"card-{method}.img"
    master = s.tmp / f"master-{method}"
    subprocess.run(["cp", "--sparse=always", s.card, card], check=True)
    subprocess.run(["cp", "-al", s.master, master], check=True)  # hard links: prepare replaces, never rewrites
    for shared in (*master.glob(".inventory.db*"), *master.glob("reports/*")):  # written in place by serve
        shared.unlink()
    prepare(master)
    prepare_card(card)
    logs: list[str] = []
    try:
        action, fetched, written, seconds = update(card, master, logs)
    finally:
        card.unlink()
    if action != "installed":
        raise SystemExit(f"bench_delta: {method}: v2 was not installed: {logs[-3:]}")
    # the delta's summary (its last line), or why the full stream
    note = next((line for line in reversed(logs) if line.startswith(("delta: ", "full stream: "))), "")
    shutil.rmtree(master)
    return Row(method, fetched, written, seconds, note)


def full_stream(s: Setup) -> Row:
    return _install_v2(s, "full stream", lambda m: without_index(m, 2))


def delta(s: Setup) -> Row:
    """The default: slot a's index kept on the card by the v1 install, v2's index as a diff against it."""
    return _install_v2(s, "delta")


def delta_whole_index(s: Setup) -> Row:
    """As delta, from a master without index diffs: v2's whole index."""
    return _install_v2(s, "delta, whole index", without_diffs)


def delta_index_from_master(s: Setup) -> Row:
    """No index kept on the card (an older updater installed v1): v1's and v2's whole indexes from the master."""
    return _install_v2(s, "delta, no kept index", prepare_card=without_kept_index)


def delta_hashed_here(s: Setup) -> Row:
    """No kept index, and the master no longer has v1's index: slot a is hashed on the worker."""
    return _install_v2(s, "delta, slot hashed here", lambda m: without_index(m, 1), without_kept_index)


METHODS: dict[str, Callable[[Setup], Row]] = {
    "full stream": full_stream,
    "delta": delta,
    "delta, whole index": delta_whole_index,
    "delta, no kept index": delta_index_from_master,
    "delta, slot hashed here": delta_hashed_here,
    "rsync": lambda s: bench_rsync.rsync_row(s, LAYOUT, Row),  # files, unchanged ones from slot a
}


def bench(packages: tuple[str, ...] = SCENARIOS, log: Callable[[str], None] = lambda m: None) -> dict:
    """One v1 -> v2 per upgraded package in ``packages``, every method each."""
    out = {}
    for package in packages:
        with tempfile.TemporaryDirectory(prefix="rackboot-bench-delta-") as tmp:
            s = setup(Path(tmp), package, log)
            rows = []
            for name, method in METHODS.items():
                log(f"{package}: v1 -> v2 by {name} ...")
                rows.append(method(s))
        out[package] = {
            "image_bytes": s.v2.size,
            "stream_bytes": s.v2.stream_size,
            "index_bytes": s.v2.delta.index_size if s.v2.delta else 0,
            "v1_extra_bytes": s.v1_extra,
            "rows": [r.__dict__ for r in rows],
        }
    return out


def report(results: dict) -> str:
    return "\n".join(_report(package, r) for package, r in results.items())


def _report(package: str, r: dict) -> str:
    mib = 2**20
    full = next(row for row in r["rows"] if row["method"] == "full stream")
    lines = [
        f"root of {len(PACKAGES)} Debian arm64 packages and their dependencies; v2 upgrades {package} "
        f"({UPGRADES[package]} -> bookworm's); image {r['image_bytes'] / mib:.0f} MiB, "
        f"stream {r['stream_bytes'] / mib:.1f} MiB gzip, block index {r['index_bytes'] / 1024:.0f} KiB",
        f"  {'method':<26} {'fetched':>11} {'of stream':>10} {'written':>10} {'seconds':>8} {'vs stream':>10}",
    ]
    for row in r["rows"]:
        lines.append(
            f"  {row['method']:<26} {row['fetched'] / mib:>7.2f} MiB {row['fetched'] / r['stream_bytes']:>9.1%} "
            f"{row['written'] / mib:>6.1f} MiB {row['seconds']:>8.1f} {full['seconds'] / row['seconds']:>9.2f}x"
        )
    delta_row = next(row for row in r["rows"] if row["method"] == "delta")
    lines.append(
        f"  delta's share of the full stream: {delta_row['fetched'] / r['stream_bytes']:.1%} "
        f"(goal <= {GOAL_SHARE:.0%}; RAUC adaptive ~{RAUC_SHARE:.0%}); the v1 install fetched "
        f"{r['v1_extra_bytes'] / 1024:.0f} KiB beside its stream (the index it kept on the card)"
    )
    lines += [f"  {row['note']}" for row in r["rows"] if row["note"]]
    return "\n".join(lines)


if __name__ == "__main__":
    wanted = tuple(a for a in sys.argv[1:] if not a.startswith("-")) or SCENARIOS
    unknown = [p for p in wanted if p not in UPGRADES]
    if unknown:
        raise SystemExit(f"bench_delta: no scenario for {unknown[0]}; known: {', '.join(UPGRADES)}")
    result = bench(wanted, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(report(result))
    if "--json" in sys.argv:
        print(json.dumps(result))
