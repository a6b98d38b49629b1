"""Plans: which layout and image each node gets, written into the master's tree."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from rackboot.config import BOOT_START_MIB, Config
from rackboot.errors import RackbootError
from rackboot.files import TMP_RE, atomic_write_bytes, lock_dir, sweep
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import Layout, Method, Plan, node_id

from . import bootfiles, hostnames, publish, rsyncd, serials, signing

DEFAULT = formats.DEFAULT_PLAN  # the plan of every node without one of its own
_MAC_FORMS = (
    re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}"),  # 52:54:00:12:34:56, 52-54-00-12-34-56
    re.compile(r"[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}"),  # Cisco: 5254.0012.3456
    re.compile(r"[0-9a-f]{12}"),  # 525400123456
)


def node_name(node: str) -> str:
    """'default', or a MAC in any usual spelling as the one name the worker asks for
    (updater formats.node_id: 52-54-00-12-34-56); a plan under any other name is never read."""
    if node == DEFAULT:
        return node
    mac = node.strip().lower()
    if not any(form.fullmatch(mac) for form in _MAC_FORMS):
        raise RackbootError(
            f"node {node[:40]!r} is not a MAC address (52:54:00:12:34:56, 52-54-00-12-34-56, "
            f"5254.0012.3456 or 525400123456) or '{DEFAULT}'"
        )
    digits = re.sub(r"[^0-9a-f]", "", mac)
    return node_id(":".join(digits[i : i + 2] for i in range(0, 12, 2)))


def layout(cfg: Config) -> Layout:
    """The config's partition list as the plan's Layout (the boot partition starts at 4 MiB)."""
    parts = [p.to_dict() for p in cfg.layout.partitions]
    parts[0]["start_mib"] = BOOT_START_MIB
    try:
        return Layout.from_dict({"partitions": parts, "repartition": cfg.layout.repartition})
    except UpdaterError as exc:
        raise RackbootError(f"{cfg.path}: [layout]: {exc}") from None


def make_plan(
    cfg: Config,
    *,
    node: str,
    manifest: str | None,
    pin: bool = False,
    hostname: str | None = None,
    names: hostnames.Store | None = None,
) -> Plan:
    """The plan, naming the build's boot files (published on the way) when there is a build.
    A node's own plan carries its hostname (``hostname``, else the registry's or the
    [master] hostname pattern's: hostnames.assign, in ``names``, the inventory, by default
    the config's); the default plan names none."""
    if node != DEFAULT:
        if names is None:
            from .inventory import Inventory  # (the inventory's module does not import this one)

            names = Inventory.for_config(cfg)
        hostname = hostnames.assign(names, node, hostname=hostname, pattern=cfg.master.hostname)
    elif hostname is not None:
        raise RackbootError(f"a hostname is one node's: name the node (--node MAC), not {DEFAULT!r}")
    return Plan(
        node=node,
        layout=layout(cfg),
        image=manifest,
        mount=cfg.layout.mount,
        pin=pin,
        tries=cfg.layout.tries,
        hostname=hostname,
        persist=cfg.layout.persist,
        boot=bootfiles.publish(cfg),  # the build's boot files, published on the way (none before a build)
    )


def assign(
    cfg: Config,
    *,
    node: str,
    image: str,
    version: int | None = None,
    hostname: str | None = None,
    method: Method = Method.IMAGE,
    names: hostnames.Store | None = None,
) -> Path:
    """Point ``node`` (a MAC, or 'default') at a published image: latest unless a version is
    pinned; ``hostname`` names the node (else the registry or the pattern does)."""
    if not formats.IMAGE_RE.fullmatch(image):  # it becomes a path on the master: checked before anything
        raise RackbootError(f"image {image[:80]!r} is not an image name ([a-z0-9][a-z0-9._-]*, at most 64 characters)")
    node = node_name(node)
    master = cfg.master.directory
    if version is None:
        latest = publish.latest(master, image)
        if latest is None:
            raise RackbootError(f"image {image!r} is not published in {master} (run rackboot publish first)")
        manifest = latest.manifest
    else:
        manifest = formats.manifest_path(image, version)
        if not (Path(master) / manifest.lstrip("/")).is_file():
            raise RackbootError(f"image {image!r} has no version {version} in {master}")
    plan = make_plan(cfg, node=node, manifest=manifest, pin=version is not None, hostname=hostname, names=names)
    if method is Method.RSYNC:
        plan = rsyncd.rsync_plan(cfg, plan)
    return write_plan(master, node, plan, key=cfg.master.key)


def write_plan(master: Path, node: str, plan: Plan, key: Path | None = None) -> Path:
    """Write plans/<node>.json (node: 'default' or the worker's own name) with the next
    serial of that plan's sequence (serials.py: a worker refuses a lower one), and with a key
    its .sig first; each file is replaced atomically, under the lock on plans/. Every writer
    of a plan comes here, so every change, a way back included, has a fresh serial."""
    if node != node_name(node):
        raise RackbootError(f"node {node!r} is not the name a worker asks for ({node_name(node)})")
    if plan.node != node or plan.default:
        raise RackbootError(f"a plan for node {plan.node!r} cannot be written as plans/{node}.json")
    path = Path(master) / "plans" / f"{node}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_dir(path.parent)
    try:
        sweep(path.parent, TMP_RE)
        data = formats.dump(replace(plan, serial=serials.take_next(master, node, path)))
        if key:
            atomic_write_bytes(path.with_name(path.name + ".sig"), signing.sign(key, data))
        atomic_write_bytes(path, data)
    finally:
        os.close(lock)
    return path


def remove_plan(master: Path, node: str) -> bool:
    """Remove plans/<node>.json and its .sig, under the lock on plans/: the node follows the
    default plan again. Whether there was one."""
    directory = Path(master) / "plans"
    if not directory.is_dir():
        return False
    lock = lock_dir(directory)
    try:
        found = False
        for path in (directory / f"{node}.json", directory / f"{node}.json.sig"):
            try:
                path.unlink()
                found = True
            except FileNotFoundError:
                pass
    finally:
        os.close(lock)
    return found
