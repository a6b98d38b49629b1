"""rackboot.toml: every setting is one declarative record.

The records in SETTINGS drive parsing, validation, defaults, the error messages and
the generated reference in the README (``rackboot config --reference``), the way
mkosi keeps one table for all of them.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

from .errors import ConfigError

BOARDS = ("qemu-virt", "rpi3", "rpi4")
ARCHES = ("arm64", "armhf")
COMPRESSIONS = ("gzip", "xz", "zstd", "none")
MOUNT_MODES = ("rw", "ro", "ro+overlay:tmpfs", "ro+overlay:data")


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    kind: str  # str | int | bool | path | list[str] | list[path] | table[path] | choice | layout
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    required: bool = False

    @property
    def name(self) -> str:
        return f"[{self.section}] {self.key}"


def _default_layout() -> list[dict]:
    return [
        {"name": "boot", "size_mib": 128, "type": "0c"},
        {"name": "a", "size_mib": 384, "type": "83"},
        {"name": "b", "size_mib": 384, "type": "83"},
        {"name": "data", "size_mib": "rest", "type": "83"},
    ]


SETTINGS: tuple[Setting, ...] = (
    Setting("board", "name", "choice", "qemu-virt", "Board profile.", BOARDS),
    Setting("board", "arch", "choice", "arm64", "Debian architecture of the worker.", ARCHES),
    Setting("kernel", "package", "str", "", "Debian kernel package (metapackages are followed), "
            "e.g. linux-image-arm64; empty = the board profile's default."),
    Setting("kernel", "path", "path", None, "A local kernel tree (an unpacked kernel package: "
            "boot/vmlinuz-*, lib/modules/*) used instead of the package."),
    Setting("kernel", "cmdline", "str", "", "Extra kernel command line, after the board's console."),
    Setting("kernel", "root_modules", "list[str]", [],
            "Modules (with their dependencies) that publish puts into each root filesystem, indexed by depmod; "
            "empty = the kernel's whole module tree."),
    Setting("initramfs", "packages", "list[str]", ["busybox-static"],
            "Debian packages unpacked into the sysroot that binaries are taken from."),
    Setting("initramfs", "binaries", "list[str]", ["/bin/busybox"],
            "Binaries copied with their ELF closure (interpreter and libraries)."),
    Setting("initramfs", "modules", "list[str]", [],
            "Kernel modules loaded at boot, with their dependencies, in dependency order."),
    Setting("initramfs", "files", "table[path]", {},
            "Extra files: target path = local source path."),
    Setting("initramfs", "compression", "choice", "gzip", "Initramfs compression.", COMPRESSIONS),
    Setting("initramfs", "uboot_wrap", "bool", False,
            "Also wrap the initramfs as a U-Boot legacy ramdisk image."),
    Setting("initramfs", "updater", "bool", True,
            "Carry the updater and the target Python; off = probe only (network up, power off)."),
    Setting("initramfs", "watchdog", "int", 120,
            "Seconds the updater may go without progress before it stops feeding the board's "
            "hardware watchdog, which then resets the board; 0 = leave the watchdog alone."),
    Setting("master", "address", "str", "10.0.2.2", "The master's address as workers reach it."),
    Setting("master", "port", "int", 8080, "The master's HTTP port."),
    Setting("master", "key", "path", None,
            "The master's Ed25519 private key (rackboot keygen makes it): publish and plan sign with it, "
            "and its .pub goes into the initramfs and the card, which then take only signed documents. "
            "Unset = an unsigned rack."),
    Setting("master", "directory", "path", "master", "The master's tree (published images, plans, reports)."),
    Setting("layout", "partitions", "layout", _default_layout(),
            "SD card layout: boot, slot a, slot b, data; size_mib in MiB or \"rest\"."),
    Setting("layout", "repartition", "choice", "allowed",
            "Whether the updater may repartition a card whose table differs.", ("allowed", "never")),
    Setting("layout", "tries", "int", 3,
            "Boots a newly installed slot gets to run rackboot-mark-good before the previous slot "
            "boots again."),
    Setting("layout", "mount", "choice", "ro+overlay:tmpfs", "How the worker mounts its slot.",
            MOUNT_MODES),
    Setting("output", "directory", "path", "build", "Where build artefacts go."),
)

_BY_SECTION: dict[str, dict[str, Setting]] = {}
for _s in SETTINGS:
    _BY_SECTION.setdefault(_s.section, {})[_s.key] = _s


@dataclass(frozen=True)
class Config:
    """A parsed, validated config: ``cfg.get("board", "arch")`` or ``cfg.board["arch"]``."""

    path: Path
    values: MappingProxyType = field(repr=False)

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def section(self, section: str) -> dict:
        """The slice of config one build step reads: part of its rebuild key."""
        return dict(self.values[section])

    def __getattr__(self, section: str) -> MappingProxyType:
        try:
            return self.values[section]
        except KeyError:
            raise AttributeError(section) from None

    @property
    def base(self) -> Path:
        return self.path.parent


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _expect(where: str, what: str, got: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {what}, got {got!r}")


def _check_layout(where: str, value: Any) -> list[dict]:
    if not isinstance(value, list) or not value or len(value) > 4:
        raise _expect(where, "a list of 1 to 4 partition tables", value)
    out = []
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
                raise ConfigError(f"{at}: size_mib \"rest\" is only allowed on the last partition")
        elif not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise _expect(f"{at}.size_mib", "a positive number of MiB or \"rest\"", size)
        ptype = part.get("type", "83")
        if not isinstance(ptype, str) or len(ptype) != 2 or any(c not in "0123456789abcdef" for c in ptype.lower()):
            raise _expect(f"{at}.type", "a two-digit hex MBR type such as \"83\"", ptype)
        name = part.get("name")
        if not isinstance(name, str) or not name:
            raise _expect(f"{at}.name", "a partition name", name)
        out.append({"name": name, "size_mib": size, "type": ptype.lower()})
    names = [p["name"] for p in out]
    for needed in ("boot", "a", "b"):
        if needed not in names:
            raise ConfigError(f"{where}: needs a partition named '{needed}' (have {', '.join(names)})")
    if names[0] != "boot":
        raise ConfigError(f"{where}: the first partition must be 'boot', the firmware reads it")
    return out


_CHECKS: dict[str, Callable[[str, Any, Setting, Path], Any]] = {}


def _check(kind: str):
    def register(fn):
        _CHECKS[kind] = fn
        return fn
    return register


@_check("str")
def _str(where, value, setting, base):
    if not isinstance(value, str):
        raise _expect(where, "a string", value)
    return value


@_check("int")
def _int(where, value, setting, base):
    if not isinstance(value, int) or isinstance(value, bool):
        raise _expect(where, "an integer", value)
    return value


@_check("bool")
def _bool(where, value, setting, base):
    if not isinstance(value, bool):
        raise _expect(where, "true or false", value)
    return value


@_check("path")
def _path(where, value, setting, base):
    if not isinstance(value, str) or not value:
        raise _expect(where, "a path", value)
    return (base / value).resolve()


@_check("choice")
def _choice(where, value, setting, base):
    if value not in setting.choices:
        hint = _suggest(str(value), setting.choices)
        raise ConfigError(f"{where}: expected one of {', '.join(setting.choices)}, got {value!r}{hint}")
    return value


@_check("list[str]")
def _list_str(where, value, setting, base):
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _expect(where, "a list of strings", value)
    return list(value)


@_check("table[path]")
def _table_path(where, value, setting, base):
    if not isinstance(value, dict):
        raise _expect(where, "a table of target path = source path", value)
    out = {}
    for target, source in sorted(value.items()):
        if not target.startswith("/"):
            raise _expect(f"{where}.\"{target}\"", "an absolute target path inside the initramfs", target)
        out[target] = _path(f"{where}.\"{target}\"", source, setting, base)
    return out


@_check("layout")
def _layout(where, value, setting, base):
    return _check_layout(where, value)


def _default(setting: Setting, base: Path) -> Any:
    value = setting.default
    if setting.kind == "path" and value is not None:
        return (base / value).resolve()
    if isinstance(value, (list, dict)):
        import copy
        return copy.deepcopy(value)
    return value


def parse(text: str, path: Path) -> Config:
    """Validate a config document; every error is one ConfigError line naming file and key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = path.parent
    values: dict[str, dict] = {}
    for section, settings in _BY_SECTION.items():
        given = doc.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"{path}: [{section}]: expected a table, got {given!r}")
        for key in given:
            if key not in settings:
                raise ConfigError(f"{path}: [{section}] {key}: unknown key{_suggest(key, settings)}")
        values[section] = {}
        for key, setting in settings.items():
            if key in given:
                values[section][key] = _CHECKS[setting.kind](f"{path}: {setting.name}", given[key], setting, base)
            else:
                values[section][key] = _default(setting, base)
    for section in doc:
        if section not in _BY_SECTION:
            raise ConfigError(f"{path}: [{section}]: unknown section{_suggest(section, _BY_SECTION)}")
    return Config(path=path, values=MappingProxyType({k: MappingProxyType(v) for k, v in values.items()}))


def load(path: Path | str) -> Config:
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    return parse(text, path)


def reference() -> str:
    """The settings table in Markdown, generated from SETTINGS for the README."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = s.default
        if s.kind == "layout":
            default = "boot 128, a 384, b 384, data rest"
        choices = f" One of: {', '.join(s.choices)}." if s.choices else ""
        rows.append(f"| `{s.name}` | `{default!r}` | {s.help}{choices} |")
    return "\n".join(rows)
