"""The qemu-virt example as the e2e tests boot it: its settings written into a tmp dir
with output, master and a free loopback port of the test's own; and the session's one
build of it, with a worker's card and master tree after its first boots (Example)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rackboot import config, demo
from rackboot.master import plans
from rackboot.qemu import harness

from tests.helpers import quiet, write_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/qemu-virt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_config(directory: Path, initramfs: dict[str, Any] | None = None, **layout: Any) -> Path:
    """The qemu-virt example's settings, with output, master and a free port under ``directory``."""
    example = config.load(EXAMPLE / "rackboot.toml")
    for part in ("rootfs", "hooks"):
        shutil.copytree(EXAMPLE / part, directory / part, symlinks=True)
    return write_config(
        directory,
        updater=True,
        initramfs=dict(initramfs or {}),
        kernel={"root_modules": list(example.kernel.root_modules)},
        master={"port": free_port(), "key": "keys/master.key"},
        layout={
            "partitions": [p.to_dict() for p in example.layout.partitions],
            "mount": example.layout.mount,
            **layout,
        },
    )


@dataclass(frozen=True)
class Example:
    """The qemu-virt example built once per session (one port, one key, one master tree),
    and what one worker's first boots left: the modules that boot it start from a copy of
    the card and the master tree rather than building and provisioning their own."""

    cfg: config.Config
    out: Path  # the build
    saved: Path  # boot<n>/: the card, the master tree and the keys after boot n
    rows: tuple[demo.BootRow, ...] = ()  # boots 1 and 2, as `rackboot demo` counts them
    logs: tuple[Path, ...] = ()  # their console logs

    def start(self, boots: int, work: Path) -> Path:
        """The master tree and keys as they were after ``boots`` boots of the worker (0: an
        empty tree, the keys as made), that worker's card in ``work``; returns the card (a
        blank one for 0). The modules run one after the other, each on the tree afresh."""
        saved = self.saved / f"boot{boots}"
        master, keys = self.cfg.master.directory, self.keys
        for dest, src in ((master, saved / "master"), (keys, self.saved / "keys")):
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(src, dest, symlinks=True)
        work.mkdir(parents=True, exist_ok=True)
        card = work / "worker-disk.img"
        subprocess.run(["cp", "--sparse=always", str(saved / "card.img"), str(card)], check=True)
        return card

    @property
    def keys(self) -> Path:
        assert self.cfg.master.key is not None
        return self.cfg.master.key.parent

    def save(self, boots: int, card: Path) -> None:
        saved = self.saved / f"boot{boots}"
        saved.mkdir(parents=True)
        shutil.copytree(self.cfg.master.directory, saved / "master", symlinks=True)
        subprocess.run(["cp", "--sparse=always", str(card), str(saved / "card.img")], check=True)


def provision(directory: Path) -> Example:
    """Build the example in ``directory``, boot one worker's blank card twice (v1 installed,
    then confirmed), saving the card and master tree before and after each boot. Serve names
    the node that follows the default plan by a hostname pattern (tests/e2e/test_story.py)."""
    path = example_config(directory)
    path.write_text(path.read_text().replace("[master]\n", '[master]\nhostname = "worker-{index:02d}"\n', 1))
    cfg = config.load(path)
    work = directory / "demo"
    out = harness.prepare(cfg, work, quiet)
    example = Example(cfg, out, directory / "saved")
    shutil.copytree(example.keys, example.saved / "keys", symlinks=True)
    card = work / "worker-disk.img"
    harness.blank_card(out / "sdcard.img", card)
    example.save(0, card)
    harness.publish_example(cfg, cfg.base / "rootfs", work, 1)
    plans.assign(cfg, node="default", image=harness.IMAGE)
    rows, logs = [], []
    for boot, action in ((1, "installed"), (2, "up-to-date")):
        log = work / "logs" / f"boot{boot}.log"
        master = harness.MasterThread(cfg)
        try:
            row = demo._boot(cfg, out, card, log, r"rackboot-demo: v1 is up", master=master, offline=False)
        finally:
            master.stop()  # its inventory closed before the tree is copied
        assert row.action == action, log.read_text(errors="replace")[-3000:]
        row.boot = boot
        rows.append(row)
        logs.append(log)
        example.save(boot, card)
    return replace(example, rows=tuple(rows), logs=tuple(logs))
