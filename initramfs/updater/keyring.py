"""The master key a card trusts: the chain of keys it follows, and its newest key kept on
the card, outside the slots, where an offline boot finds it.

The master's first key is key 0; ``rackboot keygen --rotate`` makes key n and the link
keys/<n>.json naming it (formats.KeyLink), signed by key n - 1 and naming key n - 1's
retirement. Before it asks for its plan, a worker that holds key m asks for
keys/<m + 1>.json, takes it only when key m's signature verifies, its ``n`` is m + 1 and
it retires exactly key m, and goes on until the master answers 404 (``follow``). It
keeps the newest key in the key record (two copies, framed as record.py describes, magic
"RKBK"; at 3 MiB + 128 KiB and 3 MiB + 192 KiB, 64 KiB each) and from then on checks every
signature with it: documents signed by a retired key are refused.

Which key a boot trusts (``trusted``): the initramfs's own key is the floor. The card's
record counts only when its key is newer (a higher n); one of the same n must be the
same key, an older one is left for the chain to overwrite. A damaged record (neither copy
whole) falls back to the initramfs's key and says so; the next online boot follows the
chain from there again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import formats, record
from .disk import Disk
from .errors import Refused, UpdaterError
from .formats import FORMAT, _Fields, key_link_path, parse_key_link
from .signature import MasterKey, Verifier

MAGIC = b"RKBK"
COPIES = ((3 << 20) + (128 << 10), (3 << 20) + (192 << 10))  # after the boot record (3 MiB + 64 KiB)
RESERVED = 64 << 10
MAX_STEPS = 32  # links taken in one boot (TUF's max root rotations); the next boot goes on
CARD = "the card's key record"


@dataclass(frozen=True)
class KeyRecord:
    """The newest master key this card took from the chain: number ``n``, its raw bytes in
    base64 (``key``), and ``seq``, the record's write counter (= the header's)."""

    n: int
    key: str
    seq: int = 0
    format: int = FORMAT

    @classmethod
    def from_dict(cls, obj: Any) -> KeyRecord:
        f = _Fields("key record", obj)
        n, key = formats.key_fields(f)
        return cls(format=f.format(), seq=f.integer("seq"), n=n, key=key)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "seq": self.seq, "n": self.n, "key": self.key}

    @property
    def master_key(self) -> MasterKey:
        return MasterKey(self.n, formats.decode_key(self.key))


parse_key_record = formats._parser(KeyRecord.from_dict, "key record")


# --- the record on the card ---------------------------------------------------------------


def encode(kept: KeyRecord) -> bytes:
    body = formats.dump(kept)
    parse_key_record(body)  # never store what a reader would throw away
    return record.frame(MAGIC, kept.seq, body, RESERVED, what="key record")


def decode(raw: bytes) -> KeyRecord | None:
    """A copy's record, or None when it is torn, blank or otherwise invalid."""
    whole = record.unframe(MAGIC, raw, RESERVED)
    if whole is None:
        return None
    try:
        kept = parse_key_record(whole[1])
    except UpdaterError:
        return None
    return kept if kept.seq == whole[0] else None


class NewerRecord(UpdaterError):
    """A copy of the key record is of a format this updater cannot read: it is left as it is."""


@dataclass(frozen=True)
class Copies:
    records: tuple[KeyRecord | None, ...]
    blank: bool  # every copy all zero: a card that never took a key from the chain

    def newest(self) -> KeyRecord | None:
        return record.newest(self.records)

    def target(self) -> int:
        """The copy to overwrite: an invalid one, else the one with the older seq."""
        return record.target(self.records)


def read_copies(disk: Disk) -> Copies:
    raws = [disk.read(offset, RESERVED) for offset in COPIES]
    newer = record.newer(MAGIC, raws, COPIES, RESERVED)
    if newer is not None:
        raise NewerRecord(f"key record: {newer}; it is left as it is")
    return Copies(tuple(decode(raw) for raw in raws), blank=not any(any(raw) for raw in raws))


def read(disk: Disk) -> KeyRecord | None:
    return read_copies(disk).newest()


def write(disk: Disk, key: MasterKey) -> KeyRecord:
    """Keep ``key`` on the card with the next seq, over the older copy; returns what was stored.
    A power cut tears at most that copy: the reader then finds the other, old or new."""
    copies = read_copies(disk)
    newest = copies.newest()
    stored = KeyRecord(n=key.n, key=formats.encode_key(key.raw), seq=(newest.seq if newest else 0) + 1)
    disk.write(COPIES[copies.target()], encode(stored))
    disk.fsync()
    return stored


# --- which key a boot trusts --------------------------------------------------------------


def trusted(disk: Disk, built_in: Verifier, log: Callable[[str], None]) -> Verifier:
    """The verifier this boot starts from: the initramfs's key (``built_in``), or the card's
    record when it holds a newer key. Says which on the console, and why a record is passed over."""
    own = built_in.key
    if own is None:  # an unsigned rack (no key built in), or a key file that does not read
        return built_in
    try:
        copies = read_copies(disk)
    except UpdaterError as e:
        log(f"{e}; using the initramfs's {own.name}")
        return built_in
    newest = copies.newest()
    kept = newest.master_key if newest else None
    if kept is None:
        if not copies.blank:
            log(f"key record: damaged (no whole copy); using the initramfs's {own.name}")
        else:
            log(f"{own.name}: the initramfs's")
        return built_in
    if kept.n > own.n:
        log(f"{kept.name}: kept on the card (the initramfs has key {own.n})")
        return built_in.successor(kept, CARD)
    if kept.n == own.n and kept.raw != own.raw:
        log(f"key record: names another key {kept.n} than the initramfs's; using the initramfs's {own.name}")
    else:
        log(f"{own.name}: the initramfs's" + (f" (the card keeps key {kept.n})" if kept.n < own.n else ""))
    return built_in


# --- the chain on the master ----------------------------------------------------------------


@dataclass(frozen=True)
class Followed:
    verifier: Verifier  # of the newest key taken (the one followed from, when no link was taken)
    stopped: UpdaterError | None = None  # why the walk ended early (Refused: a link refused), after the keys taken


def follow(
    get: Callable[[str], bytes | None], verifier: Verifier, log: Callable[[str], None], limit: int = MAX_STEPS
) -> Followed:
    """Take the master's links from ``verifier``'s key on, one key at a time. ``get(path)``:
    a document's bytes, None when the master has none (404); other failures raise
    UpdaterError. A link that is missing its signature, does not verify with the key it
    follows, names another number than the next, or retires another key ends the walk
    (Refused), and so does a master that stops answering: the keys taken before stand,
    the error comes back with them."""
    current = verifier
    for _ in range(limit):
        try:
            taken = step(get, current)
        except UpdaterError as e:
            return Followed(current, e)
        if taken is None:
            break
        assert current.key is not None and taken.key is not None  # step hands over keys only
        log(f"{taken.key.name} from {taken.public_key}: signed by key {current.key.n}, which it retires")
        current = taken
    return Followed(current)


def step(get: Callable[[str], bytes | None], current: Verifier) -> Verifier | None:
    """The verifier of the key after ``current``'s, or None when the master names none."""
    key = current.key
    if key is None:
        raise Refused(f"key chain: no master key to follow it from ({current.problem})")
    path = key_link_path(key.n + 1)
    data = get(path)
    if data is None:
        return None
    signature = get(path + ".sig")
    if signature is None:
        raise Refused(f"{path}: no signature; a key is only taken signed by the key it retires")
    current.check(path, data, signature)
    try:
        link = parse_key_link(data)
    except UpdaterError as e:
        raise Refused(f"{path}: {e}") from None
    if link.n <= key.n:
        raise Refused(f"{path}: names key {link.n}, not newer than key {key.n} this card holds: a key never goes back")
    if link.n != key.n + 1:
        raise Refused(f"{path}: names key {link.n}, where key {key.n + 1} follows key {key.n}")
    if link.retires != key.fingerprint:
        raise Refused(f"{path}: retires key sha256 {link.retires[:16]}, not {key.name} this card holds")
    return current.successor(MasterKey(link.n, link.raw), path)
