"""`make demo`: the whole story on an emulated worker with a blank 1 GiB card.

Build; publish the example root filesystem as v1; serve; boot a worker whose card
holds only the SD image. Boot 1 lays out the card and installs v1; boot 2 fetches
nothing; v2 is published and boot 3 installs it; boot 4 runs with the master down and
boots v2 from the card. A summary table ends it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import config
from .master import plans
from .qemu.harness import IMAGE, MasterThread, blank_card, check_rootfs, new_worker, prepare, publish_example


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


def run(config_path: Path, workdir: Path | None = None) -> int:
    cfg = config.load(config_path)
    work = Path(workdir) if workdir else cfg.output.directory.parent / "demo"
    rows = story(cfg, work, log=lambda line: print(line, flush=True))
    print()
    print(table(rows))
    print(f"worker disk image and console logs: {work}")
    return 0
