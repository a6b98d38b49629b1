"""The runner's QEMU command line for disks: plain raw files as before, blkdebug under
raw for disks with faults (tests/e2e/test_faults.py checks the spec against QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rackboot.errors import RackbootError
from rackboot.qemu.machines import profile
from rackboot.qemu.runner import DiskFault, QemuWorker


def drives(**options) -> list[str]:
    worker = QemuWorker(profile("qemu-virt", "arm64"), log_path=Path("console.log"), **options)
    try:
        cmd = worker.command()
    finally:
        worker.kill()  # removes its temporary directory; nothing was started
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-drive"]


def test_plain_disks_are_raw_files_as_before():
    assert drives(disks=[Path("/c/a.img"), Path("/c/b.img")]) == [
        "if=none,id=disk0,format=raw,file=/c/a.img,cache=writeback",
        "if=none,id=disk1,format=raw,file=/c/b.img,cache=writeback",
    ]


def test_faults_put_blkdebug_under_raw_on_their_disk_only():
    plain, faulty = drives(
        disks=[Path("/c/a.img"), Path("/c/b.img")],
        faults=[DiskFault("write", sector=2048, disk=1), DiskFault("read", errno=28, once=True, disk=1)],
    )
    assert plain == "if=none,id=disk0,format=raw,file=/c/a.img,cache=writeback"
    assert faulty == (
        "if=none,id=disk1,format=raw,cache=writeback,werror=report,rerror=report,"
        "file.driver=blkdebug,file.image.filename=/c/b.img,"
        "file.inject-error.0.event=write_aio,file.inject-error.0.iotype=write,file.inject-error.0.errno=5,"
        "file.inject-error.0.once=off,file.inject-error.0.sector=2048,"
        "file.inject-error.1.event=read_aio,file.inject-error.1.iotype=read,file.inject-error.1.errno=28,"
        "file.inject-error.1.once=on"
    )


def test_bad_faults_are_refused_in_one_line():
    with pytest.raises(RackbootError, match="iotype 'discard' is not one of read, write"):
        DiskFault("discard")
    with pytest.raises(RackbootError, match="disk fault on disk 1: the worker has 1 disks"):
        drives(disks=[Path("/c/a.img")], faults=[DiskFault("read", disk=1)])
