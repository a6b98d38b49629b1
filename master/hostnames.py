"""Each node's hostname: given with `rackboot plan --hostname`, or from [master] hostname.

A pattern fills in ``{index}`` (with an optional format such as ``{index:02d}``) and
``{mac}`` (the MAC's 12 lowercase hex digits). A node's index is the order in which
nodes were first named (a plan of their own written, or adopted by `rackboot serve`): 1 for
the first, never reused, even once a node is gone (`rackboot forget`), so a name never moves
to another machine; a name a node was given by hand is passed over. The registry is two
tables in the fleet's database (inventory.py: the hostnames table, each node's index and
name, and counters' next_index), written under its write lock, so masters that share one
database never give one name to two nodes. An older master's <master>/hostnames.json is
taken in once, when the inventory that brings these tables is first opened.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rackboot.errors import RackbootError
from rackboot.initramfs.updater.formats import HOSTNAME_RE

from .database import Connection

REGISTRY = "hostnames.json"
FIELDS = ("index", "mac")
_INDEX_SPEC_RE = re.compile(r"0?[1-9]?d|")  # {index}, {index:d}, {index:02d} ... {index:09d}


def hostname_problem(name: str) -> str | None:
    if not HOSTNAME_RE.fullmatch(name):
        return (
            f"{name[:80]!r} is not a hostname: one RFC 1123 label, 1 to 63 lowercase letters, "
            "digits and '-', not starting or ending with '-'"
        )
    return None


def pattern_problem(pattern: str) -> str | None:
    """What is wrong with a [master] hostname pattern, or None; '' (no pattern) is fine."""
    if not pattern:
        return None
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        return f"not a pattern: {exc}"
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS:
            return f"{{{name}}}: only {{index}} and {{mac}} are filled in"
        if conversion or (name == "index" and not _INDEX_SPEC_RE.fullmatch(spec or "")) or (name == "mac" and spec):
            return (
                f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}: not a format it takes"
            )
        names.append(name)
    if not names:
        return "fills in neither {index} nor {mac}: every node would get the same name"
    longest = render(pattern, index=10**9 - 1, mac="ff" * 6)  # the widest a name gets
    problem = hostname_problem(longest)
    return f"makes names such as {longest!r}: {problem}" if problem else None


def render(pattern: str, *, index: int, mac: str) -> str:
    return pattern.format(index=index, mac=mac)


@dataclass(frozen=True)
class Entry:
    index: int
    hostname: str


class Store(Protocol):
    """Where the registry lives: the inventory (its connection, its write transactions)."""

    @property
    def db(self) -> Connection: ...

    def write(self) -> AbstractContextManager[Connection]: ...


def load_file(path: Path) -> dict[str, Any]:
    """An older master's hostnames.json (next_index, nodes: {node: {index, hostname}})."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RackbootError(f"{path}: cannot read the hostname registry: {exc}") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("nodes"), dict)
        or not isinstance(doc.get("next_index"), int)
        or not all(
            isinstance(e, dict) and isinstance(e.get("index"), int) and isinstance(e.get("hostname"), str)
            for e in doc["nodes"].values()
        )
    ):
        raise RackbootError(f"{path}: not a hostname registry (next_index, nodes)")
    return doc


def empty(db: Connection) -> bool:
    """Whether the registry never named a node."""
    return db.execute("SELECT 1 FROM hostnames LIMIT 1").fetchone() is None and _next_index(db) == 1


def import_doc(db: Connection, doc: dict[str, Any]) -> None:
    """A hostnames.json's entries into an empty registry (in the caller's write transaction)."""
    db.executemany(
        "INSERT INTO hostnames (node, idx, hostname) VALUES (?, ?, ?)",
        [(node, e["index"], e["hostname"]) for node, e in sorted(doc["nodes"].items())],
    )
    _set_next_index(db, doc["next_index"])


def _next_index(db: Connection) -> int:
    return int(db.execute("SELECT value FROM counters WHERE name = 'next_index'").fetchone()[0])


def _set_next_index(db: Connection, value: int) -> None:
    db.execute("UPDATE counters SET value = ? WHERE name = 'next_index'", (value,))


def _rows(db: Connection) -> Iterator[tuple[str, Entry]]:
    for row in db.execute("SELECT node, idx, hostname FROM hostnames ORDER BY node"):
        yield row[0], Entry(int(row[1]), row[2])


def read(store: Store) -> dict[str, Entry]:
    """Every registered node's index and hostname."""
    return dict(_rows(store.db))


def uses_index(pattern: str) -> bool:
    """Whether the pattern's names change with the index (else every node's is its MAC's)."""
    return render(pattern, index=1, mac="0" * 12) != render(pattern, index=2, mac="0" * 12)


def _holders(db: Connection, node: str, name: str) -> str | None:
    """The other node that holds ``name``, or None."""
    row = db.execute("SELECT node FROM hostnames WHERE hostname = ? AND node <> ?", (name, node)).fetchone()
    return None if row is None else str(row[0])


def assign(store: Store, node: str, *, hostname: str | None, pattern: str) -> str | None:
    """The hostname of ``node`` (the worker's id, 52-54-00-12-34-56): ``hostname`` if given,
    else the one it has, else the pattern's with a new index, moving the index on past names
    other nodes hold (given by hand with --hostname); None with neither. Refuses a name given
    by hand that another node has, and a pattern without {index} whose name is taken."""
    if hostname is not None and (problem := hostname_problem(hostname)):
        raise RackbootError(f"--hostname: {problem}")
    if hostname is None:  # the common case, a node named before: no write lock
        row = store.db.execute("SELECT hostname FROM hostnames WHERE node = ?", (node,)).fetchone()
        if row is not None:
            return str(row[0])
        if not pattern:
            return None
    with store.write() as db:
        entry = db.execute("SELECT idx, hostname FROM hostnames WHERE node = ?", (node,)).fetchone()
        if hostname is None and entry is not None:  # (named meanwhile, by another master)
            return str(entry[1])
        next_index = _next_index(db)
        index = int(entry[0]) if entry else next_index
        mac = node.replace("-", "")
        name = hostname or render(pattern, index=index, mac=mac)
        if hostname is None and uses_index(pattern):
            while _holders(db, node, name):  # each step passes one held name: it ends within their number
                index += 1
                name = render(pattern, index=index, mac=mac)
        if holder := _holders(db, node, name):
            raise RackbootError(f"hostname {name!r} is node {holder}'s already; give {node} another (--hostname)")
        if entry is None or (int(entry[0]), entry[1]) != (index, name):  # a plan rewritten as it was writes nothing
            db.execute(
                "INSERT INTO hostnames (node, idx, hostname) VALUES (?, ?, ?)"
                " ON CONFLICT (node) DO UPDATE SET idx = excluded.idx, hostname = excluded.hostname",
                (node, index, name),
            )
            if index + 1 > next_index:
                _set_next_index(db, index + 1)
        return name


def peek(store: Store, node: str, *, pattern: str) -> str | None:
    """The name ``node`` has, or the one a pattern without {index} gives it while no other
    node holds that; else None. Reads only: a node not adopted yet spends no index."""
    db = store.db
    row = db.execute("SELECT hostname FROM hostnames WHERE node = ?", (node,)).fetchone()
    if row is not None:
        return str(row[0])
    if not pattern or uses_index(pattern):
        return None
    name = render(pattern, index=0, mac=node.replace("-", ""))
    return None if _holders(db, node, name) else name


def forget(store: Store, node: str) -> Entry | None:
    """Take ``node`` out of the registry: its name is free again, its index stays spent
    (next_index does not move back). Returns what it had, None when it had nothing."""
    with store.write() as db:
        row = db.execute("SELECT idx, hostname FROM hostnames WHERE node = ?", (node,)).fetchone()
        if row is None:
            return None
        db.execute("DELETE FROM hostnames WHERE node = ?", (node,))
        return Entry(int(row[0]), row[1])
