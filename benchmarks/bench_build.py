"""Build speed on the qemu-virt example: a full build against a no-op rebuild, and the
initramfs packing against `find | cpio -o -H newc | gzip` on the same staged tree.

    python benchmarks/bench_build.py [CONFIG]

The Debian package cache is warmed first, so the figures measure rackboot, not the
mirror. ``bench(config_path)`` is importable for benchmarks/run.py.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import bench_cpio
from rackboot import build, config, initramfs_tree

EXAMPLE = Path(__file__).resolve().parents[1] / "examples/qemu-virt/rackboot.toml"


def _quiet(_line: str) -> None:
    pass


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def staged_initramfs(cfg: config.Config, stage: Path) -> Path:
    """The tree the initramfs artefact archives, staged exactly as the build stages it."""
    inp = build.Inputs(cfg)
    spec = initramfs_tree.spec(cfg, inp.board)
    refs = inp.packages([p for p in spec.packages if not p.startswith(("/", "./", "../"))])
    stage.mkdir()
    initramfs_tree.stage(stage, spec, sysroot=inp.cache.sysroot(refs), kernel=inp.kernel)
    return stage


def bench(config_path: Path = EXAMPLE) -> dict:
    cfg = config.load(config_path)
    with tempfile.TemporaryDirectory(prefix="rackboot-bench-build-") as tmp:
        warm = Path(tmp, "warm")
        build.build(cfg, out=warm, log=_quiet)  # fills the package cache and unpacks
        out = Path(tmp, "build")
        full = _timed(lambda: build.build(cfg, out=out, log=_quiet))
        noop = _timed(lambda: build.build(cfg, out=out, log=_quiet))
        artefacts = {a["name"]: a for a in json.loads((out / "artefacts.json").read_text())["artefacts"]}
        packing = bench_cpio.bench(staged_initramfs(cfg, Path(tmp, "stage")))
    return {"full_seconds": full, "noop_seconds": noop, "noop_ratio": noop / full,
            "initramfs_bytes": artefacts["initramfs"]["size"], "packing": packing}


def report(r: dict) -> str:
    p = r["packing"]
    return "\n".join([
        f"full build {r['full_seconds']:.2f} s, no-op rebuild {r['noop_seconds']:.3f} s: "
        f"ratio {r['noop_ratio']:.3f} (goal <= 0.05)",
        f"initramfs packing on the staged tree: rackboot {p['ours_seconds']:.3f} s, "
        f"find|cpio|gzip {p['reference_seconds']:.3f} s: ratio {p['ratio']:.2f} (goal <= 1.0)",
        f"initramfs with the updater and its Python: {r['initramfs_bytes'] / 2**20:.2f} MiB compressed "
        f"(goal < 12 MiB)",
    ])


if __name__ == "__main__":
    print(report(bench(Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLE)))
