"""rsync mode against the full stream, for a one-package change of a realistic root.

    python benchmarks/bench_rsync.py        (as root: the updater mounts the slots it fills)

v1 is a base system with Python and a few services, unpacked from Debian arm64 packages
through the project's own package cache (the builder's PackageCache); v2 adds one package
(jq, with its two libraries). Both are published as any root is (ext4 image, gzip stream,
file manifest, the tree rsync serves). A file-backed card takes v1 by the stream, then v2
in turn by the stream and by rsync (formatting the slot, unchanged files copied from the
good slot, the rest sent as deltas, the slot checked against the signed file manifest), each
with the updater as the worker runs it, against rackboot serve's HTTP and its rsync daemon
on loopback. Printed: bytes fetched by each method, as a share of v2's full gzip stream,
bytes written to the slot, and seconds per install.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rackboot.initramfs.updater import filemanifest, formats
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import Layout, Method, Partition, Plan
from rackboot.initramfs.updater.main import Identity, run
from rackboot.master import filemanifest as published_files
from rackboot.master import plans, publish, rsyncd, serve
from rackboot.sources import PackageCache
from tiny import pick

FULL_BASE = [
    "base-files",
    "busybox-static",
    "python3.11",
    "openssh-server",
    "chrony",
    "lighttpd",
    "iproute2",
    "rsync",
    "less",
]
BASE = pick(FULL_BASE, ["base-files", "busybox-static"])
ADDED = "jq"  # the one package v2 adds (jq, libjq1, libonig5)
EPOCH = 1700000000
MAC = "52:54:00:12:34:56"
NODE = "default"
SLOT_MIB = pick(600, 64)
LAYOUT = Layout(
    (
        Partition("boot", 4, 16, "0c"),
        Partition("a", 20, SLOT_MIB, "83"),
        Partition("b", 20 + SLOT_MIB, SLOT_MIB, "83"),
        Partition("data", 20 + 2 * SLOT_MIB, "rest", "83"),
    )
)
CARD_MIB = 20 + 2 * SLOT_MIB + 64


def root(packages: list[str], dest: Path) -> Path:
    """The packages and their dependencies unpacked into one tree (no maintainer scripts run)."""
    cache = PackageCache("arm64")
    tree = cache.sysroot(cache.resolve(packages))
    subprocess.run(["cp", "-a", f"{tree}/.", str(dest)], check=True)
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _install(card: Path, url: str) -> tuple[float, int, str, int]:
    """One boot's update with the updater in this process: seconds, bytes fetched, how the
    image method went (the updater picks the block delta when the master has an index) and
    bytes written: the blocks the install allocated in the sparse card, whose target slot is
    a hole (each block written counts once)."""
    client = MasterClient(url, read_timeout=30.0)
    logs: list[str] = []
    before = os.stat(card).st_blocks
    start = time.perf_counter()
    decision = run(str(card), url, Identity(MAC), master=client, log=logs.append)
    seconds = time.perf_counter() - start
    written = (os.stat(card).st_blocks - before) * 512
    if decision.action != "installed":
        raise SystemExit(f"bench_rsync: v{decision.version} was not installed: {logs[-3:]}")
    how = next((line for line in logs if line.startswith(("delta: ", "full stream: ")) or "over rsync" in line), "")
    return seconds, decision.bytes_fetched, how[:110], written


def bench() -> dict:
    if os.geteuid() != 0:
        raise SystemExit("bench_rsync: run as root (the updater mounts the slot it fills with rsync)")
    with tempfile.TemporaryDirectory(prefix="rackboot-bench-rsync-") as tmp:
        tmp = Path(tmp)
        master = tmp / "master"
        v1 = publish.publish_directory(root(BASE, tmp / "v1"), master, image="bench", source_date_epoch=EPOCH)
        v2 = publish.publish_directory(root([*BASE, ADDED], tmp / "v2"), master, image="bench", source_date_epoch=EPOCH)
        http = serve.make_server(master, "127.0.0.1", 0, quiet=True)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{http.server_address[1]}"
        daemon = rsyncd.RsyncService(master, "127.0.0.1", _free_port(), log=False)
        daemon.start()
        try:

            def assign(version: int, method: Method) -> None:
                plan = Plan(
                    node=NODE,
                    layout=LAYOUT,
                    image=formats.manifest_path("bench", version),
                    method=method,
                    rsync_port=daemon.port if method is Method.RSYNC else None,
                )
                plans.write_plan(master, NODE, plan)

            card = tmp / "card.img"
            with open(card, "wb") as f:
                f.truncate(CARD_MIB << 20)
            assign(1, Method.IMAGE)
            first = _install(card, url)
            subprocess.run(["cp", "--sparse=always", card, tmp / "after-v1.img"], check=True)
            assign(2, Method.IMAGE)
            stream = _install(card, url)
            os.replace(tmp / "after-v1.img", card)
            assign(2, Method.RSYNC)
            by_rsync = _install(card, url)
        finally:
            daemon.stop()
            http.shutdown()
            http.server_close()
        listed = filemanifest.load((master / "images/bench/2" / published_files.FILE).read_bytes())
        return {
            "v1": v1,
            "v2": v2,
            "first": first,
            "stream": stream,
            "rsync": by_rsync,
            "tree_bytes": sum(e.size for e in listed if e.type == "f"),
            "entries": len(listed),
        }


def rsync_row(s: Any, layout: dict[str, Any], row: Callable[..., Any]) -> Any:
    """bench_delta's rsync method (``s`` its Setup, ``layout`` its LAYOUT, ``row`` its Row):
    v2 by rsync onto a copy of its v1 card, from a copy of its master served by rackboot
    serve's HTTP and rsync daemon. Written: the slot's blocks that the install allocated in
    the sparse card (slot b is a hole on the v1 card, so each block written counts once)."""
    card, master = s.tmp / "card-rsync.img", s.tmp / "master-rsync"
    subprocess.run(["cp", "--sparse=always", s.card, card], check=True)
    subprocess.run(["cp", "-a", s.master, master], check=True)  # hard links, owners and devices as they are
    http = serve.make_server(master, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{http.server_address[1]}"
    daemon = rsyncd.RsyncService(master, "127.0.0.1", _free_port(), log=False)
    daemon.start()
    try:
        plan = Plan(
            node="bench",
            layout=Layout.from_dict(layout),
            image=formats.manifest_path("bench", 2),
            method=Method.RSYNC,
            rsync_port=daemon.port,
        )
        plans.write_plan(master, "default", plan)
        before = os.stat(card).st_blocks
        logs: list[str] = []
        start = time.perf_counter()
        decision = run(str(card), url, Identity(MAC), master=MasterClient(url, read_timeout=30.0), log=logs.append)
        seconds = time.perf_counter() - start
        written = (os.stat(card).st_blocks - before) * 512
    finally:
        daemon.stop()
        http.shutdown()
        http.server_close()
        card.unlink()
        shutil.rmtree(master)
    if decision.action != "installed":
        raise SystemExit(f"bench_rsync: v2 was not installed by rsync: {logs[-3:]}")
    note = next((line for line in logs if "over rsync" in line), "")
    return row("rsync", decision.bytes_fetched, written, seconds, note)


def report(r: dict) -> str:
    v2 = r["v2"]
    full = v2.stream_size
    rows = [
        ("image method", r["stream"][1], r["stream"][3], r["stream"][0], r["stream"][2]),
        ("rsync", r["rsync"][1], r["rsync"][3], r["rsync"][0], r["rsync"][2]),
    ]
    lines = [
        f"root: v1 {r['v1'].size / 1e6:.0f} MB ext4 ({r['v1'].stream_size / 1e6:.1f} MB gzip), "
        f"v2 = v1 + {ADDED}: {v2.size / 1e6:.0f} MB ext4, {full / 1e6:.1f} MB gzip, {r['entries']} files "
        f"of {r['tree_bytes'] / 1e6:.0f} MB",
        f"{'v1 -> v2 by':<14} {'fetched':>12} {'of the stream':>14} {'written':>12} {'seconds':>8}",
        f"{'(full stream)':<14} {full:>12,} {1:>13.1%} {v2.size:>12,} {'':>8}  (v2's gzip stream, the reference)",
    ]
    for name, fetched, written, seconds, how in rows:
        lines.append(f"{name:<14} {fetched:>12,} {fetched / full:>13.1%} {written:>12,} {seconds:>8.1f}  {how}")
    lines.append(
        f"rsync fetched {r['rsync'][1] / full:.1%} of the full stream (goal for a one-package change: <= 3%; "
        f"RAUC's block-hash index ~10%), its file manifest included; written: blocks the install allocated; "
        f"v1 by the stream took {r['first'][0]:.1f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(print(report(bench())))
