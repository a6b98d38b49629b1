"""Build speed on the qemu-virt example: a full build against a no-op rebuild, in the
process and as whole `rackboot build` processes (interpreter start-up and imports
included, as /usr/bin/time sees them), and the initramfs packing against
`find | cpio -o -H newc | gzip` on the same staged tree.

    python benchmarks/bench_build.py [CONFIG]

The Debian package cache is warmed first, so the figures measure rackboot, not the
mirror. ``bench(config_path)`` is importable for benchmarks/run.py.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_cpio
from rackboot import build, config, initramfs_tree
from rackboot.master import signing
from tiny import pick

EXAMPLE = Path(__file__).resolve().parents[1] / "examples/qemu-virt/rackboot.toml"
NOOP_RUNS = pick(5, 1)  # whole-process no-op rebuilds; their median is reported
WARM = pick(True, False)  # a build first, so the timed ones find the caches warm (tiny: timed cold)


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


def _rackboot_command() -> list[str]:
    """The `rackboot` console script beside this interpreter (the venv's), as a user runs it."""
    script = Path(sys.executable).with_name("rackboot")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rackboot"]


def whole_process(config_path: Path, tmp: Path) -> dict:
    """`rackboot build -c CONFIG` timed from spawn to exit: a full build into a fresh output
    directory, then the median of NOOP_RUNS no-op rebuilds of it. Bytecode is cached (in
    ``tmp``, not the tree) as an installed rackboot has it, even under PYTHONDONTWRITEBYTECODE."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")

    def run(out: Path) -> float:
        command = [*_rackboot_command(), "build", "-c", str(config_path), "-o", str(out)]
        return _timed(lambda: subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True))

    if WARM:
        run(tmp / "process-warm")  # fills the bytecode cache: no run below compiles
    full = run(tmp / "process")
    noop = statistics.median(run(tmp / "process") for _ in range(NOOP_RUNS))
    return {"full_seconds": full, "noop_seconds": noop, "noop_ratio": noop / full}


def _example_key(cfg: config.Config) -> None:
    """The config's signing key, made as `rackboot demo` makes it on its first run: the
    initramfs carries its public half, so the build needs it."""
    key = cfg.master.key
    if key and not key.exists():
        signing.keygen(key)


def bench(config_path: Path = EXAMPLE) -> dict:
    cfg = config.load(config_path)
    _example_key(cfg)
    with tempfile.TemporaryDirectory(prefix="rackboot-bench-build-") as tmp:
        if WARM:
            build.build(cfg, out=Path(tmp, "warm"), log=_quiet)  # fills the package cache and unpacks
        out = Path(tmp, "build")
        full = _timed(lambda: build.build(cfg, out=out, log=_quiet))
        noop = _timed(lambda: build.build(cfg, out=out, log=_quiet))
        artefacts = {a["name"]: a for a in json.loads((out / "artefacts.json").read_text())["artefacts"]}
        packing = bench_cpio.bench(staged_initramfs(cfg, Path(tmp, "stage")))
        process = whole_process(config_path, Path(tmp))
    return {
        "full_seconds": full,
        "noop_seconds": noop,
        "noop_ratio": noop / full,
        "process": process,
        "initramfs_bytes": artefacts["initramfs"]["size"],
        "packing": packing,
    }


def report(r: dict) -> str:
    p, w = r["packing"], r["process"]
    return "\n".join(
        [
            f"in-process: full build {r['full_seconds']:.2f} s, no-op rebuild {r['noop_seconds']:.3f} s: "
            f"ratio {r['noop_ratio']:.3f} (goal <= 0.05)",
            f"whole process (rackboot build): full build {w['full_seconds']:.2f} s, no-op rebuild "
            f"{w['noop_seconds']:.3f} s (median of {NOOP_RUNS}): ratio {w['noop_ratio']:.3f} (goal <= 0.05)",
            f"initramfs packing on the staged tree: rackboot {p['ours_seconds']:.3f} s, "
            f"find|cpio|gzip {p['reference_seconds']:.3f} s: ratio {p['ratio']:.2f} (goal <= 1.0)",
            f"initramfs with the updater and its Python: {r['initramfs_bytes'] / 2**20:.2f} MiB compressed "
            f"(goal < 12 MiB)",
        ]
    )


if __name__ == "__main__":
    print(report(bench(Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLE)))
