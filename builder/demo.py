"""`make demo`: the whole story on an emulated worker with a blank 1 GiB card.

Build; publish the example root filesystem as v1; serve; boot a worker whose card
holds only the SD image. Boot 1 lays out the card and installs v1; boot 2 fetches
nothing; v2 is published and boot 3 installs it; boot 4 runs with the master down and
boots v2 from the card. A summary table ends it.

With --rack N, N blank workers are switched on together on a rack network in a
namespace (qemu/netns.py): a bridge, a tap per worker, and `rackboot serve` in the
namespace with its netboot service (dnsmasq leasing addresses and serving TFTP).
Boot 1 installs v1 on every worker, boot 2 fetches nothing, boot 3 installs v2; the
table has a row per worker and boot.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config
from .master import plans
from .qemu.harness import (
    IMAGE,
    MARKER,
    MasterProcess,
    MasterThread,
    blank_card,
    check_owned,
    check_rootfs,
    new_rack_worker,
    new_worker,
    prepare,
    publish_example,
)
from .qemu.netns import RackNetwork
from .qemu.runner import QemuWorker


@dataclass
class BootRow:
    boot: int
    expected: str
    action: str
    bytes_fetched: int
    seconds: float


def _boot(
    cfg: config.Config, out: Path, disk: Path, log: Path, expect: str, *, master: MasterThread | None, offline: bool
) -> BootRow:
    before = master.bytes_sent() if master else 0
    start = time.monotonic()
    with new_worker(cfg, out, disk, log, offline=offline) as worker:
        worker.expect(expect, timeout=300)
        worker.wait_exit(timeout=60)
    seconds = time.monotonic() - start
    fetched = (master.bytes_sent() - before) if master else 0
    action = _last_action(log)
    return BootRow(0, expect, action, fetched, seconds)


def _last_action(log: Path) -> str:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if "rackboot: booting slot" in line:
            return line.split("(", 1)[1].split(")", 1)[0]
    return "?"


STORY = [(1, False), (1, False), (2, False), (2, True)]  # (version expected, master stopped)


def story(
    cfg: config.Config,
    work: Path,
    rootfs: Path | None = None,
    log: Callable[[str], None] = print,
    steps: list[tuple[int, bool]] = STORY,
    broken: frozenset[int] = frozenset(),
) -> list[BootRow]:
    """Build, publish v1, serve, and boot the worker through ``steps`` (version expected,
    master stopped); versions in ``broken`` never confirm their slot. One row per boot."""
    rootfs = rootfs or cfg.base / "rootfs"
    check_rootfs(rootfs)
    out = prepare(cfg, work, log)
    master_dir = cfg.master.directory

    def release(version: int) -> None:
        publish_example(cfg, rootfs, work, version, broken=version in broken)
        plans.assign(cfg, node="default", image=IMAGE)
        log(f"published {IMAGE} v{version}")

    disk = work / "worker-disk.img"
    blank_card(out / "sdcard.img", disk)
    rows: list[BootRow] = []
    release(1)
    master: MasterThread | None = MasterThread(cfg)
    try:
        for n, (version, offline) in enumerate(steps, start=1):
            newest = max(v for v, _ in steps[:n])
            if newest > 1 and not (master_dir / "images" / IMAGE / str(newest)).is_dir():
                release(newest)
            if offline and master:
                master.stop()
                master = None
            log(f"boot {n}: expecting v{version}{' (master stopped)' if offline else ''} ...")
            row = _boot(
                cfg,
                out,
                disk,
                work / "logs" / f"boot{n}.log",
                rf"rackboot-demo: v{version} is up",
                master=master,
                offline=offline,
            )
            row.boot = n
            rows.append(row)
    finally:
        if master:
            master.stop()
    return rows


def table(rows: list[BootRow]) -> str:
    lines = [f"{'boot':<5} {'expected':<10} {'action':<12} {'image bytes':>14} {'seconds':>8}"]
    for r in rows:
        version = r.expected.split(": ")[1].split()[0]
        lines.append(f"{r.boot:<5} {version:<10} {r.action:<12} {r.bytes_fetched:>14} {r.seconds:>8.1f}")
    return "\n".join(lines)


@dataclass
class RackRow:
    worker: int
    boot: int
    version: int
    action: str
    address: str
    bytes_fetched: int
    seconds: float  # from switching the rack on to this worker powering off


RACK_STORY = [1, 1, 2]  # the version every worker boots, boot by boot
RACK_BOOT_TIMEOUT = 600  # a whole rack on a small machine


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return json.dumps(value)  # JSON strings and numbers are TOML's too
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"no TOML for {value!r}")


def rack_config(cfg: config.Config, base: Path, rack: RackNetwork) -> config.Config:
    """``cfg`` for ``rack``: the master at its address, its dnsmasq leasing addresses and
    serving the build on its bridge (dhcp "full"), build and master tree under ``base``;
    written as base/rackboot.toml, which `rackboot serve` in the namespace reads."""
    doc = {section: config.plain(getattr(cfg, section)) for section in config.SECTIONS}
    doc["master"].update(address=rack.master, directory=str(base / "master"))
    doc["output"]["directory"] = str(base / "build")
    first, last = rack.dhcp_range()
    doc["network"] = {
        "interface": rack.bridge,
        "dhcp": "full",
        "prefix": rack.prefix,
        "range_start": first,
        "range_end": last,
    }
    text = f"# written by `rackboot demo --rack` from {cfg.path}\n" + "".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items() if v is not None)
        for name, values in doc.items()
    )
    path = base / "rackboot.toml"
    path.write_text(text)
    return config.load(path)


def rack_story(
    cfg: config.Config, base: Path, workers: int, log: Callable[[str], None] = print, steps: list[int] = RACK_STORY
) -> list[RackRow]:
    """Build for a rack network, publish v1, serve in the namespace and switch ``workers``
    blank workers on together for each of ``steps`` (the version expected). One row per
    worker and boot."""
    rootfs = cfg.base / "rootfs"
    check_rootfs(rootfs)
    check_owned(base, "the rack demo's directory", "--workdir")
    base.mkdir(parents=True, exist_ok=True)
    (base / MARKER).write_text("made by `rackboot demo --rack`, which empties its parts on every run\n")
    rows: list[RackRow] = []
    with RackNetwork(workers) as rack:
        rack_cfg = rack_config(cfg, base, rack)
        work = base / "demo"
        out = prepare(rack_cfg, work, log)
        cards = [work / f"worker{i}-card.img" for i in range(workers)]
        for card in cards:
            blank_card(out / "sdcard.img", card)
        master = MasterProcess(rack_cfg, rack, work / "master.log")
        log(f"rack network {rack.name}: master {rack.master} (HTTP, DHCP, TFTP), {workers} workers on {rack.bridge}")
        for n, version in enumerate(steps, start=1):
            if not (rack_cfg.master.directory / "images" / IMAGE / str(version)).is_dir():
                publish_example(rack_cfg, rootfs, work, version)
                plans.assign(rack_cfg, node="default", image=IMAGE)
                log(f"published {IMAGE} v{version}")
            log(f"boot {n}: switching {workers} workers on together, expecting v{version} ...")
            rows += _rack_boot(rack_cfg, rack, cards, work / "logs", n, version)
        master.stop()
    return rows


def _rack_boot(
    cfg: config.Config, rack: RackNetwork, cards: list[Path], logs: Path, boot: int, version: int
) -> list[RackRow]:
    workers = [new_rack_worker(cfg, rack, i, card, logs / f"worker{i}-boot{boot}.log") for i, card in enumerate(cards)]
    reported = [len(_reports(cfg, rack, i)) for i in range(len(workers))]
    start = time.monotonic()
    try:
        for worker in workers:
            worker.start()
        with ThreadPoolExecutor(len(workers)) as pool:
            seconds = list(pool.map(lambda w: _until_off(w, rf"rackboot-demo: v{version} is up", start), workers))
    finally:
        for worker in workers:
            worker.kill()
    rows = []
    for i, worker in enumerate(workers):
        console = worker.log_path.read_text(errors="replace")
        address = re.search(r"rackboot: network up: \S+ (\S+)/", console)
        fetched = sum(r["bytes"] for r in _reports(cfg, rack, i)[reported[i] :] if r["phase"] == "download")
        rows.append(
            RackRow(
                i, boot, version, _last_action(worker.log_path), address[1] if address else "?", fetched, seconds[i]
            )
        )
    return rows


def _until_off(worker: QemuWorker, expect: str, start: float) -> float:
    worker.expect(expect, timeout=RACK_BOOT_TIMEOUT)
    worker.wait_exit(timeout=60)
    return time.monotonic() - start


def _reports(cfg: config.Config, rack: RackNetwork, i: int) -> list[dict[str, Any]]:
    path = cfg.master.directory / "reports" / f"{rack.mac(i).replace(':', '-')}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rack_table(rows: list[RackRow]) -> str:
    lines = [
        f"{'worker':<7} {'boot':<5} {'expected':<10} {'action':<12} {'address':<15} {'image bytes':>14} {'seconds':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r.worker:<7} {r.boot:<5} {'v' + str(r.version):<10} {r.action:<12} {r.address:<15} "
            f"{r.bytes_fetched:>14} {r.seconds:>8.1f}"
        )
    return "\n".join(lines)


def run(config_path: Path, workdir: Path | None = None, rack: int = 0) -> int:
    cfg = config.load(config_path)
    say = lambda line: print(line, flush=True)  # noqa: E731
    if rack:
        base = Path(workdir) if workdir else cfg.output.directory.parent / "rack"
        rack_rows = rack_story(cfg, base, rack, log=say)
        print()
        print(rack_table(rack_rows))
        print(f"worker disk images and console logs: {base / 'demo'}")
        print()
        print(fleet_table(base / "master", cfg.master.stale))
        return 0
    work = Path(workdir) if workdir else cfg.output.directory.parent / "demo"
    rows = story(cfg, work, log=say)
    print()
    print(table(rows))
    print(f"worker disk image and console logs: {work}")
    print()
    print(fleet_table(cfg.master.directory, cfg.master.stale))
    return 0


def fleet_table(master: Path, stale: int) -> str:
    """`rackboot status`'s table of the demo's master: what the inventory made of the boots."""
    from .master import inventory, status

    nodes = inventory.Inventory(master).nodes()
    return "rackboot status:\n" + status.table(nodes, time.time(), stale, colour=status.use_colour(sys.stdout))
