"""pytest plugin (entry point rackboot_qemu): `qemu_worker` and `rack_network` factory fixtures.

    def test_boot(qemu_worker, probe_build):
        worker = qemu_worker("qemu-virt", "arm64", tftp_dir=probe_build, bootfile="boot.scr.uimg")
        worker.expect("network up", timeout=60)

A rack network (qemu/netns.py) is a namespace with a bridge and one tap per worker:

    def test_rack(rack_network):
        rack = rack_network(4)  # up: namespace, bridge with rack.master's address, taps

Workers are killed and rack networks torn down (with whatever runs in them) at teardown;
a missing QEMU or no root fails the test loudly, never skips it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rackboot.errors import RackbootError

from .machines import profile
from .netns import RackNetwork
from .runner import QemuWorker


@pytest.fixture
def qemu_worker(tmp_path: Path) -> Iterator[Callable[..., QemuWorker]]:
    started: list[QemuWorker] = []

    def start(board: str = "qemu-virt", arch: str = "arm64", **options: Any) -> QemuWorker:
        machine = profile(board, arch)
        if shutil.which(machine.qemu) is None:
            pytest.fail(f"{machine.qemu} is not installed: run `make test`, which installs qemu-system-arm")
        options.setdefault("log_path", tmp_path / f"console-{len(started)}.log")
        worker = QemuWorker(machine, **options).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def rack_network() -> Iterator[Callable[..., RackNetwork]]:
    made: list[RackNetwork] = []

    def make(workers: int, **options: Any) -> RackNetwork:
        rack = RackNetwork(workers, **options)
        made.append(rack)
        try:
            return rack.up()
        except RackbootError as exc:
            pytest.fail(f"cannot set up the rack network: {exc}")

    yield make
    for rack in made:
        rack.down()
