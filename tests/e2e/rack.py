"""The qemu-virt example as the e2e tests boot it: its settings written into a tmp dir
with output, master and a free loopback port of the test's own."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

from rackboot import config

from tests.helpers import write_config

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
