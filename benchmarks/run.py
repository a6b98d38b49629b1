"""`make bench`: every benchmark of the project, each printed as ratios against a
reference measured in the same run (goals in parentheses)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_bootfiles
import bench_build
import bench_delta
import bench_inventory
import bench_netboot
import bench_rack
import bench_stream


def main() -> int:
    print("== build (examples/qemu-virt) ==", flush=True)
    print(bench_build.report(bench_build.bench()), flush=True)
    print("== boot files: a new build into the inactive boot area ==", flush=True)
    print(bench_bootfiles.report(bench_bootfiles.bench()), flush=True)
    print("== updater streaming ==", flush=True)
    print(bench_stream.report(bench_stream.bench()), flush=True)
    print("== v1 -> v2, one Debian package upgraded: block delta vs full stream ==", flush=True)
    print(bench_delta.report(bench_delta.bench()), flush=True)
    print(f"== the inventory: {bench_inventory.WORKERS} workers reporting at once ==", flush=True)
    print(bench_inventory.report(bench_inventory.bench()), flush=True)
    print("== one arm64 netboot (examples/qemu-virt) ==", flush=True)
    print(bench_netboot.report(bench_netboot.bench()), flush=True)
    print(f"== a rack network in a namespace: 1 and {bench_rack.WORKERS} workers (examples/qemu-virt) ==", flush=True)
    print(bench_rack.report(bench_rack.bench()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
