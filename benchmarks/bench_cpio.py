"""Initramfs packing: rackboot's cpio writer + parallel gzip against find | cpio | gzip.

    python benchmarks/bench_cpio.py [TREE]

Without TREE, a copy of /usr/lib/python3.11 is staged in a temporary directory. Both
pipelines run on the same tree with a warm page cache; each figure is the best of
three runs. ``bench(tree)`` is importable for the project's main benchmark.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rackboot import compress, cpio
from tiny import pick

REFERENCE = "find . | LC_ALL=C sort | cpio -o -H newc | gzip > {out}"
DEFAULT_TREE = Path(pick("/usr/lib/python3.11", "/usr/lib/python3.11/json"))
RUNS = pick(3, 1)


def ours(tree: Path, out: Path) -> None:
    entries = cpio.tree_entries(tree)
    with open(out, "wb") as f:
        compress.write_compressed("gzip", lambda sink: cpio.write_archive(entries, sink, mtime=0), f)


def reference(tree: Path, out: Path) -> None:
    subprocess.run(["sh", "-c", REFERENCE.format(out=out)], cwd=tree, check=True, stderr=subprocess.DEVNULL)


def _best_of(fn, tree: Path, out: Path) -> float:
    best = float("inf")
    for _ in range(RUNS):
        start = time.perf_counter()
        fn(tree, out)
        best = min(best, time.perf_counter() - start)
    return best


def bench(tree: Path) -> dict:
    """Wall seconds (best of 3) and output sizes for both pipelines on ``tree``."""
    with tempfile.TemporaryDirectory(prefix="rackboot-bench-") as tmp:
        out_ours, out_ref = Path(tmp, "ours.cpio.gz"), Path(tmp, "ref.cpio.gz")
        reference(tree, out_ref)  # warm the page cache for both
        t_ref = _best_of(reference, tree, out_ref)
        t_ours = _best_of(ours, tree, out_ours)
        subprocess.run(["gzip", "-t", out_ours], check=True)
        input_bytes = sum(p.lstat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
        return {
            "tree": str(tree),
            "input_bytes": input_bytes,
            "ours_seconds": t_ours,
            "reference_seconds": t_ref,
            "ours_bytes": out_ours.stat().st_size,
            "reference_bytes": out_ref.stat().st_size,
            "ratio": t_ours / t_ref,
        }


def report(r: dict) -> str:
    mib = 1024 * 1024
    return "\n".join(
        [
            f"tree: {r['tree']} ({r['input_bytes'] / mib:.1f} MiB of files)",
            f"{'':<28}{'seconds':>10}{'MiB out':>10}",
            f"{'rackboot cpio + gzip':<28}{r['ours_seconds']:>10.3f}{r['ours_bytes'] / mib:>10.2f}",
            f"{'find|sort|cpio|gzip':<28}{r['reference_seconds']:>10.3f}{r['reference_bytes'] / mib:>10.2f}",
            f"ratio ours/reference: {r['ratio']:.2f} (time), {r['ours_bytes'] / r['reference_bytes']:.3f} (size)",
        ]
    )


def main(argv: list[str]) -> int:
    if argv:
        print(report(bench(Path(argv[0]))))
        return 0
    with tempfile.TemporaryDirectory(prefix="rackboot-bench-tree-") as tmp:
        tree = Path(tmp, DEFAULT_TREE.name)
        shutil.copytree(DEFAULT_TREE, tree, symlinks=True)
        print(report(bench(tree)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
