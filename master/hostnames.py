"""Each node's hostname: given with `rackboot plan --hostname`, or from [master] hostname.

A pattern fills in ``{index}`` (with an optional format such as ``{index:02d}``) and
``{mac}`` (the MAC's 12 lowercase hex digits). A node's index is the order in which
nodes were first named (a plan of their own written, or adopted by `rackboot serve`): 1 for
the first, never reused, even once a node is gone (`rackboot forget`), so a name never moves
to another machine; a name a node was given by hand is passed over. The registry,
<master>/hostnames.json, keeps each node's index and name and the next index, and is
replaced atomically under the lock on the master's tree.
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rackboot.errors import RackbootError
from rackboot.files import atomic_write_bytes, lock_dir
from rackboot.initramfs.updater.formats import HOSTNAME_RE

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


def _load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {"next_index": 1, "nodes": {}}
    except (OSError, ValueError) as exc:
        raise RackbootError(f"{path}: cannot read the hostname registry: {exc}") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("nodes"), dict)
        or not isinstance(doc.get("next_index"), int)
    ):
        raise RackbootError(f"{path}: not a hostname registry (next_index, nodes)")
    return doc


def read(master: Path) -> dict[str, Entry]:
    """Every registered node's index and hostname."""
    doc = _load(Path(master) / REGISTRY)
    return {node: Entry(e["index"], e["hostname"]) for node, e in doc["nodes"].items()}


def uses_index(pattern: str) -> bool:
    """Whether the pattern's names change with the index (else every node's is its MAC's)."""
    return render(pattern, index=1, mac="0" * 12) != render(pattern, index=2, mac="0" * 12)


def _holders(nodes: dict[str, Any], node: str) -> dict[str, str]:
    """Each name another node holds -> that node."""
    return {e["hostname"]: other for other, e in sorted(nodes.items()) if other != node}


def assign(master: Path, node: str, *, hostname: str | None, pattern: str) -> str | None:
    """The hostname of ``node`` (the worker's id, 52-54-00-12-34-56): ``hostname`` if given,
    else the one it has, else the pattern's with a new index, moving the index on past names
    other nodes hold (given by hand with --hostname); None with neither. Refuses a name given
    by hand that another node has, and a pattern without {index} whose name is taken."""
    if hostname is not None and (problem := hostname_problem(hostname)):
        raise RackbootError(f"--hostname: {problem}")
    path = Path(master) / REGISTRY
    Path(master).mkdir(parents=True, exist_ok=True)
    lock = lock_dir(Path(master))
    try:
        doc = _load(path)
        nodes: dict[str, Any] = doc["nodes"]
        entry = nodes.get(node)
        if hostname is None:
            if entry is not None:
                return str(entry["hostname"])
            if not pattern:
                return None
        index = entry["index"] if entry else doc["next_index"]
        holders = _holders(nodes, node)
        mac = node.replace("-", "")
        name = hostname or render(pattern, index=index, mac=mac)
        if hostname is None and uses_index(pattern):
            while name in holders:  # each step passes one held name: it ends within len(holders)
                index += 1
                name = render(pattern, index=index, mac=mac)
        if name in holders:
            holder = holders[name]
            raise RackbootError(f"hostname {name!r} is node {holder}'s already; give {node} another (--hostname)")
        if nodes.get(node) != {"index": index, "hostname": name}:  # a plan rewritten as it was writes nothing
            nodes[node] = {"index": index, "hostname": name}
            doc["next_index"] = max(doc["next_index"], index + 1)
            _save(path, doc)
        return name
    finally:
        os.close(lock)


def peek(master: Path, node: str, *, pattern: str) -> str | None:
    """The name ``node`` has, or the one a pattern without {index} gives it while no other
    node holds that; else None. Reads only: a node not adopted yet spends no index."""
    nodes: dict[str, Any] = _load(Path(master) / REGISTRY)["nodes"]
    if node in nodes:
        return str(nodes[node]["hostname"])
    if not pattern or uses_index(pattern):
        return None
    name = render(pattern, index=0, mac=node.replace("-", ""))
    return None if name in _holders(nodes, node) else name


def forget(master: Path, node: str) -> Entry | None:
    """Take ``node`` out of the registry: its name is free again, its index stays spent
    (next_index does not move back). Returns what it had, None when it had nothing."""
    path = Path(master) / REGISTRY
    if not path.exists():
        return None
    lock = lock_dir(Path(master))
    try:
        doc = _load(path)
        entry = doc["nodes"].pop(node, None)
        if entry is None:
            return None
        _save(path, doc)
        return Entry(entry["index"], entry["hostname"])
    finally:
        os.close(lock)


def _save(path: Path, doc: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
