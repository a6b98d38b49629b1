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
}


def profile(board: str, arch: str) -> MachineProfile:
    try:
        return PROFILES[(board, arch)]
    except KeyError:
        known = ", ".join(f"{b}/{a}" for b, a in sorted(PROFILES))
        raise RackbootError(f"no QEMU profile for {board}/{arch} (emulated boards: {known})") from None
