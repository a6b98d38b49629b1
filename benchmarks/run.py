"""`make bench`: every benchmark of the project, each printed as ratios against a
reference measured in the same run (goals in parentheses).

    python benchmarks/run.py [NAME ...]       (NAME: one of BENCHMARKS; default: all, in order)

With RACKBOOT_BENCH_TINY=1 (`make bench TINY=1`) each runs on a tiny input (tiny.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_bootfiles
import bench_build
import bench_delta
import bench_fleet
import bench_inventory
import bench_netboot
import bench_rack
import bench_stream

BENCHMARKS: dict[str, tuple[str, ModuleType]] = {
    "build": ("build (examples/qemu-virt)", bench_build),
    "bootfiles": ("boot files: a new build into the inactive boot area", bench_bootfiles),
    "stream": ("updater streaming", bench_stream),
    "delta": ("v1 -> v2, one Debian package upgraded: block delta vs full stream", bench_delta),
    "inventory": (f"the inventory: {bench_inventory.WORKERS} workers reporting at once", bench_inventory),
    "netboot": ("one arm64 netboot (examples/qemu-virt)", bench_netboot),
    "fleet": (f"the fleet: {bench_fleet.WORKERS} simulated workers booting against rackboot serve", bench_fleet),
    "rack": (f"a rack network in a namespace: 1 and {bench_rack.WORKERS} workers (examples/qemu-virt)", bench_rack),
}


def main(names: list[str]) -> int:
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"run.py: no benchmark {unknown[0]!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in names or BENCHMARKS:
        title, module = BENCHMARKS[name]
        print(f"== {title} ==", flush=True)
        print(module.report(module.bench()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
