"""One arm64 netboot of examples/qemu-virt: the bytes U-Boot pulls over TFTP (the files its
netboot script loads) and the seconds from QEMU's start to the kernel running /init, against
the netboot as it was (the raw Image and a gzip initramfs) booted in turn in the same run.

    python benchmarks/bench_netboot.py [RUNS]

Goals: at most 16 MB (10^6 bytes) per netboot; seconds to /init no more than the reference's.
The time is split where U-Boot's console shows it: the script starts, each file is in, the
kernel starts (booti has inflated a compressed Image by then), /init runs. Medians of RUNS
boots each (default 3). Under QEMU's emulation inflating is far slower than on a Pi and
TFTP over QEMU's user network far faster, so the split matters as much as the sum.
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rackboot import build, config
from rackboot.qemu.machines import profile
from rackboot.qemu.runner import QemuWorker

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "qemu-virt" / "rackboot.toml"
GOAL_BYTES = 16_000_000
RUNS = 3
_TFTP_LOAD = re.compile(rb"\btftpboot \$\{\w+\} ([^\s;]+)")  # as a line or an `if`'s condition


def netboot_files(out: Path) -> list[Path]:
    """The files the netboot script loads over TFTP, in its order (read from the script itself)."""
    script = (out / build.NETBOOT_SCRIPT).read_bytes()
    return [out / name.decode() for name in _TFTP_LOAD.findall(script)]


def netboot_bytes(out: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in netboot_files(out)}


def boot_once(cfg: config.Config, log: Path, timeout: float = 240) -> dict[str, float]:
    """Seconds from QEMU's start to each milestone of one netboot."""
    machine = profile(cfg.board.name, cfg.board.arch)
    files = len(netboot_files(cfg.output.directory))
    marks: dict[str, float] = {}
    start = time.monotonic()
    with QemuWorker(machine, log_path=log, tftp_dir=cfg.output.directory, bootfile=build.NETBOOT_SCRIPT) as worker:
        worker.expect(r"rackboot: netboot ", timeout)
        marks["script"] = time.monotonic() - start
        for i in range(files):
            worker.expect(r"Bytes transferred = ", timeout)
            marks[f"file {i + 1}"] = time.monotonic() - start
        worker.expect(r"Starting kernel", timeout)
        marks["kernel"] = time.monotonic() - start
        worker.expect(r"Run /init as init process", timeout)
        marks["/init"] = time.monotonic() - start
    return marks


def bench(config_path: Path = EXAMPLE, runs: int = RUNS) -> dict:
    with tempfile.TemporaryDirectory(prefix="rackboot-bench-netboot-") as tmp:
        example = config.load(config_path)
        # the kernel must say when it runs /init, which "quiet" keeps to itself; the bytes are the same
        cmdline = " ".join(word for word in example.kernel.cmdline.split() if word != "quiet")
        example = replace(example, kernel=replace(example.kernel, cmdline=cmdline))
        now = replace(example, output=replace(example.output, directory=Path(tmp) / "now"))
        build.build(now, log=lambda line: None)
        before = reference_build(example, Path(tmp) / "before")
        result: dict = {"bytes": netboot_bytes(now.output.directory), "before_bytes": {}, "boots": [], "before": []}
        result["before_bytes"] = netboot_bytes(before.output.directory)
        for i in range(runs):  # in turn, so both see the same load
            result["boots"].append(boot_once(now, Path(tmp) / f"now-{i}.log"))
            result["before"].append(boot_once(before, Path(tmp) / f"before-{i}.log"))
    return result


def reference_build(example: config.Config, out: Path) -> config.Config:
    """The example built as netboots were before: the raw Image and a gzip initramfs."""
    cfg = replace(
        example,
        initramfs=replace(example.initramfs, compression=config.InitramfsCompression.GZIP),
        output=replace(example.output, directory=out),
    )
    kept = build.ARM64_KERNEL_COMPRESSION
    build.ARM64_KERNEL_COMPRESSION = "none"
    try:
        build.build(cfg, log=lambda line: None)
    finally:
        build.ARM64_KERNEL_COMPRESSION = kept
    return cfg


def report(result: dict) -> str:
    sizes, boots, before = result["bytes"], result["boots"], result["before"]
    total, total_before = sum(sizes.values()), sum(result["before_bytes"].values())
    lines = [f"  {name:24} {size / 1e6:8.2f} MB" for name, size in sizes.items()]
    verdict = "ok" if total <= GOAL_BYTES else "OVER"
    lines.append(
        f"  {'one netboot over TFTP':24} {total / 1e6:8.2f} MB  (was {total_before / 1e6:.2f} MB; "
        f"goal <= {GOAL_BYTES / 1e6:g} MB: {verdict})"
    )
    for mark in boots[0]:
        seconds = statistics.median(b[mark] for b in boots)
        was = statistics.median(b[mark] for b in before) if mark in before[0] else None
        ratio = f"  x{seconds / was:.2f} of the raw Image's {was:.2f} s" if was else ""
        lines.append(f"  QEMU start -> {mark:10} {seconds:8.2f} s{ratio}")
    init, init_before = (statistics.median(b["/init"] for b in runs) for runs in (boots, before))
    verdict = "ok" if init <= init_before else "WORSE"
    lines.append(f"  (medians of {len(boots)} boots each, in turn; goal: /init no later than before: {verdict})")
    return "\n".join(lines)


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else RUNS
    print(report(bench(runs=runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
