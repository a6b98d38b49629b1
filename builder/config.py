"""rackboot.toml: every setting is one declarative record.

The records in SETTINGS drive parsing, validation, defaults, the error messages and
the generated reference in the README (``rackboot config --reference``), the way
mkosi keeps one table for all of them.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypedDict

from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import (
    DEFAULT_MOUNT,
    DEFAULT_TRIES,
    NAME_RE,
    Mount,
    Repartition,
    persist_problem,
)
from rackboot.initramfs.updater.layout import FAT_TYPES
from rackboot.initramfs.updater.sources import MAX_LIST, MAX_SOURCES, parse_list, url_problem
from rackboot.master.database import safe_url
from rackboot.master.database import url_problem as database_url_problem
from rackboot.master.hostnames import pattern_problem
from rackboot.master.limits import MAX_STREAMS

from .errors import ConfigError


class BoardName(StrEnum):
    QEMU_VIRT = "qemu-virt"
    RPI3 = "rpi3"
    RPI4 = "rpi4"


class Arch(StrEnum):
    """Debian's name for the worker's architecture."""

    ARM64 = "arm64"
    ARMHF = "armhf"


class DhcpMode(StrEnum):
    """Who answers the workers' DHCP: the site's router (none) or the master's dnsmasq (full)."""

    NONE = "none"
    FULL = "full"


class AdoptMode(StrEnum):
    """What a node that has no plan of its own gets once it has reported (adoption)."""

    AUTO = "auto"  # the default plan
    MANUAL = "manual"  # nothing, until `rackboot adopt NODE`


class PowerDriver(StrEnum):
    """How `rackboot power` switches a node: not at all, QEMU's QMP, or a command."""

    NONE = "none"
    QEMU = "qemu"
    COMMAND = "command"


class InitramfsCompression(StrEnum):
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"
    NONE = "none"


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    kind: str  # str | int | bool | path | list[str] | list[path] | table[path] | choice | layout
    default: Any
    help: str
    choices: type[StrEnum] | None = None  # choice settings: what the value may be
    required: bool = False
    minimum: int | None = None  # int settings: the range U-Boot, the kernel or the updater can take
    maximum: int | None = None
    # str and list[str] settings: checks the value (each item of a list) where it lands
    # (a boot script, a kernel command line, a path); path settings: the resolved path, after
    # the check every path gets (_path_problem); returns what is wrong, or None
    check: Callable[[str], str | None] | None = None
    shown: Callable[[str], str] | None = None  # the value as an error line quotes it (a password left out)

    @property
    def name(self) -> str:
        return f"[{self.section}] {self.key}"


class PartitionTable(TypedDict):
    """One entry of [layout] partitions as the TOML gives it, once checked."""

    name: str
    size_mib: int | Literal["rest"]
    type: str


def _default_layout() -> list[PartitionTable]:
    return [
        {"name": "boot", "size_mib": 128, "type": "0c"},
        {"name": "a", "size_mib": 384, "type": "83"},
        {"name": "b", "size_mib": 384, "type": "83"},
        {"name": "data", "size_mib": "rest", "type": "83"},
    ]


MBR_SECTORS = 1 << 32  # MBR's start and size are 32-bit sector numbers: 2 TiB
MIB_SECTORS = 2048
BOOT_START_MIB = 4  # where the card image and every plan put the boot partition
# The boot partition holds the FAT32 filesystem the card image makes (under this type)
BOOT_TYPES = tuple(f"{t:02x}" for t in FAT_TYPES)
MAX_CMDLINE = 512  # armhf kernels keep 1024 bytes of command line, the board's console and ours take the rest

_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")  # Debian policy 5.6.1
_MODULE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Inside U-Boot's `setenv bootargs "..."` hush acts on these: " ends the string (the rest runs
# as commands), $ expands a variable, \ escapes, ; and ` are command syntax elsewhere.
_CMDLINE_FORBIDDEN = set('"$\\;`')
# C0 controls, DEL and C1 controls: in a path, a newline would start a new directive in the
# configs serve generates (dnsmasq's, rsyncd's), a NUL cut it short, an ESC act on a terminal
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What dnsmasq's and rsyncd's config readers act on inside a value: quoting, a comment, a variable
_CONF_FORBIDDEN = set('"#%')


def _address(value: str) -> str | None:
    """An IPv4 address or a hostname: it lands in http://ADDRESS:PORT on the kernel command
    line and in /init's sourced init.conf, so nothing else may get through."""
    if re.fullmatch(r"[0-9.]+", value):
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            return "not an IPv4 address"
        return None
    labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
    if len(value) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        return "not an IPv4 address or a hostname (no scheme, port, path or spaces)"
    return None


def _ipv4(value: str) -> str | None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return "not an IPv4 address"
    return None


def _interface(value: str) -> str | None:
    """A Linux interface name (IFNAMSIZ): it lands in dnsmasq's config."""
    if len(value) > 15 or not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        return "not a network interface name (at most 15 letters, digits, '_', '.' or '-')"
    return None


def _cmdline(value: str) -> str | None:
    if len(value) > MAX_CMDLINE:
        return f"{len(value)} characters is longer than the {MAX_CMDLINE} allowed"
    bad = sorted({c for c in value if c in _CMDLINE_FORBIDDEN or not " " <= c <= "~"})
    if bad:
        return (
            f"contains {', '.join(repr(c) for c in bad)}, which U-Boot's boot script would act on "
            "(printable ASCII only, no double quote, dollar, backslash, semicolon or backtick)"
        )
    if "--" in value.split():
        return "'--' would hand the rest of the command line (panic=10, rackboot.master) to init, not the kernel"
    return None


def _upstream(value: str) -> str | None:
    """The region's base URL: http://HOST[:PORT], nothing after it (the mirror's rsync goes
    to the same host)."""
    m = re.fullmatch(r"http://([^/:]+)(?::([0-9]{1,5}))?/?", value)
    if m is None:
        return "not http://HOST:PORT (no path, query or credentials)"
    if m.group(2) is not None and not 1 <= int(m.group(2)) <= 65535:
        return f"port {m.group(2)} is not a TCP port"
    return _address(m.group(1))


RACK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _rack_name(value: str) -> str | None:
    return None if RACK_NAME_RE.fullmatch(value) else "not a rack name (1 to 64 letters, digits, '.', '_' or '-')"


def _token(value: str) -> str | None:
    if len(value) < 16 or len(value) > 256 or not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", value):
        return "not a token: 16 to 256 letters, digits or ._~+/=- (e.g. from `openssl rand -hex 32`)"
    return None


def _power_command(value: str) -> str | None:
    if "{node}" not in value:
        return "must contain {node}, or every node would be switched the same"
    try:
        value.format(node="n", action="a")
    except (KeyError, IndexError, ValueError) as exc:
        return f"only {{node}} and {{action}} may be filled in ({exc})"
    return None


def _qmp_template(value: str) -> str | None:
    return _power_command(value) or (None if value.startswith("/") else "must be an absolute path")


def _package(value: str) -> str | None:
    return None if _PACKAGE_RE.fullmatch(value) else "not a Debian package name"


def _package_or_tree(value: str) -> str | None:
    if value.startswith(("/", "./", "../")):  # a local sysroot, relative to the config
        return None
    return _package(value)


def _module(value: str) -> str | None:
    return None if _MODULE_RE.fullmatch(value) else "not a kernel module name"


def _path_problem(value: str) -> str | None:
    """What every path setting is checked for, as given and once resolved."""
    bad = sorted(set(_CONTROL_RE.findall(value)))
    if bad:
        return (
            f"contains the control character{'s' if len(bad) > 1 else ''} {', '.join(repr(c) for c in bad)}, "
            "which would break the line it is written on in a generated config"
        )
    return None


def _conf_directory(value: str) -> str | None:
    """A directory serve names in dnsmasq's config (tftp-root, the hosts and lease files) and
    rsyncd's (each module's path): one value a line, read by their own parsers."""
    bad = sorted({c for c in value if c in _CONF_FORBIDDEN})
    if bad:
        return (
            f"contains {', '.join(repr(c) for c in bad)}, which dnsmasq's or rsyncd's generated config "
            "would read as quoting, a comment or a variable (no double quote, '#' or '%')"
        )
    if value != value.rstrip():
        return "ends in whitespace, which dnsmasq's generated config would drop"
    return None


def _binary(value: str) -> str | None:
    """An absolute path inside the sysroot, or a bare name looked up in its bin directories."""
    if "\0" in value or ".." in value.split("/"):
        return "must stay inside the sysroot (no '..')"
    if "/" in value and not value.startswith("/"):
        return "must be an absolute path or a bare name"
    return None


SETTINGS: tuple[Setting, ...] = (
    Setting("board", "name", "choice", "qemu-virt", "Board profile.", BoardName),
    Setting("board", "arch", "choice", "arm64", "Debian architecture of the worker.", Arch),
    Setting(
        "kernel",
        "package",
        "str",
        "",
        "Debian kernel package (metapackages are followed), "
        "e.g. linux-image-arm64; empty = the board profile's default.",
        check=lambda v: _package(v) if v else None,
    ),
    Setting(
        "kernel",
        "path",
        "path",
        None,
        "A local kernel tree (an unpacked kernel package: boot/vmlinuz-*, lib/modules/*) used instead of the package.",
    ),
    Setting(
        "kernel",
        "cmdline",
        "str",
        "",
        "Extra kernel command line, after the board's console "
        f"(printable ASCII, no double quote, dollar, backslash, semicolon or backtick; at most "
        f"{MAX_CMDLINE} characters).",
        check=_cmdline,
    ),
    Setting(
        "kernel",
        "root_modules",
        "list[str]",
        [],
        "Modules (with their dependencies) that publish puts into each root filesystem, indexed by depmod; "
        "empty = the kernel's whole module tree.",
        check=_module,
    ),
    Setting(
        "initramfs",
        "packages",
        "list[str]",
        ["busybox-static"],
        "Debian packages unpacked into the sysroot that binaries are taken from "
        "(or local trees: paths starting with /, ./ or ../).",
        check=_package_or_tree,
    ),
    Setting(
        "initramfs",
        "binaries",
        "list[str]",
        ["/bin/busybox"],
        "Binaries copied with their ELF closure (interpreter and libraries): absolute paths inside "
        "the sysroot, or bare names.",
        check=_binary,
    ),
    Setting(
        "initramfs",
        "modules",
        "list[str]",
        [],
        "Kernel modules loaded at boot, with their dependencies, in dependency order.",
        check=_module,
    ),
    Setting("initramfs", "files", "table[path]", {}, "Extra files: target path = local source path."),
    Setting("initramfs", "compression", "choice", "gzip", "Initramfs compression.", InitramfsCompression),
    Setting("initramfs", "uboot_wrap", "bool", False, "Also wrap the initramfs as a U-Boot legacy ramdisk image."),
    Setting(
        "initramfs",
        "updater",
        "bool",
        True,
        "Carry the updater and the target Python; off = probe only (network up, power off).",
    ),
    Setting(
        "initramfs",
        "watchdog",
        "int",
        120,
        "Seconds the updater may go without progress before it stops feeding the board's "
        "hardware watchdog, which then resets the board; 0 = leave the watchdog alone.",
        minimum=0,
    ),
    Setting(
        "master",
        "address",
        "str",
        "10.0.2.2",
        "The master's address as workers reach it: an IPv4 address or a hostname.",
        check=_address,
    ),
    Setting("master", "port", "int", 8080, "The master's HTTP port.", minimum=1, maximum=65535),
    Setting(
        "master",
        "sources",
        "list[str]",
        [],
        "Where workers fetch from after the master, in order (another master, a cache), e.g. "
        '["http://10.1.0.2:8080"]: every document and byte range comes from the first source that '
        "has it right (signed documents, hashed images), and a report goes to the first that can "
        f"be reached. http://host[:port][/path] URLs, at most {MAX_SOURCES - 1}, {MAX_LIST} "
        "characters in all (rackboot.sources= on the kernel command line).",
        check=url_problem,
    ),
    Setting(
        "master",
        "max_streams",
        "int",
        MAX_STREAMS,
        "Image streams rackboot serve sends at once; past it a worker is told to come back "
        "(503 with Retry-After) and waits its turn. 8 streams of a worker writing its card at "
        "~15 MB/s fill a gigabit link; more only share it thinner.",
        minimum=1,
        maximum=1024,
    ),
    Setting(
        "master",
        "key",
        "path",
        None,
        "The master's Ed25519 private key (rackboot keygen makes it): publish and plan sign with it, "
        "and its .pub goes into the initramfs and the card, which then take only signed documents. "
        "rackboot keygen --rotate puts a new key at this path and keeps the old one beside it. "
        "Unset = an unsigned rack.",
    ),
    Setting(
        "master",
        "directory",
        "path",
        "master",
        "The master's tree (published images, plans, reports). rackboot serve hands it out, so "
        "[master] key must lie outside it; dnsmasq's and rsyncd's generated configs name it, so no "
        "double quote, '#' or '%'.",
        check=_conf_directory,
    ),
    Setting(
        "master",
        "hostname",
        "str",
        "",
        "Hostname pattern for nodes not named with --hostname, both those with a plan of their own and, "
        "through rackboot serve, adopted nodes following the default plan: "
        "{index} (1, 2, ... in the order nodes were first named or adopted, never reused, passing over "
        'names given by hand; {index:02d} pads) and {mac} (12 hex digits), e.g. "worker-{index:02d}"; '
        "empty = only names given with --hostname.",
        check=pattern_problem,
    ),
    Setting(
        "master",
        "adopt",
        "choice",
        "auto",
        "A node without a plan of its own enters the inventory with its first report (a plan request alone "
        "records nothing); auto: it gets the default plan, and is adopted with that report; manual: it gets "
        "none (it boots its last good slot) and is listed as waiting until `rackboot adopt NODE`.",
        AdoptMode,
    ),
    Setting(
        "master",
        "token",
        "str",
        "",
        "The bearer token the web API's actions (adopt, assign, power) need "
        "(`Authorization: Bearer TOKEN`); empty = no actions over HTTP, read-only.",
        check=lambda v: _token(v) if v else None,
    ),
    Setting(
        "master",
        "stale",
        "int",
        86400,
        "Seconds after which a node not heard from is marked stale in `rackboot status` and the web page "
        "(a worker talks to the master when it boots).",
        minimum=60,
    ),
    Setting(
        "master",
        "rsync_port",
        "int",
        0,
        "The port of the rsync daemon `rackboot serve` runs (as root) for plans with method rsync "
        "(`rackboot plan --method rsync`); 873 is rsync's own. 0 = no rsync daemon.",
        minimum=0,
        maximum=65535,
    ),
    Setting(
        "master",
        "database",
        "str",
        "",
        "Where the fleet's shared state (inventory, report history, rollouts, the hostname registry) "
        "lives: empty = the SQLite file .inventory.db in [master] directory (one rack); "
        '"postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME" = that PostgreSQL database, which several '
        "masters may share (libpq's settings, such as ?sslmode=require or a password in ~/.pgpass, apply).",
        check=database_url_problem,
        shown=safe_url,
    ),
    Setting(
        "master",
        "upstream",
        "str",
        "",
        "The region's URL (http://HOST:PORT) when this serve is a rack master: it mirrors what the "
        "region's plans reference (rsync from the region's daemon, checked against the region's "
        "signatures before its workers see it), serves its workers from that mirror and relays their "
        "reports to the region. Empty = this serve is the region (or the only master).",
        check=lambda v: _upstream(v) if v else None,
    ),
    Setting(
        "master",
        "upstream_key",
        "path",
        None,
        "A rack master's copy of the region's public key (the region's [master] key with .pub): "
        "every plan, manifest and boot manifest the mirror takes must verify with it (or a key its "
        "chain hands over). Give the oldest key a card in the rack may hold (key 0, unless every card "
        "has moved on): the mirror keeps the chain's links from it on. Needed with [master] upstream; "
        "a rack master never holds a private key.",
    ),
    Setting(
        "master",
        "upstream_rsync_port",
        "int",
        873,
        "The port of the region's rsync daemon (the region's [master] rsync_port), which a rack master mirrors from.",
        minimum=1,
        maximum=65535,
    ),
    Setting(
        "master",
        "sync_interval",
        "int",
        300,
        "Seconds between a rack master's syncs from the region; it keeps serving its last good mirror "
        "in between and while the region is unreachable.",
        minimum=5,
        maximum=86400,
    ),
    Setting(
        "master",
        "rack",
        "str",
        "",
        "This rack master's name, which the region records with each report it relays "
        "(`rackboot status` shows it); empty = the machine's hostname.",
        check=lambda v: _rack_name(v) if v else None,
    ),
    Setting(
        "network",
        "interface",
        "str",
        "",
        "The rack interface on which `rackboot serve` runs the netboot service (dnsmasq: TFTP of the "
        'build directory, and DHCP with dhcp = "full"); [master] address must be an IPv4 address '
        "on it. Empty = no netboot service (QEMU's user network serves TFTP itself).",
        check=lambda v: _interface(v) if v else None,
    ),
    Setting(
        "network",
        "dhcp",
        "choice",
        "none",
        "none: the site's DHCP server gives workers their address (the master serves TFTP only); "
        "full: an isolated rack, the master's dnsmasq also serves DHCP from range_start to range_end.",
        DhcpMode,
    ),
    Setting(
        "network",
        "prefix",
        "int",
        24,
        "The rack subnet's prefix length: the subnet is [master] address/prefix.",
        minimum=8,
        maximum=30,
    ),
    Setting(
        "network",
        "range_start",
        "str",
        "",
        'First address dnsmasq leases with dhcp = "full" (inside the subnet, the master outside the range).',
        check=lambda v: _ipv4(v) if v else None,
    ),
    Setting(
        "network",
        "range_end",
        "str",
        "",
        'Last address dnsmasq leases with dhcp = "full".',
        check=lambda v: _ipv4(v) if v else None,
    ),
    Setting("network", "lease_time", "int", 3600, 'Seconds a DHCP lease lasts with dhcp = "full".', minimum=120),
    Setting(
        "layout",
        "partitions",
        "layout",
        _default_layout(),
        "SD card layout: boot (a FAT type: 0b, 0c or 0e), slot a, slot b, data; size_mib in MiB or "
        '"rest"; the whole card within MBR\'s 2 TiB.',
    ),
    Setting(
        "layout",
        "repartition",
        "choice",
        "allowed",
        "Whether the updater may repartition a card whose table differs.",
        Repartition,
    ),
    Setting(
        "layout",
        "tries",
        "int",
        DEFAULT_TRIES,
        "Boots a newly installed slot gets to run rackboot-mark-good before the previous slot boots again.",
        minimum=1,
    ),
    Setting("layout", "mount", "choice", str(DEFAULT_MOUNT), "How the worker mounts its slot.", Mount),
    Setting(
        "layout",
        "persist",
        "list[str]",
        [],
        "Directories kept on the data partition and bind-mounted into every root the worker boots, "
        'across updates and slot switches, e.g. ["/etc/ssh"]; seeded from the image the first time. '
        "Absolute, none inside another, not under /proc, /sys, /dev or /run.",
        check=lambda v: persist_problem([v]),
    ),
    Setting(
        "output",
        "directory",
        "path",
        "build",
        "Where build artefacts go (dnsmasq serves it over TFTP: no double quote, '#' or '%').",
        check=_conf_directory,
    ),
    Setting("power", "driver", "choice", "none", "How `rackboot power` switches nodes.", PowerDriver),
    Setting(
        "power",
        "command",
        "str",
        "",
        'driver = "command": the shell command that switches one node, with {node} (its id) and {action} '
        "(on, off or cycle), e.g. a relay board's tool, a PoE switch's CLI or uhubctl.",
        check=lambda v: _power_command(v) if v else None,
    ),
    Setting(
        "power",
        "qmp",
        "str",
        "",
        'driver = "qemu": the QMP socket of each emulated node, with {node}, e.g. /run/rackboot/{node}.qmp.',
        check=lambda v: _qmp_template(v) if v else None,
    ),
    Setting(
        "power",
        "stagger",
        "int",
        2,
        "Seconds between two nodes switched on by one command, so a rack does not storm the master.",
        minimum=0,
        maximum=600,
    ),
)

_BY_SECTION: dict[str, dict[str, Setting]] = {}
for _s in SETTINGS:
    _BY_SECTION.setdefault(_s.section, {})[_s.key] = _s


@dataclass(frozen=True)
class Partition:
    """One entry of [layout] partitions."""

    name: str
    size_mib: int | Literal["rest"]
    type: str  # two lower-case hex digits: the MBR partition type

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size_mib": self.size_mib, "type": self.type}


# One frozen dataclass per section; its fields are the section's SETTINGS keys, in order
# (tests/unit/test_config.py checks they stay the same). Choices are their StrEnums.
@dataclass(frozen=True)
class BoardSection:
    name: BoardName
    arch: Arch


@dataclass(frozen=True)
class KernelSection:
    package: str
    path: Path | None
    cmdline: str
    root_modules: tuple[str, ...]


@dataclass(frozen=True)
class InitramfsSection:
    packages: tuple[str, ...]
    binaries: tuple[str, ...]
    modules: tuple[str, ...]
    files: Mapping[str, Path]  # target path in the initramfs -> local source; read-only
    compression: InitramfsCompression
    uboot_wrap: bool
    updater: bool
    watchdog: int


@dataclass(frozen=True)
class MasterSection:
    address: str
    port: int
    sources: tuple[str, ...]
    max_streams: int
    key: Path | None
    directory: Path
    hostname: str
    adopt: AdoptMode
    token: str
    stale: int
    rsync_port: int
    database: str
    upstream: str
    upstream_key: Path | None
    upstream_rsync_port: int
    sync_interval: int
    rack: str

    @property
    def url(self) -> str:
        """The master as workers reach it (boot scripts, the kernel command line, init.conf)."""
        return f"http://{self.address}:{self.port}"

    @property
    def public_key(self) -> Path | None:
        """The key a build gives its workers (initramfs, card): [master] key's .pub, or a rack
        master's copy of the region's ([master] upstream_key), which signs all they take."""
        if self.key is not None:
            return self.key.with_name(self.key.name + ".pub")  # signing.public_key_path
        return self.upstream_key


@dataclass(frozen=True)
class NetworkSection:
    interface: str
    dhcp: DhcpMode
    prefix: int
    range_start: str
    range_end: str
    lease_time: int


@dataclass(frozen=True)
class LayoutSection:
    partitions: tuple[Partition, ...]
    repartition: Repartition
    tries: int
    mount: Mount
    persist: tuple[str, ...]

    @property
    def boot_size_mib(self) -> int:
        """Never "rest": the layout check puts boot first and the slots after it."""
        size = self.partitions[0].size_mib
        assert isinstance(size, int)
        return size


@dataclass(frozen=True)
class OutputSection:
    directory: Path


@dataclass(frozen=True)
class PowerSection:
    driver: PowerDriver
    command: str
    qmp: str
    stagger: int


SECTIONS: dict[str, type] = {
    "board": BoardSection,
    "kernel": KernelSection,
    "initramfs": InitramfsSection,
    "master": MasterSection,
    "network": NetworkSection,
    "layout": LayoutSection,
    "output": OutputSection,
    "power": PowerSection,
}


@dataclass(frozen=True)
class Config:
    """A parsed, validated config: ``cfg.layout.tries``, ``cfg.master.port``."""

    path: Path
    board: BoardSection
    kernel: KernelSection
    initramfs: InitramfsSection
    master: MasterSection
    network: NetworkSection
    layout: LayoutSection
    output: OutputSection
    power: PowerSection

    @property
    def base(self) -> Path:
        return self.path.parent


def plain(value: Any) -> Any:
    """A section (or any config value) as JSON-able data, Paths as str: what a build step
    puts in its rebuild key."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _expect(where: str, what: str, got: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {what}, got {got!r}")


def _check_layout(where: str, value: Any) -> list[PartitionTable]:
    if not isinstance(value, list) or not value or len(value) > 4:
        raise _expect(where, "a list of 1 to 4 partition tables", value)
    out: list[PartitionTable] = []
    for i, part in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(part, dict):
            raise _expect(at, "a table with name, size_mib, type", part)
        unknown = set(part) - {"name", "size_mib", "type"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"{at}: unknown key '{key}'{_suggest(key, ['name', 'size_mib', 'type'])}")
        size = part.get("size_mib")
        if size == "rest":
            if i != len(value) - 1:
                raise ConfigError(f'{at}: size_mib "rest" is only allowed on the last partition')
        elif not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise _expect(f"{at}.size_mib", 'a positive number of MiB or "rest"', size)
        ptype = part.get("type", "0c" if i == 0 else "83")  # boot is the card's FAT32
        if not isinstance(ptype, str) or len(ptype) != 2 or any(c not in "0123456789abcdef" for c in ptype.lower()):
            raise _expect(f"{at}.type", 'a two-digit hex MBR type such as "83"', ptype)
        if ptype == "00":
            raise ConfigError(f"{at}.type: 00 marks an unused MBR entry")
        name = part.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise _expect(f"{at}.name", "a partition name ([a-z0-9][a-z0-9_-]*, at most 32)", name)
        if any(p["name"] == name for p in out):
            raise ConfigError(f"{at}.name: '{name}' appears twice")
        out.append({"name": name, "size_mib": size, "type": ptype.lower()})
    names = [p["name"] for p in out]
    for needed in ("boot", "a", "b"):
        if needed not in names:
            raise ConfigError(f"{where}: needs a partition named '{needed}' (have {', '.join(names)})")
    if names[0] != "boot":
        raise ConfigError(f"{where}: the first partition must be 'boot', the firmware reads it")
    if out[0]["type"] not in BOOT_TYPES:
        raise ConfigError(
            f"{where}[0].type: the boot partition holds the card's FAT32 filesystem, which the "
            f'firmware reads only under a FAT type ({", ".join(BOOT_TYPES)}), got "{out[0]["type"]}"'
        )
    _check_mbr_fits(where, out)
    return out


def _check_mbr_fits(where: str, parts: list[PartitionTable]) -> None:
    """The layout's end (a "rest" partition needs at least 1 MiB) within MBR's 32-bit sectors."""
    end_mib = BOOT_START_MIB + sum(1 if p["size_mib"] == "rest" else p["size_mib"] for p in parts)
    if end_mib * MIB_SECTORS > MBR_SECTORS:
        limit = MBR_SECTORS // MIB_SECTORS
        raise ConfigError(
            f"{where}: the partitions end at {end_mib} MiB, past the {limit} MiB (2 TiB) an MBR can address"
        )


# A setting's check: (where, value as given, setting, config folder) -> the checked value.
_Check = Callable[[str, Any, Setting, Path], Any]
_CHECKS: dict[str, _Check] = {}


def _check(kind: str) -> Callable[[_Check], _Check]:
    def register(fn: _Check) -> _Check:
        _CHECKS[kind] = fn
        return fn

    return register


def _checked(where: str, value: str, setting: Setting) -> str:
    problem = setting.check(value) if setting.check else None
    if problem:
        raise ConfigError(f"{where}: {(setting.shown or str)(value)[:80]!r}: {problem}")
    return value


@_check("str")
def _str(where: str, value: Any, setting: Setting, base: Path) -> str:
    if not isinstance(value, str):
        raise _expect(where, "a string", value)
    return _checked(where, value, setting)


@_check("int")
def _int(where: str, value: Any, setting: Setting, base: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _expect(where, "an integer", value)
    low, high = setting.minimum, setting.maximum
    if (low is not None and value < low) or (high is not None and value > high):
        raise _expect(where, _range(setting), value)
    return value


def _range(setting: Setting) -> str:
    if setting.maximum is None:
        return f"an integer >= {setting.minimum}"
    return f"an integer from {setting.minimum} to {setting.maximum}"


@_check("bool")
def _bool(where: str, value: Any, setting: Setting, base: Path) -> bool:
    if not isinstance(value, bool):
        raise _expect(where, "true or false", value)
    return value


@_check("path")
def _path(where: str, value: Any, setting: Setting, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise _expect(where, "a path", value)
    if problem := _path_problem(value):  # before resolve, which a NUL would stop
        raise ConfigError(f"{where}: {value[:80]!r}: {problem}")
    return _resolved(where, base / value, setting)


def _resolved(where: str, path: Path, setting: Setting) -> Path:
    """``path`` resolved and checked as a whole: the config's own folder is part of it."""
    real = path.resolve()
    text = str(real)
    problem = _path_problem(text) or (setting.check(text) if setting.check else None)
    if problem:
        raise ConfigError(f"{where}: {text[-80:]!r}: {problem}")
    return real


@_check("choice")
def _choice(where: str, value: Any, setting: Setting, base: Path) -> StrEnum:
    choices = setting.choices
    assert choices is not None, setting.name
    if not isinstance(value, str) or value not in set(choices):
        hint = _suggest(str(value), choices)
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {value!r}{hint}")
    return choices(value)


@_check("list[str]")
def _list_str(where: str, value: Any, setting: Setting, base: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _expect(where, "a list of strings", value)
    return [_checked(f"{where}[{i}]", v, setting) for i, v in enumerate(value)]


@_check("table[path]")
def _table_path(where: str, value: Any, setting: Setting, base: Path) -> dict[str, Path]:
    if not isinstance(value, dict):
        raise _expect(where, "a table of target path = source path", value)
    out: dict[str, Path] = {}
    for target, source in sorted(value.items()):
        if not target.startswith("/") or _CONTROL_RE.search(target) or ".." in target.split("/"):
            raise _expect(f'{where}."{target}"', "an absolute target path inside the initramfs (no '..')", target)
        out[target] = _path(f'{where}."{target}"', source, setting, base)
    return out


@_check("layout")
def _layout(where: str, value: Any, setting: Setting, base: Path) -> list[PartitionTable]:
    return _check_layout(where, value)


def _default(where: str, setting: Setting, base: Path) -> Any:
    value = setting.default
    if setting.kind == "path" and value is not None:
        return _resolved(where, base / value, setting)
    if setting.choices is not None:
        return setting.choices(value)
    return value


def _frozen(kind: str, value: Any) -> Any:
    """A checked value as the section dataclass holds it: lists as tuples, tables read-only
    (new containers, so the defaults in SETTINGS are never shared)."""
    if kind == "list[str]":
        return tuple(value)
    if kind == "table[path]":
        return MappingProxyType(dict(value))
    if kind == "layout":
        return tuple(Partition(name=p["name"], size_mib=p["size_mib"], type=p["type"]) for p in value)
    return value


def parse(text: str, path: Path) -> Config:
    """Validate a config document; every error is one ConfigError line naming file and key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = path.parent
    sections: dict[str, Any] = {}
    for section, settings in _BY_SECTION.items():
        given = doc.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"{path}: [{section}]: expected a table, got {given!r}")
        for key in given:
            if key not in settings:
                raise ConfigError(f"{path}: [{section}] {key}: unknown key{_suggest(key, settings)}")
        values = {}
        for key, setting in settings.items():
            where = f"{path}: {setting.name}"
            value = (
                _CHECKS[setting.kind](where, given[key], setting, base)
                if key in given
                else _default(where, setting, base)
            )
            values[key] = _frozen(setting.kind, value)
        sections[section] = SECTIONS[section](**values)
    for section in doc:
        if section not in _BY_SECTION:
            raise ConfigError(f"{path}: [{section}]: unknown section{_suggest(section, _BY_SECTION)}")
    _check_network(path, sections["master"], sections["network"])
    _check_key(path, sections["master"])
    _check_sources(path, sections["master"])
    problem = persist_problem(sections["layout"].persist)  # each path was checked alone: now together
    if problem:
        raise ConfigError(f"{path}: [layout] persist: {problem}")
    if sections["layout"].persist and not any(p.name == "data" for p in sections["layout"].partitions):
        raise ConfigError(
            f"{path}: [layout] persist: persisted paths live on a partition named 'data', and the layout has none"
        )
    return Config(path=path, **sections)


def _check_key(path: Path, master: MasterSection) -> None:
    """rackboot serve hands out the master's tree: the private key must not be in it (with it
    anyone could sign hooks that run as root on every worker). Both are resolved paths.
    A rack master signs nothing: it holds the region's public key, never a private one."""
    if master.upstream and master.key is not None:
        raise ConfigError(
            f"{path}: [master] key: a rack master ([master] upstream set) must hold no private key; "
            "unset [master] key and give the region's public key as [master] upstream_key"
        )
    if master.upstream and master.upstream_key is None:
        raise ConfigError(
            f"{path}: [master] upstream_key: a rack master needs the region's public key (its [master] key's .pub) "
            "to check what it mirrors"
        )
    if master.upstream_key is not None and master.upstream_key.name.endswith(".key"):
        raise ConfigError(
            f"{path}: [master] upstream_key: {master.upstream_key} looks like a private key; "
            "a rack master takes the region's public key (.pub)"
        )
    if master.key is not None and master.key.is_relative_to(master.directory):
        raise ConfigError(
            f"{path}: [master] key: {master.key} is inside [master] directory {master.directory}, "
            "which rackboot serve hands out; keep the private key outside it"
        )


def _check_sources(path: Path, master: MasterSection) -> None:
    """[master] sources as the worker reads rackboot.sources (each URL was checked alone), and
    none of them the master itself."""
    try:
        parse_list(",".join(master.sources), where=f"{path}: [master] sources")
    except UpdaterError as e:
        raise ConfigError(str(e)) from None
    if master.url in master.sources or master.url + "/" in master.sources:
        raise ConfigError(f"{path}: [master] sources: {master.url} is the master, asked first already")


def _check_network(path: Path, master: MasterSection, network: NetworkSection) -> None:
    """The netboot service's addresses agree: the master on the rack subnet, the DHCP range
    inside it and the master outside the range (dnsmasq would lease the master's own address)."""
    if not network.interface:
        if network.dhcp is DhcpMode.FULL:
            raise ConfigError(f'{path}: [network] dhcp: "full" needs [network] interface, the rack interface')
        return
    if _ipv4(master.address):
        raise ConfigError(
            f"{path}: [master] address: {master.address!r}: the netboot service needs an IPv4 address "
            "(dnsmasq listens on it, U-Boot's serverip is one)"
        )
    subnet = ipaddress.IPv4Interface(f"{master.address}/{network.prefix}").network
    if ipaddress.IPv4Address(master.address) in (subnet.network_address, subnet.broadcast_address):
        raise ConfigError(f"{path}: [master] address: {master.address} is not a host address of {subnet}")
    if network.dhcp is not DhcpMode.FULL:
        return
    ends = {}
    for key in ("range_start", "range_end"):
        value = getattr(network, key)
        if not value:
            raise ConfigError(f'{path}: [network] {key}: dhcp = "full" needs the range of addresses to lease')
        address = ipaddress.IPv4Address(value)
        if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
            raise ConfigError(
                f"{path}: [network] {key}: {value} is outside the rack subnet {subnet} "
                f"([master] address {master.address}, [network] prefix {network.prefix})"
            )
        ends[key] = address
    first, last = ends["range_start"], ends["range_end"]
    if first > last:
        raise ConfigError(f"{path}: [network] range_start: {first} comes after range_end {last}")
    if first <= ipaddress.IPv4Address(master.address) <= last:
        raise ConfigError(
            f"{path}: [network] range_start..range_end: {first}..{last} contains [master] address "
            f"{master.address}; keep the master's address outside the leases"
        )


def source_date_epoch() -> int:
    """The one clock every artefact and publication is stamped with (0 unless set)."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "0")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"SOURCE_DATE_EPOCH must be an integer, got {raw!r}") from None


def load(path: Path | str) -> Config:
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    return parse(text, path)


def _toml(value: Any) -> str:
    """A default as TOML a user can paste after `key = `."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _limits(s: Setting) -> str:
    if s.minimum is None:
        return ""
    return f" At least {s.minimum}." if s.maximum is None else f" {s.minimum} to {s.maximum}."


def reference() -> str:
    """The settings table in Markdown, generated from SETTINGS for the README."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = _toml(s.default)
        shown = f"`{default}`" if s.default is not None else default
        choices = f" One of: {', '.join(s.choices)}." if s.choices else ""
        rows.append(f"| `{s.name}` | {shown} | {s.help}{_limits(s)}{choices} |")
    return "\n".join(rows)
