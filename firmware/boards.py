"""Board profiles: what each supported board needs from Debian and from us.

A profile is data only. The builder reads it to pick the kernel package, the U-Boot
binary, the Pi firmware files, the DTBs, the kernel console and the modules the
initramfs must load to reach the network and the card.
"""

from __future__ import annotations

from dataclasses import dataclass

from rackboot.errors import ConfigError

# Modules every board needs: the card's filesystem (ext4 checksums its metadata with
# crc32c, which it only asks for through the crypto API) and the overlay root.
COMMON_MODULES = ("crc32c_generic", "ext4", "overlay")


@dataclass(frozen=True)
class Board:
    name: str
    arch: str  # Debian arch
    kernel_package: str
    boot_command: str  # booti (arm64 Image) or bootz (arm zImage)
    console: str  # kernel console= value
    disk: str  # the card as the worker's kernel names it
    modules: tuple[str, ...]  # network + block drivers, loaded by /init
    dtbs: tuple[str, ...] = ()  # paths under the kernel package's usr/lib/linux-image-<kver>/
    uboot_package: str = "u-boot-qemu"
    uboot_binary: str = ""  # path inside the U-Boot package
    firmware_package: str = ""  # raspi-firmware for Pis
    firmware_files: tuple[str, ...] = ()  # matched start/fixup pairs, bootcode
    arm_64bit: bool = False
    uboot_arch: str = "arm64"  # U-Boot legacy image arch field
    watchdog: tuple[str, ...] = ()  # the hardware watchdog's driver, loaded by /init
    # U-Boot's TFTP client, as the boot scripts set it: bytes per block (1468 fills one
    # 1500-byte frame; larger needs IP reassembly in U-Boot, and the master's dnsmasq caps a
    # block at the interface's MTU less 32 anyway), milliseconds before a block is asked for
    # again, and timeouts in a row before the transfer fails (and the card boots). No
    # tftpwindowsize: Debian's U-Boot 2023.01 would ask for RFC 7440 windows, but dnsmasq
    # 2.90 answers only blksize and tsize, so a transfer stays one block per round trip.
    tftp_blocksize: int = 1468
    tftp_timeout_ms: int = 1000
    tftp_timeout_count: int = 3

    @property
    def is_pi(self) -> bool:
        return self.name.startswith("rpi")


_VIRTIO = ("virtio_pci", "virtio_mmio", "virtio_net", "virtio_blk")
_PI3_FIRMWARE = ("bootcode.bin", "start.elf", "fixup.dat")
_PI4_FIRMWARE = ("start4.elf", "fixup4.dat")
# dwc2: the USB host every Pi 3 Ethernet hangs off (smsc95xx on the 3B, lan78xx on the 3B+);
# usbnet, cdc_ether, rndis_host: USB Ethernet class devices (adapters, and QEMU raspi3b's
# usb-net, which is the emulated Pi's only network); bcm2835: the SD host
_PI3_NET = (
    "dwc2",
    "smsc95xx",
    "lan78xx",
    "usbnet",
    "cdc_ether",
    "rndis_host",
    "bcm2835",
    "sdhci_iproc",
    "mmc_block",
)
_PI4_NET = ("genet", "broadcom", "sdhci_iproc", "mmc_block")
_PI_WATCHDOG = ("bcm2835_wdt",)  # the PM block's watchdog, on every Pi
# A Pi's U-Boot drives its Ethernet through USB (Pi 3) or GENET with a slow link-up, and a
# rack switching on together loses packets: more patience per block than on QEMU
_PI_TFTP_TIMEOUT_MS = 2000
_PI_TFTP_TIMEOUT_COUNT = 5

BOARDS: dict[tuple[str, str], Board] = {
    ("qemu-virt", "arm64"): Board(
        "qemu-virt",
        "arm64",
        "linux-image-arm64",
        "booti",
        "ttyAMA0",
        "/dev/vda",
        _VIRTIO,
        uboot_binary="usr/lib/u-boot/qemu_arm64/u-boot.bin",
        watchdog=("i6300esb",),
    ),
    # armmp builds no i6300esb driver: the emulated armhf worker runs without a watchdog
    ("qemu-virt", "armhf"): Board(
        "qemu-virt",
        "armhf",
        "linux-image-armmp",
        "bootz",
        "ttyAMA0",
        "/dev/vda",
        _VIRTIO,
        uboot_binary="usr/lib/u-boot/qemu_arm/u-boot.bin",
        uboot_arch="arm",
    ),
    ("rpi3", "arm64"): Board(
        "rpi3",
        "arm64",
        "linux-image-arm64",
        "booti",
        "ttyS1,115200",
        "/dev/mmcblk0",
        _PI3_NET,
        dtbs=("broadcom/bcm2837-rpi-3-b.dtb", "broadcom/bcm2837-rpi-3-b-plus.dtb"),
        uboot_package="u-boot-rpi",
        uboot_binary="usr/lib/u-boot/rpi_arm64/u-boot.bin",
        firmware_package="raspi-firmware",
        firmware_files=_PI3_FIRMWARE,
        arm_64bit=True,
        watchdog=_PI_WATCHDOG,
        tftp_timeout_ms=_PI_TFTP_TIMEOUT_MS,
        tftp_timeout_count=_PI_TFTP_TIMEOUT_COUNT,
    ),
    ("rpi3", "armhf"): Board(
        "rpi3",
        "armhf",
        "linux-image-armmp",
        "bootz",
        "ttyS1,115200",
        "/dev/mmcblk0",
        _PI3_NET,
        dtbs=("bcm2837-rpi-3-b.dtb", "bcm2837-rpi-3-b-plus.dtb"),
        uboot_package="u-boot-rpi",
        uboot_binary="usr/lib/u-boot/rpi_3_32b/u-boot.bin",
        firmware_package="raspi-firmware",
        firmware_files=_PI3_FIRMWARE,
        uboot_arch="arm",
        watchdog=_PI_WATCHDOG,
        tftp_timeout_ms=_PI_TFTP_TIMEOUT_MS,
        tftp_timeout_count=_PI_TFTP_TIMEOUT_COUNT,
    ),
    ("rpi4", "arm64"): Board(
        "rpi4",
        "arm64",
        "linux-image-arm64",
        "booti",
        "ttyS1,115200",
        "/dev/mmcblk0",
        _PI4_NET,
        dtbs=("broadcom/bcm2711-rpi-4-b.dtb",),
        uboot_package="u-boot-rpi",
        uboot_binary="usr/lib/u-boot/rpi_arm64/u-boot.bin",
        firmware_package="raspi-firmware",
        firmware_files=_PI4_FIRMWARE,
        arm_64bit=True,
        watchdog=_PI_WATCHDOG,
        tftp_timeout_ms=_PI_TFTP_TIMEOUT_MS,
        tftp_timeout_count=_PI_TFTP_TIMEOUT_COUNT,
    ),
    # No ("rpi4", "armhf"): Debian's armmp-lpae kernel builds no driver for the Pi 4's
    # GENET Ethernet, so the worker could never reach its master. Pi 4s run arm64.
}


def board(name: str, arch: str) -> Board:
    try:
        return BOARDS[(name, arch)]
    except KeyError:
        known = ", ".join(f"{n}/{a}" for n, a in sorted(BOARDS))
        raise ConfigError(f"no board profile for {name} on {arch} (known: {known})") from None
