"""The updater streaming a 512 MiB gzip image over loopback HTTP into a file-backed card,
against `curl | gzip -d | dd` writing the same stream into a file.

    python benchmarks/bench_stream.py

The image is an ext4 filesystem of real files (host libraries and documentation), so
it compresses like a root filesystem does. The updater runs as on a worker (`python -m
updater` against a blank card: layout, stream, verify, commit) in its own process, so
its peak RSS is measured alone. The pipeline verifies nothing; the updater checks
sha256 and CRC32 of what it wrote, then re-reads the slot from the medium and checks
it again, before it commits. Best of three runs each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import rackboot.initramfs
from rackboot.initramfs.updater.formats import Layout, Plan
from rackboot.master import plans, publish, serve
from tiny import pick

IMAGE_MIB = pick(512, 32)
TREE_BUDGET = pick(380, 8) << 20  # bytes of files copied into the filesystem; the rest stays free
TREE_SOURCES = ("/usr/lib/python3.11", "/usr/share/doc", "/usr/lib/x86_64-linux-gnu", "/usr/share")
RUNS = pick(3, 1)
LAYOUT = {
    "partitions": [
        {"name": "boot", "start_mib": 4, "size_mib": 16, "type": "0c"},
        {"name": "a", "size_mib": 600, "type": "83"},
        {"name": "b", "size_mib": 600, "type": "83"},
        {"name": "data", "size_mib": "rest", "type": "83"},
    ],
    "repartition": "allowed",
}
DISK_MIB = 1400
MAC = "52:54:00:12:34:56"
UPDATER_HOME = Path(rackboot.initramfs.__file__).parent  # holds updater/, as /usr/lib/rackboot does


def payload_tree(dest: Path) -> Path:
    """Copy regular files from the host until the budget is spent: a root-like mix."""
    spent = 0
    for src in TREE_SOURCES:
        for path in sorted(Path(src).rglob("*")):
            if spent >= TREE_BUDGET:
                return dest
            if path.is_file() and not path.is_symlink() and os.access(path, os.R_OK):
                target = dest / path.relative_to("/")
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                spent += target.stat().st_size
    return dest


# A child's ru_maxrss counts the memory it was spawned from: spawned straight from this
# (large) process, the updater would be charged for it. A small interpreter in between
# spawns it and writes the peak RSS it alone reached (KiB) to the path in argv[1].
_MEASURE = (
    "import os, subprocess, sys\n"
    "proc = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(proc.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _run_measured(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process; its output goes to ``log``."""
    peak = log.with_suffix(".rss")
    with open(log, "wb") as out:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(peak), *cmd], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise SystemExit(f"bench_stream: {' '.join(cmd[:3])} ... exited {done.returncode}: {tail[0]}")
    return seconds, int(peak.read_text()) * 1024


def bench() -> dict:
    with tempfile.TemporaryDirectory(prefix="rackboot-bench-stream-") as tmp:
        tmp = Path(tmp)
        master = tmp / "master"
        manifest = publish.publish_directory(
            payload_tree(tmp / "tree"), master, image="bench", version=1, size_mib=IMAGE_MIB
        )
        manifest_path = "/images/bench/1/manifest.json"
        plans.write_plan(master, "default", Plan(node="bench", layout=Layout.from_dict(LAYOUT), image=manifest_path))
        stream_url_path = f"/images/bench/1/{manifest.stream}"
        server = serve.make_server(master, "127.0.0.1", 0, quiet=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        ours, theirs = [], []
        try:
            for _ in range(RUNS):
                disk = tmp / "card.img"
                with open(disk, "wb") as f:
                    f.truncate(DISK_MIB << 20)
                # the updater as the worker runs it: a top-level package, no rackboot around it
                ours.append(
                    _run_measured(
                        [
                            sys.executable,
                            "-m",
                            "updater",
                            "--disk",
                            str(disk),
                            "--master",
                            url,
                            "--mac",
                            MAC,
                            "--serial",
                            "bench",
                            "--decision-file",
                            str(tmp / "decision"),
                        ],
                        tmp / "log",
                        env={**os.environ, "PYTHONPATH": str(UPDATER_HOME)},
                    )
                )
                disk.unlink()
                ref = tmp / "ref.img"
                theirs.append(
                    _run_measured(
                        [
                            "sh",
                            "-c",
                            f"curl -sf {url}{stream_url_path} | gzip -d | dd of={ref} bs=1M conv=fsync status=none",
                        ],
                        tmp / "log",
                    )
                )
                ref.unlink()
        finally:
            server.shutdown()
            server.server_close()
    t_ours = min(s for s, _ in ours)
    t_ref = min(s for s, _ in theirs)
    return {
        "image_bytes": manifest.size,
        "stream_bytes": manifest.stream_size,
        "ours_seconds": t_ours,
        "reference_seconds": t_ref,
        "ours_mib_s": manifest.size / t_ours / 2**20,
        "reference_mib_s": manifest.size / t_ref / 2**20,
        "throughput_ratio": t_ref / t_ours,
        "ours_peak_rss": max(r for _, r in ours),
    }


def report(r: dict) -> str:
    return "\n".join(
        [
            f"image {r['image_bytes'] / 2**20:.0f} MiB ({r['stream_bytes'] / 2**20:.0f} MiB gzip) over loopback HTTP:",
            f"  updater (layout, stream, sha256+CRC32 verify, read-back, commit): {r['ours_seconds']:.2f} s, "
            f"{r['ours_mib_s']:.0f} MiB/s, peak RSS {r['ours_peak_rss'] / 2**20:.1f} MiB (goal < 64 MiB)",
            f"  curl | gzip -d | dd: {r['reference_seconds']:.2f} s, {r['reference_mib_s']:.0f} MiB/s",
            f"  throughput ratio updater/pipeline: {r['throughput_ratio']:.2f} (goal >= 0.9)",
        ]
    )


if __name__ == "__main__":
    print(report(bench()))
