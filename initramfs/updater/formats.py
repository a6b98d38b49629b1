"""The documents that cross the master/worker boundary (see notes/formats.md), v1.

Each document is a frozen dataclass with ``from_dict``/``to_dict``; ``parse_*`` take
untrusted bytes and raise only UpdaterError ("<document>: <field>: <problem>"), and
``dump`` writes the canonical bytes that get signed: sorted keys, compact separators,
a trailing newline. Unknown keys are ignored so that later minor additions (block
index, signatures) do not break older workers; incompatible changes bump "format".
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from .errors import UpdaterError

FORMAT = 1
MAX_DOCUMENT = 1 << 20  # bytes; plans and manifests are tiny, anything bigger is hostile


# The fixed choices, each defined once: the builder, the master and the updater share them.
# StrEnum members are their strings, so documents and the decision file read the same.


class StreamCompression(StrEnum):
    """How an image's stream is compressed on the master."""

    GZIP = "gzip"
    NONE = "none"


class Method(StrEnum):
    """How a plan's image reaches the slot: the image's blocks (the stream) or rsync of its
    files into a freshly formatted slot, checked against the signed file manifest."""

    IMAGE = "image"
    RSYNC = "rsync"


class Repartition(StrEnum):
    ALLOWED = "allowed"
    NEVER = "never"


class Mount(StrEnum):
    """How /init mounts the slot it boots."""

    RW = "rw"
    RO = "ro"
    OVERLAY_TMPFS = "ro+overlay:tmpfs"
    OVERLAY_DATA = "ro+overlay:data"


class SlotStatus(StrEnum):
    GOOD = "good"
    TRIAL = "trial"  # installed, not yet confirmed by the system it booted
    FAILED = "failed"  # never confirmed itself within its tries
    BAD = "bad"  # its install failed
    EMPTY = "empty"
    WRITING = "writing"


class Phase(StrEnum):
    """What a report is about."""

    PLAN = "plan"
    LAYOUT = "layout"
    DOWNLOAD = "download"
    VERIFY = "verify"
    COMMIT = "commit"
    CONFIRM = "confirm"
    BOOT = "boot"
    HOOK = "hook"
    ERROR = "error"
    WAIT = "wait"  # a busy master kept a stream waiting: seconds is how long, in all
    BOOT_FILES = "boot-files"  # the card's boot area was checked against the plan's boot manifest (bootfiles.py)


class Action(StrEnum):
    """Why the decision boots the slot it names."""

    INSTALLED = "installed"
    UP_TO_DATE = "up-to-date"
    OFFLINE = "offline"
    FALLBACK = "fallback"
    REFUSED = "refused"
    POWEROFF = "poweroff"  # nothing boots: /init powers the worker off, ``error`` says why (no card)


class PlanKind(StrEnum):
    """Whose plan a worker took: its own (plans/<node>.json) or the default one. Each has its
    own serial sequence on the master."""

    OWN = "own"
    DEFAULT = "default"


DEFAULT_PLAN = "default"  # the node name of the plan every node without one of its own gets

REPARTITION = tuple(Repartition)
MOUNTS = tuple(Mount)
DEFAULT_MOUNT = Mount.OVERLAY_TMPFS  # how a slot mounts unless the plan (offline: the card's config) says otherwise
SLOT_STATES = tuple(SlotStatus)
BOOTABLE = (SlotStatus.GOOD, SlotStatus.TRIAL)
PHASES = tuple(Phase)


class HookName(StrEnum):
    """Signed scripts a manifest may carry: before a byte of the slot is written, after
    the slot verified but before it is committed, and (first-boot) chrooted into the
    booted root once per node and installed version (node.py)."""

    PRE_INSTALL = "pre-install"
    POST_INSTALL = "post-install"
    FIRST_BOOT = "first-boot"


HOOKS = tuple(HookName)
MAX_HOOK_BYTES = 256 << 10
MAX_HOOK_TIMEOUT = 3600  # seconds
HOOK_TIMEOUT = 120  # seconds a hook gets unless its publisher says otherwise
DEFAULT_TRIES = 3  # boots a new slot gets to confirm itself (rackboot-mark-good) before it is given up
MAX_REPORT_OUTPUT = 4000  # characters of a hook's output a report carries (its tail)
SLOTS = ("a", "b")
REST = "rest"
MIN_START_MIB = 4  # slot-state copies at 1 MiB and 2 MiB (64 KiB each), the confirmation sector at 3 MiB
EXT_MAGIC = b"\x53\xef"  # s_magic of an ext2/3/4 superblock, little-endian 0xef53
EXT_MAGIC_OFFSET = 1024 + 0x38  # from the start of the filesystem

IMAGE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MASTER_PATH_RE = re.compile(r"(/[A-Za-z0-9][A-Za-z0-9._-]*)+")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_HEX8_RE = re.compile(r"[0-9a-f]{8}")
_TYPE_RE = re.compile(r"[0-9a-f]{2}")
_FSTYPE_RE = re.compile(r"[a-z0-9]{1,16}")
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# base64 of 32 bytes: 43 characters, the last of which carries 4 bits and 2 zero bits, and "="
_PUBLIC_KEY_RE = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")
_MODULE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")  # an rsyncd.conf module name: no slash, bracket or space
MAX_FILE_LIST = 64 << 20  # bytes of a file manifest (filemanifest.MAX_BYTES)
# A node's hostname: one RFC 1123 label, lowercase (systemd wants a single label in /etc/hostname)
HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# A persisted path's parts: no spaces or quotes, since /init splits the list on spaces
_PERSIST_PART_RE = re.compile(r"[A-Za-z0-9_@+-][A-Za-z0-9._@+-]{0,127}")
MAX_PERSIST = 32
# C0 controls, DEL and C1 controls: text from a worker that would act on a terminal (ESC
# sequences, a CR that overwrites a log line). A hook's output keeps its tabs and newlines.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LINES_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Mounted by /init itself (kernel filesystems, the tmpfs /run moved in): never a persisted path
PERSIST_RESERVED = ("/proc", "/sys", "/dev", "/run")

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


# --- field readers: every check names the document and the field -------------------


class _Fields:
    """A JSON object being validated; each getter raises UpdaterError naming doc.key."""

    def __init__(self, doc: str, obj: Any):
        if not isinstance(obj, dict):
            raise UpdaterError(f"{doc}: expected a JSON object, got {_kind(obj)}")
        self.doc = doc
        self.obj = obj

    def fail(self, key: str, problem: str) -> UpdaterError:
        return UpdaterError(f"{self.doc}: {key}: {problem}")

    def raw(self, key: str, *, optional: bool = False) -> Any:
        if key not in self.obj:
            if optional:
                return None
            raise self.fail(key, "missing")
        return self.obj[key]

    def integer(self, key: str, *, minimum: int = 0) -> int:
        return self._integer(key, self.raw(key), minimum)

    def optional_integer(self, key: str, *, minimum: int = 0) -> int | None:
        value = self.raw(key, optional=True)
        return None if value is None else self._integer(key, value, minimum)

    def _integer(self, key: str, value: Any, minimum: int) -> int:
        if not _is_int(value):
            raise self.fail(key, f"expected an integer, got {_kind(value)}")
        if value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value}")
        return value

    def number(self, key: str) -> float:
        return self._number(key, self.raw(key))

    def optional_number(self, key: str) -> float | None:
        value = self.raw(key, optional=True)
        return None if value is None else self._number(key, value)

    def _number(self, key: str, value: Any) -> float:
        finite = _is_int(value) or (isinstance(value, float) and abs(value) < float("inf"))
        if not finite or value < 0:
            raise self.fail(key, f"expected a finite number >= 0, got {_kind(value)}")
        return float(value)

    def text(self, key: str, pattern: re.Pattern[str] | None = None, *, what: str = "") -> str:
        return self._text(key, self.raw(key), pattern, what)

    def optional_text(self, key: str, pattern: re.Pattern[str] | None = None, *, what: str = "") -> str | None:
        value = self.raw(key, optional=True)
        return None if value is None else self._text(key, value, pattern, what)

    def _text(self, key: str, value: Any, pattern: re.Pattern[str] | None, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_kind(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(key, f"{value[:80]!r} is not {what or 'valid'}")
        return value

    def choice(self, key: str, choices: type[E]) -> E:
        value = self.raw(key)
        if not isinstance(value, str) or value not in set(choices):
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {_short(value)}")
        return choices(value)

    def flag(self, key: str, *, default: bool = False) -> bool:
        value = self.obj.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_short(value)}")
        return value

    def format(self) -> int:
        value = self.raw("format")
        if not _is_int(value) or value != FORMAT:
            raise self.fail("format", f"unsupported format {_short(value)} (this updater reads {FORMAT})")
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return repr(value)[:80]
    return _kind(value)


def load_json(doc: str, data: bytes | str) -> Any:
    """Untrusted bytes -> JSON value; any failure is an UpdaterError naming `doc`."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, (bytes, bytearray)):
        raise UpdaterError(f"{doc}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_DOCUMENT:
        raise UpdaterError(f"{doc}: {len(data)} bytes is larger than the {MAX_DOCUMENT} allowed")
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except UpdaterError:
        raise
    except (ValueError, RecursionError, UnicodeError) as e:
        raise UpdaterError(f"{doc}: not valid JSON: {str(e).splitlines()[0][:120]}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def dump(doc: Any) -> bytes:
    """Canonical bytes of a document (or a plain JSON value): what gets signed."""
    obj = doc.to_dict() if hasattr(doc, "to_dict") else doc
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _parser(from_dict: Callable[[Any], T], doc: str) -> Callable[[bytes | str], T]:
    def parse(data: bytes | str) -> T:
        return from_dict(load_json(doc, data))

    parse.__name__ = f"parse_{doc.replace(' ', '_')}"
    parse.__doc__ = f"Untrusted bytes -> validated {doc}; only UpdaterError escapes."
    return parse


# --- Manifest ------------------------------------------------------------------------


@dataclass(frozen=True)
class Hook:
    """A script beside the manifest, pinned by size and sha256: the manifest's signature
    covers it, so a hook runs only as the master signed it."""

    name: HookName
    file: str
    size: int
    sha256: str
    timeout: int  # seconds before it is killed

    @classmethod
    def from_dict(cls, obj: Any, where: str = "manifest: hooks") -> Hook:
        f = _Fields(where, obj)
        size = f.integer("size", minimum=1)
        if size > MAX_HOOK_BYTES:
            raise f.fail("size", f"{size} bytes is larger than the {MAX_HOOK_BYTES} a hook may have")
        timeout = f.integer("timeout", minimum=1)
        if timeout > MAX_HOOK_TIMEOUT:
            raise f.fail("timeout", f"{timeout} s is longer than the {MAX_HOOK_TIMEOUT} s allowed")
        return cls(
            name=f.choice("name", HookName),
            file=f.text("file", _FILE_RE, what="a plain file name"),
            size=size,
            sha256=f.text("sha256", _HEX64_RE, what="64 lowercase hex digits"),
            timeout=timeout,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "size": self.size, "sha256": self.sha256, "timeout": self.timeout}


def persist_problem(paths: Any) -> str | None:
    """What is wrong with a list of persisted paths (config [layout] persist, plan
    "persist"), or None: each an absolute, normalised directory path inside the root, not
    / nor under a filesystem /init mounts itself, none inside another."""
    if not isinstance(paths, (list, tuple)) or len(paths) > MAX_PERSIST:
        return f"expected a list of at most {MAX_PERSIST} absolute paths, got {_short(paths)}"
    for path in paths:
        if not isinstance(path, str):
            return f"expected absolute paths, got {_short(path)}"
        parts = path.split("/")[1:]
        if not path.startswith("/") or path == "/":
            return f"{path[:80]!r} is not an absolute path below / (e.g. /etc/ssh)"
        if any(p in (".", "..") for p in parts):
            return f"{path[:80]!r} leaves the root or is not normalised ('.' and '..' are not allowed)"
        if not all(_PERSIST_PART_RE.fullmatch(p) for p in parts):
            return f"{path[:80]!r} is not a plain path (letters, digits, . _ @ + -, one '/' between parts)"
        for reserved in PERSIST_RESERVED:
            if path == reserved or path.startswith(reserved + "/"):
                return f"{path[:80]!r} is under {reserved}, which the booted system mounts itself"
    ordered = sorted(paths)
    for i, path in enumerate(ordered):
        for other in ordered[i + 1 :]:
            if other == path or other.startswith(path + "/"):
                return f"{other[:80]!r} overlaps {path[:80]!r}: one persisted path inside another"
    return None


def beside(manifest_path: str, file: str) -> str:
    """The master's path of ``file`` in the manifest's directory (streams, hooks)."""
    return manifest_path.rsplit("/", 1)[0] + "/" + file


def _hooks(f: _Fields) -> tuple[Hook, ...]:
    items = f.raw("hooks", optional=True)
    if items is None:
        return ()
    if not isinstance(items, list) or len(items) > len(HOOKS):
        raise f.fail("hooks", f"expected a list of at most {len(HOOKS)} hooks, got {_short(items)}")
    hooks = tuple(Hook.from_dict(item, f"manifest: hooks[{i}]") for i, item in enumerate(items))
    names = [h.name for h in hooks]
    if len(set(names)) != len(names):
        raise f.fail("hooks", "each hook may appear once")
    if {"manifest.json", "manifest.json.sig"} & {h.file for h in hooks}:
        raise f.fail("hooks", "a hook cannot be the manifest")
    return hooks


@dataclass(frozen=True)
class FileList:
    """The version's file manifest (filemanifest.py) beside the manifest, pinned by size
    and sha256: what an rsync install is checked against. ``module``: the master's rsync
    module that serves the same tree."""

    file: str
    size: int
    sha256: str
    module: str

    @classmethod
    def from_dict(cls, obj: Any) -> FileList:
        f = _Fields("manifest: files", obj)
        size = f.integer("size", minimum=1)
        if size > MAX_FILE_LIST:
            raise f.fail("size", f"{size} bytes is larger than the {MAX_FILE_LIST} a file manifest may have")
        file = f.text("file", _FILE_RE, what="a plain file name")
        if file in ("manifest.json", "manifest.json.sig"):
            raise f.fail("file", "the file manifest cannot be the manifest")
        return cls(
            file=file,
            size=size,
            sha256=f.text("sha256", _HEX64_RE, what="64 lowercase hex digits"),
            module=f.text("module", _MODULE_RE, what="an rsync module name"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "size": self.size, "sha256": self.sha256, "module": self.module}


@dataclass(frozen=True)
class BlockDelta:
    """The block index and pack beside the stream (delta.py reads them): the signed manifest
    pins the index, the index pins every block of the pack. Under the manifest's ``delta``
    key (rev5): a rev1 index, each block deflated alone. Under ``block_delta`` (rev6): a rev2
    index whose blocks are deflated with the ``window`` bytes before them as dictionary, and
    ``plain_sha256``, the sha256 of the inflated index, which an index rebuilt from a diff
    must match. Two keys, so that an updater that reads only rev1 indexes never sees a rev2
    one: it takes the stream."""

    index: str
    index_size: int
    index_sha256: str
    pack: str
    pack_size: int
    block_size: int
    window: int = 0
    plain_sha256: str | None = None

    @classmethod
    def from_dict(cls, obj: Any, *, key: str = "delta") -> BlockDelta:
        f = _Fields(f"manifest: {key}", obj)
        block_size = f.integer("block_size", minimum=512)
        if block_size & (block_size - 1) or block_size > 32768:
            raise f.fail("block_size", f"{block_size} is not a power of two in 512..32768")
        windowed = key == "block_delta"
        return cls(
            index=f.text("index", _FILE_RE, what="a plain file name"),
            index_size=f.integer("index_size", minimum=1),
            index_sha256=f.text("index_sha256", _HEX64_RE, what="64 lowercase hex digits"),
            pack=f.text("pack", _FILE_RE, what="a plain file name"),
            pack_size=f.integer("pack_size"),
            block_size=block_size,
            window=_window(f) if windowed else 0,
            plain_sha256=f.text("plain_sha256", _HEX64_RE, what="64 lowercase hex digits") if windowed else None,
        )

    @property
    def key(self) -> str:
        """The manifest key it goes under."""
        return "block_delta" if self.window else "delta"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "index_size": self.index_size,
            "index_sha256": self.index_sha256,
            "pack": self.pack,
            "pack_size": self.pack_size,
            "block_size": self.block_size,
            **({"window": self.window, "plain_sha256": self.plain_sha256} if self.window else {}),
        }


@dataclass(frozen=True)
class Manifest:
    image: str
    version: int
    size: int
    sha256: str
    crc32: str
    stream: str
    stream_size: int
    stream_sha256: str
    compression: StreamCompression = StreamCompression.GZIP
    label: str = ""
    created: int = 0
    fstype: str = "ext4"
    kernel_release: str | None = None
    hooks: tuple[Hook, ...] = ()
    files: FileList | None = None  # rsync mode's signed file list; publish_image has none
    delta: BlockDelta | None = None  # the block index and pack for delta installs (rev5; rev6: block_delta)
    format: int = FORMAT

    @classmethod
    def from_dict(cls, obj: Any) -> Manifest:
        f = _Fields("manifest", obj)
        return cls(
            format=f.format(),
            image=f.text("image", IMAGE_RE, what="an image name ([a-z0-9][a-z0-9._-]*)"),
            version=f.integer("version", minimum=1),
            label=f.text("label"),
            created=f.integer("created"),
            fstype=f.text("fstype", _FSTYPE_RE, what="a filesystem type"),
            size=f.integer("size", minimum=1),
            sha256=f.text("sha256", _HEX64_RE, what="64 lowercase hex digits"),
            crc32=f.text("crc32", _HEX8_RE, what="8 lowercase hex digits"),
            compression=f.choice("compression", StreamCompression),
            stream=f.text("stream", _FILE_RE, what="a plain file name"),
            stream_size=f.integer("stream_size", minimum=1),
            stream_sha256=f.text("stream_sha256", _HEX64_RE, what="64 lowercase hex digits"),
            kernel_release=f.optional_text("kernel_release"),
            hooks=_hooks(f),
            files=None if f.raw("files", optional=True) is None else FileList.from_dict(f.raw("files")),
            delta=_block_delta(f),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "image": self.image,
            "version": self.version,
            "label": self.label,
            "created": self.created,
            "fstype": self.fstype,
            "size": self.size,
            "sha256": self.sha256,
            "crc32": self.crc32,
            "compression": self.compression,
            "stream": self.stream,
            "stream_size": self.stream_size,
            "stream_sha256": self.stream_sha256,
            "kernel_release": self.kernel_release,
            **({"hooks": [h.to_dict() for h in self.hooks]} if self.hooks else {}),
            **({"files": self.files.to_dict()} if self.files else {}),
            **({self.delta.key: self.delta.to_dict()} if self.delta else {}),
        }

    def hook(self, name: str) -> Hook | None:
        return next((h for h in self.hooks if h.name == name), None)

    def stream_path(self, manifest_path: str) -> str:
        """The stream's path on the master, beside the manifest."""
        return beside(manifest_path, self.stream)


def _window(f: _Fields) -> int:
    window = f.integer("window", minimum=1)
    if window > 32768:
        raise f.fail("window", f"must be <= 32768 (deflate's window), got {window}")
    return window


def _block_delta(f: _Fields) -> BlockDelta | None:
    """``block_delta`` (a rev2 index) when the manifest has one, else ``delta`` (rev1), else None."""
    for key in ("block_delta", "delta"):
        if f.raw(key, optional=True) is not None:
            return BlockDelta.from_dict(f.raw(key), key=key)
    return None


# --- latest.json -------------------------------------------------------------------------


@dataclass(frozen=True)
class Latest:
    image: str
    version: int
    manifest: str
    format: int = FORMAT

    @classmethod
    def from_dict(cls, obj: Any) -> Latest:
        f = _Fields("latest", obj)
        return cls(
            format=f.format(),
            image=f.text("image", IMAGE_RE, what="an image name"),
            version=f.integer("version", minimum=1),
            manifest=f.text("manifest", _MASTER_PATH_RE, what="an absolute path on the master"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "image": self.image, "version": self.version, "manifest": self.manifest}


# --- Plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    name: str
    start_mib: int
    size_mib: int | str  # MiB, or REST for "to the end of the card" (last only)
    type: str  # MBR type, two lowercase hex digits

    @property
    def is_rest(self) -> bool:
        return self.size_mib == REST

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "start_mib": self.start_mib, "size_mib": self.size_mib, "type": self.type}


@dataclass(frozen=True)
class Layout:
    partitions: tuple[Partition, ...]
    repartition: Repartition = Repartition.ALLOWED

    @classmethod
    def from_dict(cls, obj: Any) -> Layout:
        f = _Fields("plan: layout", obj)
        items = f.raw("partitions")
        if not isinstance(items, list) or not 1 <= len(items) <= 4:
            raise f.fail("partitions", "expected a list of 1 to 4 MBR primaries")
        parts: list[Partition] = []
        start = 0  # where the previous partition ends; the first names its start
        for i, item in enumerate(items):
            p = _Fields(f"plan: layout.partitions[{i}]", item)
            name = p.text("name", NAME_RE, what="a partition name")
            if i == 0:
                start = p.integer("start_mib", minimum=MIN_START_MIB)
            else:
                given = p.optional_integer("start_mib", minimum=1)
                if given is not None and given != start:
                    raise p.fail("start_mib", f"{given} leaves a gap or overlap (previous ends at {start})")
            size = p.raw("size_mib")
            if size == REST:
                if i != len(items) - 1:
                    raise p.fail("size_mib", '"rest" is only allowed for the last partition')
            elif not _is_int(size) or size < 1:
                raise p.fail("size_mib", f'expected a positive integer or "rest", got {_short(size)}')
            ptype = p.text("type", _TYPE_RE, what="two lowercase hex digits")
            if ptype == "00":
                raise p.fail("type", "00 marks an unused entry")
            if any(q.name == name for q in parts):
                raise p.fail("name", f"{name!r} appears twice")
            parts.append(Partition(name, start, size, ptype))
            if size != REST:  # "rest" is last: nothing starts after it
                start += size
        names = {q.name for q in parts}
        if not set(SLOTS) <= names:
            raise f.fail("partitions", "must include the slots 'a' and 'b'")
        return cls(partitions=tuple(parts), repartition=f.choice("repartition", Repartition))

    def to_dict(self) -> dict[str, Any]:
        return {"partitions": [p.to_dict() for p in self.partitions], "repartition": self.repartition}

    def get(self, name: str) -> Partition | None:
        return next((p for p in self.partitions if p.name == name), None)

    def number(self, name: str) -> int:
        """1-based MBR partition number of `name` (as in /dev/vda<N>)."""
        for i, p in enumerate(self.partitions):
            if p.name == name:
                return i + 1
        raise UpdaterError(f"plan: layout has no partition named {name!r}")


@dataclass(frozen=True)
class Plan:
    node: str
    layout: Layout
    image: str | None = None  # manifest path on the master; None = keep what's there
    mount: Mount = DEFAULT_MOUNT
    pin: bool = False  # the image's version may be older than a slot's (a deliberate rollback)
    tries: int = DEFAULT_TRIES
    hostname: str | None = None  # the node's own name (rev4); None: the image's stays
    persist: tuple[str, ...] = ()  # directories kept on the data partition across updates (rev4)
    boot: str | None = None  # the boot manifest's path on the master (bootfiles.py); None: boot files stay
    method: Method = Method.IMAGE  # rsync: files into a fresh slot, checked against the signed file manifest
    rsync_port: int | None = None  # the master's rsync daemon, for method rsync
    serial: int | None = None  # rev7: raised by the master on every write of this plan; None: an older master's
    default: bool = False  # rev7: the default plan as serve names it for one node: its serial is the default's
    format: int = FORMAT

    @property
    def kind(self) -> PlanKind:
        """Which plan this is, and so whose serial sequence it counts in: the node's own or the default."""
        return PlanKind.DEFAULT if self.node == DEFAULT_PLAN or self.default else PlanKind.OWN

    @classmethod
    def from_dict(cls, obj: Any) -> Plan:
        f = _Fields("plan", obj)
        persist = f.raw("persist", optional=True)
        problem = persist_problem(persist) if persist is not None else None
        if problem:
            raise f.fail("persist", problem)
        return cls(
            format=f.format(),
            node=f.text("node", _NODE_RE, what="a node name"),
            layout=Layout.from_dict(f.raw("layout")),
            image=f.optional_text("image", _MASTER_PATH_RE, what="an absolute path on the master"),
            mount=f.choice("mount", Mount),
            pin=f.flag("pin"),
            tries=f.optional_integer("tries", minimum=1) or DEFAULT_TRIES,
            hostname=f.optional_text("hostname", HOSTNAME_RE, what="a hostname (one lowercase RFC 1123 label)"),
            persist=tuple(persist or ()),
            boot=f.optional_text("boot", _MASTER_PATH_RE, what="an absolute path on the master"),
            **_method(f),
            serial=f.optional_integer("serial", minimum=1),
            default=f.flag("default"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "node": self.node,
            "layout": self.layout.to_dict(),
            "image": self.image,
            "mount": self.mount,
            "pin": self.pin,
            "tries": self.tries,
            # rev4's keys are left out when unset: such a plan is the rev3 bytes
            **({"hostname": self.hostname} if self.hostname is not None else {}),
            **({"persist": list(self.persist)} if self.persist else {}),
            **({"boot": self.boot} if self.boot is not None else {}),  # rev5: absent keeps the bytes before it
            # rev6: left out for the image method, which keeps the bytes before it
            **({"method": self.method, "rsync_port": self.rsync_port} if self.method is Method.RSYNC else {}),
            # rev7: left out when unset (an older master's plan keeps its bytes)
            **({"serial": self.serial} if self.serial is not None else {}),
            **({"default": True} if self.default else {}),
        }


def _method(f: _Fields) -> dict[str, Any]:
    """A plan's method (image unless it says rsync) and, for rsync, the master's daemon port."""
    method = f.choice("method", Method) if f.raw("method", optional=True) is not None else Method.IMAGE
    if method is not Method.RSYNC:
        return {"method": method}
    port = f.integer("rsync_port", minimum=1)
    if port > 65535:
        raise f.fail("rsync_port", f"{port} is not a TCP port (1..65535)")
    return {"method": method, "rsync_port": port}


# --- Slot state ------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    state: SlotStatus = SlotStatus.EMPTY
    image: str | None = None
    version: int | None = None
    sha256: str | None = None
    partition: int | None = None  # MBR number it lives in, so an offline boot needs no plan
    tries: int | None = None  # trial slots: unconfirmed boots left before it is given up

    @classmethod
    def from_dict(cls, obj: Any, name: str = "?") -> Slot:
        f = _Fields(f"slot state: slots.{name}", obj)
        slot = cls(
            state=f.choice("state", SlotStatus),
            image=f.optional_text("image", IMAGE_RE, what="an image name"),
            version=f.optional_integer("version", minimum=1),
            sha256=f.optional_text("sha256", _HEX64_RE, what="64 lowercase hex digits"),
            partition=f.optional_integer("partition", minimum=1),
            tries=f.optional_integer("tries"),
        )
        if slot.partition is not None and slot.partition > 4:
            raise f.fail("partition", f"{slot.partition} is not an MBR primary (1..4)")
        if slot.state in (*BOOTABLE, "failed") and None in (slot.image, slot.version, slot.sha256):
            raise f.fail("state", f"a {slot.state} slot must name its image, version and sha256")
        if (slot.state == "trial") != (slot.tries is not None):
            raise f.fail("tries", "a trial slot, and only a trial slot, counts its tries")
        return slot

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "image": self.image,
            "version": self.version,
            "sha256": self.sha256,
            "partition": self.partition,
            "tries": self.tries,
        }

    def holds(self, manifest: Manifest) -> bool:
        """True when this slot is bootable and holds exactly `manifest`'s image."""
        return (
            self.state in BOOTABLE
            and self.image == manifest.image
            and self.version == manifest.version
            and self.sha256 == manifest.sha256
        )


@dataclass(frozen=True)
class PlanRecord:
    """The newest serialled plan this card acted on (slot state rev3): for which node, whose
    plan (own or default) and its serial. A lower serial of the same plan is a replay; once
    ``kind`` is own, the default plan is refused."""

    node: str
    kind: PlanKind
    serial: int

    @classmethod
    def from_dict(cls, obj: Any) -> PlanRecord:
        f = _Fields("slot state: plan", obj)
        return cls(
            node=f.text("node", _NODE_RE, what="a node id"),
            kind=f.choice("kind", PlanKind),
            serial=f.integer("serial", minimum=1),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "kind": self.kind, "serial": self.serial}


@dataclass(frozen=True)
class SlotState:
    seq: int = 0
    slots: Mapping[str, Slot] = field(default_factory=dict)
    primary: str | None = None
    last_good: str | None = None
    plan: PlanRecord | None = None  # rev3: the newest serialled plan acted on; None: none yet (older records)
    format: int = FORMAT

    @classmethod
    def from_dict(cls, obj: Any) -> SlotState:
        f = _Fields("slot state", obj)
        raw = f.raw("slots")
        if not isinstance(raw, dict) or len(raw) > 4:
            raise f.fail("slots", "expected an object of at most 4 slots")
        slots = {}
        for name, value in raw.items():
            if not NAME_RE.fullmatch(name):
                raise f.fail("slots", f"{name[:40]!r} is not a slot name")
            slots[name] = Slot.from_dict(value, name)
        state = cls(
            format=f.format(),
            seq=f.integer("seq"),
            slots=slots,
            primary=f.optional_text("primary"),
            last_good=f.optional_text("last_good"),
            plan=None if f.raw("plan", optional=True) is None else PlanRecord.from_dict(f.raw("plan")),
        )
        for key, allowed in (("primary", BOOTABLE), ("last_good", ("good",))):
            name = getattr(state, key)
            if name is not None and (name not in slots or slots[name].state not in allowed):
                raise f.fail(key, f"{name[:40]!r} is not a {' or '.join(allowed)} slot")
        return state

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "seq": self.seq,
            "slots": {k: v.to_dict() for k, v in sorted(self.slots.items())},
            "primary": self.primary,
            "last_good": self.last_good,
            **({"plan": self.plan.to_dict()} if self.plan is not None else {}),  # rev3; absent: the rev2 bytes
        }

    def slot(self, name: str) -> Slot:
        return self.slots.get(name, Slot())


# --- Report --------------------------------------------------------------------------

MAX_REPORT_SOURCES = 8  # sources.py's MAX_SOURCES: the master and 7 after it
MAX_SOURCE_URL = 200  # sources.py's MAX_URL
_SOURCE_URL_RE = re.compile(r"http://[!-~]{1,193}")  # what sources.url_problem lets through, loosely


@dataclass(frozen=True)
class SourceUse:
    """One source of a worker's bytes this boot (report rev10; sources.py): its URL, the image
    bytes it sent (streams, byte ranges, indexes), and why it was passed over, if it was."""

    url: str
    bytes: int = 0
    failed: str | None = None

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> SourceUse:
        f = _Fields(where, obj)
        return cls(
            url=f.text("url", _SOURCE_URL_RE, what="an http:// URL of at most 200 printable characters"),
            bytes=f.integer("bytes"),
            failed=_one_line(f, "failed"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "bytes": self.bytes, "failed": self.failed}


def _sources(f: _Fields, key: str) -> tuple[SourceUse, ...] | None:
    value = f.raw(key, optional=True)
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_REPORT_SOURCES:
        raise f.fail(key, f"expected a list of 1 to {MAX_REPORT_SOURCES} sources, got {_kind(value)}")
    return tuple(SourceUse.from_dict(item, f"{f.doc}: {key}[{i}]") for i, item in enumerate(value))


@dataclass(frozen=True)
class Report:
    node: str
    phase: Phase
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    slot: str | None = None
    version: int | None = None
    time: float = 0.0
    output: str | None = None  # the tail of a hook's output
    hostname: str | None = None  # the node's hostname from its plan (rev5)
    hook: HookName | None = None  # which hook a "hook" report is about (rev5)
    card_bytes: int | None = None  # bytes of the new slot a block delta took from the card (rev6)
    delta: str | None = None  # one line: how the delta built the slot, or why the full stream (rev6)
    pubkey: str | None = None  # the node's public key, base64 of the raw 32 bytes (rev9; nodekey.py)
    sources: tuple[SourceUse, ...] | None = None  # where the bytes came from, with several sources (rev10)

    @classmethod
    def from_dict(cls, obj: Any) -> Report:
        f = _Fields("report", obj)
        error = _one_line(f, "error")
        output = f.optional_text("output")
        if output is not None and len(output) > MAX_REPORT_OUTPUT:
            raise f.fail("output", f"must be at most {MAX_REPORT_OUTPUT} characters")
        if output is not None and (bad := _CONTROL_BUT_LINES_RE.search(output)):
            raise f.fail("output", f"control character {bad[0]!r} (only tabs and newlines are taken)")
        return cls(
            node=f.text("node", _NODE_RE, what="a node id"),
            phase=f.choice("phase", Phase),
            bytes=f.integer("bytes"),
            seconds=f.number("seconds"),
            error=error,
            slot=f.optional_text("slot", NAME_RE, what="a slot name"),
            version=f.optional_integer("version", minimum=1),
            time=f.optional_number("time") or 0.0,
            output=output,
            hostname=f.optional_text("hostname", HOSTNAME_RE, what="a hostname"),
            hook=f.choice("hook", HookName) if f.raw("hook", optional=True) is not None else None,
            card_bytes=f.optional_integer("card_bytes"),
            delta=_one_line(f, "delta"),
            pubkey=_public_key(f, "pubkey"),
            sources=_sources(f, "sources"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "phase": self.phase,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "error": self.error,
            "slot": self.slot,
            "version": self.version,
            "time": self.time,
            **({"output": self.output} if self.output is not None else {}),
            **({"hostname": self.hostname} if self.hostname is not None else {}),
            **({"hook": self.hook} if self.hook is not None else {}),
            **({"card_bytes": self.card_bytes} if self.card_bytes is not None else {}),
            **({"delta": self.delta} if self.delta is not None else {}),
            **({"pubkey": self.pubkey} if self.pubkey is not None else {}),
            **({"sources": [s.to_dict() for s in self.sources]} if self.sources is not None else {}),
        }


def _public_key(f: _Fields, key: str) -> str | None:
    """An Ed25519 public key: base64 of its raw 32 bytes, in the one canonical spelling."""
    value = f.optional_text(key)
    if value is not None and not _PUBLIC_KEY_RE.fullmatch(value):
        raise f.fail(key, f"{value[:60]!r} is not the base64 of a 32-byte Ed25519 key")
    return value


def _one_line(f: _Fields, key: str) -> str | None:
    value = f.optional_text(key)
    if value is not None and ("\n" in value or len(value) > 1000):
        raise f.fail(key, "must be one line of at most 1000 characters")
    if value is not None and (bad := _CONTROL_RE.search(value)):
        raise f.fail(key, f"control character {bad[0]!r} (one line of printable text is taken)")
    return value


def escape_controls(text: str, *, lines: bool = False) -> str:
    """``text`` with each control character written out as ``\\xNN`` (with ``lines``, tabs
    and newlines kept): a worker's text printed on the master's terminal prints as itself."""
    return (_CONTROL_BUT_LINES_RE if lines else _CONTROL_RE).sub(lambda m: f"\\x{ord(m[0]):02x}", text)


parse_manifest = _parser(Manifest.from_dict, "manifest")
parse_latest = _parser(Latest.from_dict, "latest")
parse_plan = _parser(Plan.from_dict, "plan")
parse_slot_state = _parser(SlotState.from_dict, "slot state")
parse_report = _parser(Report.from_dict, "report")


def manifest_path(image: str, version: int) -> str:
    """Where a version's manifest lies on the master (its stream and hooks lie beside it)."""
    return f"/images/{image}/{version}/manifest.json"


_MANIFEST_PATH_RE = re.compile(rf"/images/({IMAGE_RE.pattern})/([1-9][0-9]{{0,17}})/manifest\.json")


def manifest_named(path: str) -> tuple[str, int] | None:
    """(image, version) that a manifest path names (manifest_path's inverse), or None when
    ``path`` is not one: a plan names the version it assigns by this path alone."""
    match = _MANIFEST_PATH_RE.fullmatch(path)
    return (match[1], int(match[2])) if match else None


def node_id(mac: str) -> str:
    """The master's id for a node: MAC lowercased with ':' -> '-' (52-54-00-12-34-56)."""
    mac = mac.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac):
        raise UpdaterError(f"identity: {mac[:40]!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return mac.replace(":", "-")


# --- The master key chain: keys/<n>.json ---------------------------------------------------

KEY_BYTES = 32  # an Ed25519 public key, raw
MAX_KEY_NUMBER = (1 << 31) - 1
# 32 bytes in padded base64, spelled one way only: the 43rd character carries 4 bits and two zeros
_KEY_B64_RE = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")


def encode_key(raw: bytes) -> str:
    """A raw Ed25519 public key as a chain link or the card's key record writes it."""
    if len(raw) != KEY_BYTES:
        raise UpdaterError(f"master key: {len(raw)} bytes, an Ed25519 public key is {KEY_BYTES}")
    return base64.b64encode(raw).decode("ascii")


def decode_key(text: str) -> bytes:
    """The raw bytes of a key that matched _KEY_B64_RE (which only the one spelling does)."""
    return base64.b64decode(text, validate=True)


def fingerprint(raw: bytes) -> str:
    """A master key's fingerprint: the sha256 of its 32 raw bytes, hex."""
    return hashlib.sha256(raw).hexdigest()


def key_fields(f: _Fields, *, minimum: int = 0) -> tuple[int, str]:
    """A key's number ``n`` and its raw bytes in base64 ``key`` (a chain link, the key record)."""
    n = f.integer("n", minimum=minimum)
    if n > MAX_KEY_NUMBER:
        raise f.fail("n", f"must be <= {MAX_KEY_NUMBER}, got {n}")
    return n, f.text("key", _KEY_B64_RE, what=f"{KEY_BYTES} bytes in base64")


@dataclass(frozen=True)
class KeyLink:
    """keys/<n>.json on the master: master key ``n`` (``key``: its 32 raw bytes in base64)
    takes over from key n - 1, whose fingerprint ``retires`` names. Signed by the key it
    retires (keys/<n>.json.sig), so a worker holding key n - 1 can check it, and takes only
    the link that follows its own key."""

    n: int
    key: str
    retires: str  # fingerprint (sha256 of the raw bytes) of key n - 1
    created: int = 0  # unix time (the rotation's source date epoch)
    format: int = FORMAT

    @classmethod
    def from_dict(cls, obj: Any) -> KeyLink:
        f = _Fields("key link", obj)
        n, key = key_fields(f, minimum=1)
        link = cls(
            format=f.format(),
            n=n,
            key=key,
            retires=f.text("retires", _HEX64_RE, what="64 lowercase hex digits"),
            created=f.integer("created"),
        )
        if fingerprint(link.raw) == link.retires:
            raise f.fail("key", "is the key it retires")
        return link

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "n": self.n, "key": self.key, "retires": self.retires, "created": self.created}

    @property
    def raw(self) -> bytes:
        return decode_key(self.key)


parse_key_link = _parser(KeyLink.from_dict, "key link")


def key_link_path(n: int) -> str:
    """Where the link naming master key ``n`` lies on the master (its .sig beside it)."""
    return f"/keys/{n}.json"
