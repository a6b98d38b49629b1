"""pytest plugin (entry point rackboot_qemu): a `qemu_worker` factory fixture.

    def test_boot(qemu_worker, probe_build):
        worker = qemu_worker("qemu-virt", "arm64", tftp_dir=probe_build, bootfile="boot.scr.uimg")
        worker.expect("network up", timeout=60)

Workers are killed at teardown; a missing QEMU fails the test loudly, never skips it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .machines import profile
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
