"""Plans: which layout and image each node gets, written into the master's tree."""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .errors import RackbootError
from . import publish
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import Layout, Plan

from .build import BOOT_START_MIB


def layout(cfg: Config) -> Layout:
    """The config's partition list as the plan's Layout (the boot partition starts at 4 MiB)."""
    parts = [dict(p) for p in cfg.get("layout", "partitions")]
    parts[0]["start_mib"] = BOOT_START_MIB
    try:
        return Layout.from_dict({"partitions": parts, "repartition": cfg.get("layout", "repartition")})
    except UpdaterError as exc:
        raise RackbootError(f"{cfg.path}: [layout]: {exc}") from None


def make_plan(cfg: Config, *, node: str, manifest: str | None, pin: bool = False) -> Plan:
    if cfg.get("layout", "tries") < 1:
        raise RackbootError(f"{cfg.path}: [layout] tries: a new slot needs at least 1 boot, got {cfg.get('layout', 'tries')}")
    return Plan(node=node, layout=layout(cfg), image=manifest, mount=cfg.get("layout", "mount"), pin=pin,
                tries=cfg.get("layout", "tries"))


def assign(cfg: Config, *, node: str, image: str, version: int | None = None) -> Path:
    """Point ``node`` (or 'default') at a published image: latest unless a version is pinned."""
    master = cfg.get("master", "directory")
    if version is None:
        latest = publish.latest(master, image)
        if latest is None:
            raise RackbootError(f"image {image!r} is not published in {master} (run rackboot publish first)")
        manifest = latest.manifest
    else:
        manifest = f"/images/{image}/{version}/manifest.json"
        if not (Path(master) / manifest.lstrip("/")).is_file():
            raise RackbootError(f"image {image!r} has no version {version} in {master}")
    return publish.write_plan(master, node, make_plan(cfg, node=node, manifest=manifest, pin=version is not None),
                              key=cfg.get("master", "key"))
