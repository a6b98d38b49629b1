"""One emulated worker: QEMU with U-Boot as firmware, a serial console we can read and
log, a QMP socket for power control, user-mode networking (DHCP + TFTP) and raw disks.

    with QemuWorker(profile("qemu-virt", "arm64"), log_path=log, tftp_dir=out,
                    bootfile="boot.scr.uimg", disks=[card]) as worker:
        worker.expect(r"network up: \\S+ (\\S+)", timeout=60)
        worker.wait_exit(timeout=30)

A disk can fail chosen requests (QEMU's blkdebug): faults=[DiskFault("write", sector=N)].
A worker with nic=False has no network interface at all (QEMU's -nic none). With
console_input=True, worker.type("...") types on its serial console.

A board whose U-Boot comes from the card (the raspi3b profile) gets it and the card's
device tree as kernel=/dtb=; its card is grown to a power of two, its NIC is plugged in
once the kernel runs, and since it cannot power itself off, end_on(pattern) ends it on
the console line the caller expects:

    worker = QemuWorker(profile("rpi3", "arm64"), log_path=log, tftp_dir=out, disks=[card],
                        kernel=uboot_bin, dtb=card_dtb).start()
    worker.end_on(r"reboot: Power down", timeout=900)

On a rack network (qemu/netns.py) a worker has a tap NIC instead of user-mode networking
and QEMU runs inside the namespace; its QMP socket and console stay on the host's side:

    QemuWorker(machine, log_path=log, netns=rack.name, tap=rack.taps[0], mac=rack.mac(0), disks=[card])
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rackboot.errors import RackbootError

from .machines import MachineProfile

# The kernel's first console line: the board's NIC is plugged in from here (nic_after_uboot)
KERNEL_STARTED = "Booting Linux on physical CPU"

# What /init (initramfs/init.sh) says it booted, and why a worker with nothing to boot powered off
BOOTED = re.compile(r"rackboot: booting slot (\S+ \([^)]*\) from \S+ mounted \S+)")
NOTHING_TO_BOOT = re.compile(r"rackboot: nothing to boot, powering off: (.+)")

# blkdebug arms a rule only when its event fires; QEMU 7.2's raw format fires these per request
BLKDEBUG_EVENTS = {"read": "read_aio", "write": "write_aio"}


@dataclass(frozen=True)
class DiskFault:
    """Guest requests of one kind to one disk fail (blkdebug inject-error). A rule hits
    each request that covers ``sector`` (512-byte units: blkdebug knows no ranges), or
    every request of its kind when ``sector`` is None. virtio-blk reports any errno to
    the guest as an I/O error."""

    iotype: str  # read | write
    sector: int | None = None
    errno: int = 5  # EIO
    once: bool = False  # only the first hit fails (the guest kernel retries failed reads)
    disk: int = 0  # index into the worker's disks

    def __post_init__(self) -> None:
        if self.iotype not in BLKDEBUG_EVENTS:
            raise RackbootError(f"disk fault: iotype {self.iotype!r} is not one of {', '.join(BLKDEBUG_EVENTS)}")

    def drive_options(self, rule: int) -> str:
        """This fault as inject-error rule number ``rule`` of a -drive's blkdebug layer."""
        options = {
            "event": BLKDEBUG_EVENTS[self.iotype],
            "iotype": self.iotype,
            "errno": self.errno,
            "once": "on" if self.once else "off",
        }
        if self.sector is not None:
            options["sector"] = self.sector
        return ",".join(f"file.inject-error.{rule}.{k}={v}" for k, v in options.items())


def grow_to_power_of_two(disk: Path) -> None:
    """Grow ``disk`` (sparse) to the next power of two, as QEMU's SD card model needs: a
    real card's capacity is the updater's to find, and the tail is blank either way."""
    size = Path(disk).stat().st_size
    if size and size & (size - 1):
        os.truncate(disk, 1 << size.bit_length())


class QemuWorker:
    def __init__(
        self,
        machine: MachineProfile,
        *,
        log_path: Path,
        tftp_dir: Path | None = None,
        bootfile: str | None = None,
        disks: Sequence[Path] = (),
        no_reboot: bool = True,
        extra_netdev: str = "",
        extra_args: Sequence[str] = (),
        faults: Sequence[DiskFault] = (),
        watchdog_action: str = "reset",
        nic: bool = True,
        console_input: bool = False,
        netns: str | None = None,
        tap: str | None = None,
        mac: str | None = None,
        kernel: Path | None = None,
        dtb: Path | None = None,
    ):
        if not nic and (tftp_dir is not None or extra_netdev):
            raise RackbootError("a worker without a network interface has no TFTP and no netdev options")
        if tap is not None and (tftp_dir is not None or extra_netdev or not nic):
            raise RackbootError("a worker on a tap device gets DHCP and TFTP from its rack network, not from QEMU")
        if machine.uboot == "card" and (kernel is None or dtb is None):
            raise RackbootError(f"the {machine.name} machine boots the card's U-Boot: give its kernel= and dtb=")
        if machine.nic_after_uboot and not no_reboot:
            raise RackbootError(f"the {machine.name} machine plugs its NIC in once per power-on: it needs no_reboot")
        self.machine = machine
        self.kernel = kernel
        self.dtb = dtb
        self.log_path = Path(log_path)
        self.tftp_dir = tftp_dir
        self.bootfile = bootfile
        self.disks = [Path(d) for d in disks]
        self.faults = list(faults)
        for fault in self.faults:
            if not 0 <= fault.disk < len(self.disks):
                raise RackbootError(f"disk fault on disk {fault.disk}: the worker has {len(self.disks)} disks")
        self.no_reboot = no_reboot
        self.watchdog_action = watchdog_action  # what the board's watchdog does when it fires
        self.extra_netdev = extra_netdev
        self.nic = nic
        self.console_input = console_input  # else the console's input is closed: nobody is there
        self.extra_args = list(extra_args)
        self.netns = netns  # QEMU runs inside this network namespace
        self.tap = tap
        self.mac = mac
        self._lines: list[str] = []
        self._tail: deque[str] = deque(maxlen=15)
        self._cond = threading.Condition()
        self._seen = 0  # lines already matched by expect(): each line matches once
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp = tempfile.mkdtemp(prefix="rackboot-qemu-")
        self.qmp_path = os.path.join(self._tmp, "qmp.sock")

    # --- lifecycle ---------------------------------------------------------------------

    def command(self) -> list[str]:
        m = self.machine
        cmd = [
            m.qemu,
            "-M",
            m.machine,
            "-cpu",
            m.cpu,
            "-m",
            str(m.memory_mib),
            "-smp",
            str(m.smp),
            *self._firmware(),
            "-display",
            "none",
            "-monitor",
            "none",
            *["-serial", "null"] * m.console_uart,  # the UARTs before the console's
            "-serial",
            "stdio",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        cmd += self._network()
        for i, disk in enumerate(self.disks):
            if m.block_device == "sd":  # the board's own SD host: no device to add
                cmd += ["-drive", self._drive(i, disk)]
            else:
                cmd += ["-drive", self._drive(i, disk), "-device", f"{m.block_device},drive=disk{i}"]
        if m.watchdog:  # with -no-reboot, a watchdog reset ends QEMU like any other reset
            cmd += ["-device", m.watchdog, "-action", f"watchdog={self.watchdog_action}"]
        if self.no_reboot:
            cmd.append("-no-reboot")
        cmd += self.extra_args
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def _firmware(self) -> list[str]:
        if self.machine.uboot == "card":  # QEMU loads them as the Pi's GPU firmware would
            return ["-kernel", str(self.kernel), "-dtb", str(self.dtb)]
        return ["-bios", self.machine.firmware]

    def _nic_device(self) -> str:
        device = f"{self.machine.net_device},netdev=net0"
        if self.machine.net_device.endswith("-pci"):
            device += ",romfile="  # no iPXE option ROM: U-Boot is the firmware
        if self.mac:
            device += f",mac={self.mac}"
        return device

    def _network(self) -> list[str]:
        if not self.nic:
            return ["-nic", "none"]  # not even QEMU's default NIC: a board whose interface is missing
        if self.tap is not None:
            netdev = f"tap,id=net0,ifname={self.tap},script=no,downscript=no"
        else:
            netdev = "user,id=net0"
            if self.tftp_dir is not None:
                netdev += f",tftp={Path(self.tftp_dir).resolve()}"
                if self.bootfile:
                    netdev += f",bootfile={self.bootfile}"
            netdev += self.extra_netdev
        if self.machine.nic_after_uboot:
            return ["-netdev", netdev]  # the device comes with the kernel: _plug_nic
        return ["-netdev", netdev, "-device", self._nic_device()]

    def _plug_nic(self) -> None:
        """Plug the NIC in (QMP device_add), as the console reader does when the kernel starts."""
        try:
            self.qmp(
                "device_add",
                **dict(kv.split("=", 1) for kv in self._nic_device().split(",")[1:]),
                driver=self.machine.net_device,
            )
        except RackbootError as exc:
            if self.running:  # a worker already switched off has nothing to plug into
                self._log_line(f"[rackboot harness: cannot plug the NIC in: {exc}]")

    def _drive(self, i: int, disk: Path) -> str:
        faults = [f for f in self.faults if f.disk == i]
        where = f"if=sd,index={i}" if self.machine.block_device == "sd" else f"if=none,id=disk{i}"
        if not faults:
            return f"{where},format=raw,file={disk},cache=writeback"
        # blkdebug as the protocol layer under raw; errors go to the guest (werror's
        # default would pause the VM on ENOSPC instead)
        rules = ",".join(f.drive_options(n) for n, f in enumerate(faults))
        return (
            f"{where},format=raw,cache=writeback,werror=report,rerror=report,"
            f"file.driver=blkdebug,file.image.filename={disk},{rules}"
        )

    def start(self) -> QemuWorker:
        if shutil.which(self.machine.qemu) is None:
            raise RackbootError(f"{self.machine.qemu} is not installed (apt-get install qemu-system-arm)")
        if self.machine.uboot == "bios" and not os.path.exists(self.machine.firmware):
            raise RackbootError(f"U-Boot firmware {self.machine.firmware} is missing (apt-get install u-boot-qemu)")
        for what, path in (("U-Boot", self.kernel), ("device tree", self.dtb)):
            if path is not None and not Path(path).is_file():
                raise RackbootError(f"the card's {what} {path} is missing (rackboot build makes the card)")
        if self.machine.disk_power_of_two:
            for disk in self.disks:
                grow_to_power_of_two(disk)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # open for the worker's life, not one block: the console reader writes it, kill() closes it
        self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        stdin = subprocess.PIPE if self.console_input else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            self.command(), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()
        return self

    def _read_console(self) -> None:
        stdout = self._process().stdout
        assert stdout is not None  # start() asks for a pipe
        plug = self.nic and self.machine.nic_after_uboot
        for raw in iter(stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n").replace("\r", "")
            self._log_line(line)
            if plug and KERNEL_STARTED in line:  # U-Boot is gone: nothing will reset the port now
                plug = False
                threading.Thread(target=self._plug_nic, daemon=True).start()
        with self._cond:
            self._cond.notify_all()

    def _log_line(self, line: str) -> None:
        with self._cond:
            self._log.write(line + "\n")
            self._log.flush()
            self._lines.append(line)
            self._tail.append(line)
            self._cond.notify_all()

    def __enter__(self) -> QemuWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        if self._proc and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, 9)
            except ProcessLookupError:
                pass
        if self._proc:
            self._proc.wait()
            if self._proc.stdin:
                self._proc.stdin.close()
            self._reader.join(timeout=5)
            self._log.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- console -----------------------------------------------------------------------

    @property
    def console(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first console line, not matched before, that matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._seen < len(self._lines):
                    line = self._lines[self._seen]
                    self._seen += 1
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if not self.running and self._seen >= len(self._lines):
                    why = self.nothing_to_boot()
                    raise RackbootError(
                        f"worker powered off before /{pattern}/ was seen: nothing to boot: {why} (log: {self.log_path})"
                        if why
                        else f"worker stopped before /{pattern}/ was seen; last console line: "
                        f"{self._last_line()!r} (log: {self.log_path})"
                    )
                if left <= 0:
                    raise RackbootError(
                        f"no console line matched /{pattern}/ within {timeout:g} s; last line: "
                        f"{self._last_line()!r} (log: {self.log_path})"
                    )
                self._cond.wait(min(left, 0.5))

    def type(self, text: str) -> None:
        """Type ``text`` on the serial console, as a person at it would."""
        if not self.console_input:
            raise RackbootError("this worker was started without console_input=True")
        stdin = self._process().stdin
        assert stdin is not None  # console_input: start() asks for a pipe
        stdin.write(text.encode())
        stdin.flush()

    def booted(self) -> str | None:
        """What /init last said it booted ("a (installed) from /dev/vda2 mounted rw"), if anything."""
        return self._last_said(BOOTED)

    def nothing_to_boot(self) -> str | None:
        """Why /init powered the worker off with nothing to boot ("no card: ..."), if it did."""
        return self._last_said(NOTHING_TO_BOOT)

    def _last_said(self, regex: re.Pattern[str]) -> str | None:
        for line in reversed(self.console):
            match = regex.search(line)
            if match:
                return match.group(1).strip()
        return None

    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RackbootError("the worker has not been started")
        return self._proc

    def _last_line(self) -> str:
        return next((line for line in reversed(self._tail) if line.strip()), "")

    def end_on(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for the console line that ends this boot, then switch the worker off (a
        board that cannot power itself off, or a caller that has seen enough)."""
        match = self.expect(pattern, timeout)
        self.power_off()
        return match

    def wait_exit(self, timeout: float) -> int:
        try:
            return self._process().wait(timeout)
        except subprocess.TimeoutExpired:
            raise RackbootError(
                f"worker did not power off within {timeout:g} s; last console line: "
                f"{self._last_line()!r} (log: {self.log_path})"
            ) from None

    # --- QMP -----------------------------------------------------------------------------

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command on a fresh connection; returns its 'return' value."""
        deadline = time.monotonic() + 10
        while True:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.qmp_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise RackbootError(f"QMP socket {self.qmp_path} did not come up") from None
                time.sleep(0.05)
        with sock, sock.makefile("rwb") as f:
            json.loads(f.readline())  # greeting
            for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
                f.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "return" in reply or "error" in reply:
                        break  # skip asynchronous events
                if "error" in reply:
                    raise RackbootError(f"QMP {cmd} failed: {reply['error'].get('desc')}")
            return reply["return"]

    def reset(self) -> None:
        self.qmp("system_reset")

    def power_off(self) -> None:
        """Pull the plug: QEMU stops at once, whatever the guest was doing."""
        try:
            self.qmp("quit")
        except (RackbootError, OSError):
            pass
        self.kill()
