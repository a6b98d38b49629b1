"""QEMU machine profiles: how to emulate each board rackboot can boot, as data."""

from __future__ import annotations

from dataclasses import dataclass

from rackboot.errors import RackbootError


@dataclass(frozen=True)
class MachineProfile:
    name: str
    arch: str  # Debian arch of the worker
    qemu: str  # system emulator binary
    machine: str
    cpu: str
    memory_mib: int
    firmware: str  # U-Boot from Debian's u-boot-qemu, given to QEMU as -bios
    net_device: str
    block_device: str
    watchdog: str = ""  # QEMU's watchdog device, where the worker's kernel has its driver
    smp: int = 1  # CPUs (a Pi's SoC has a fixed number)
    # Where U-Boot comes from: "bios" (the profile's firmware, as -bios) or "card" (the
    # card's own u-boot.bin and device tree, given by the harness as -kernel and -dtb)
    uboot: str = "bios"
    console_uart: int = 0  # which of the board's UARTs carries the console (-serial per UART)
    disk_power_of_two: bool = False  # QEMU's SD card model takes only power-of-two sizes
    # The NIC is plugged in (QMP device_add) once the kernel starts, not at power-on: see raspi3b
    nic_after_uboot: bool = False
    # Whether the board powers off on the guest's poweroff; when not, the harness ends the
    # machine on the console line it expects (QemuWorker.end_on)
    powers_off: bool = True
    # False where QEMU resets the board as soon as the guest arms its watchdog
    watchdog_can_arm: bool = True


PROFILES: dict[tuple[str, str], MachineProfile] = {
    ("qemu-virt", "arm64"): MachineProfile(
        "qemu-virt",
        "arm64",
        "qemu-system-aarch64",
        "virt",
        "cortex-a57",
        1024,
        "/usr/lib/u-boot/qemu_arm64/u-boot.bin",
        "virtio-net-pci",
        "virtio-blk-pci",
        watchdog="i6300esb",
    ),
    ("qemu-virt", "armhf"): MachineProfile(
        "qemu-virt",
        "armhf",
        "qemu-system-arm",
        "virt",
        "cortex-a15",
        1024,
        "/usr/lib/u-boot/qemu_arm/u-boot.bin",
        "virtio-net-pci",
        "virtio-blk-pci",
    ),
    # A Raspberry Pi 3 Model B as QEMU 7.2 emulates it, booting the rpi3 card. The one step
    # emulation skips is the GPU firmware (bootcode.bin, start.elf): QEMU plays its part,
    # loading the card's u-boot.bin (config.txt's kernel=) as -kernel and handing it the
    # card's 3B device tree as -dtb, as start.elf hands U-Boot the tree it chose. From there
    # the card's boot.scr, kernel, initramfs and updater run as on a Pi. The network is
    # QEMU's usb-net behind the dwc2 USB host (the kernel's rndis_host drives it); U-Boot has
    # no driver for it, so netboot falls back to the card's own kernel and initramfs.
    # QEMU's dwc2 has no core soft reset, so the port state U-Boot leaves at handover (reset,
    # connect change acknowledged) would hide the NIC from Linux: the harness plugs the NIC
    # in once the kernel runs, which Linux sees as a device connecting, as on a real reset.
    # QEMU's model of the PM block resets the board the moment its watchdog is armed (no
    # countdown): workers on it run with [initramfs] watchdog = 0. No watchdog device here.
    # The kernel has no power-off for a Pi: poweroff halts it ("reboot: System halted") and
    # QEMU runs on, so the harness ends each boot on the console line it expects.
    ("rpi3", "arm64"): MachineProfile(
        "raspi3b",
        "arm64",
        "qemu-system-aarch64",
        "raspi3b",
        "cortex-a53",
        1024,
        "",
        "usb-net",
        "sd",
        smp=4,
        uboot="card",
        console_uart=1,  # the mini UART: the Pi 3's Bluetooth holds the PL011
        disk_power_of_two=True,
        nic_after_uboot=True,
        powers_off=False,
        watchdog_can_arm=False,
    ),
}


def profile(board: str, arch: str) -> MachineProfile:
    try:
        return PROFILES[(board, arch)]
    except KeyError:
        known = ", ".join(f"{b}/{a}" for b, a in sorted(PROFILES))
        raise RackbootError(f"no QEMU profile for {board}/{arch} (emulated boards: {known})") from None
