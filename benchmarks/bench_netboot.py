"""One arm64 netboot of examples/qemu-virt: the bytes U-Boot pulls over TFTP (the files its
netboot script loads) and the seconds from QEMU's start to the kernel running /init.

    python benchmarks/bench_netboot.py [RUNS]

The goal is at most 16 MB (10^6 bytes) per netboot. The time is split where U-Boot's
console shows it: the script starts, each file is in, the kernel starts (booti has
inflated a compressed Image by then), /init runs. Median of RUNS boots (default 3);
under QEMU's emulation U-Boot's inflate is far slower than on a Pi, and TFTP over QEMU's
user network far faster, so the split matters as much as the sum.
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
_TFTP_LOAD = re.compile(rb"tftpboot \$\{\w+\} (\S+)")


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
        cfg = config.load(config_path)
        out = Path(tmp) / "build"
        build.build(cfg, out=out, log=lambda line: None)
        cfg = replace(cfg, output=replace(cfg.output, directory=out))
        sizes = netboot_bytes(out)
        boots = [boot_once(cfg, Path(tmp) / f"console-{i}.log") for i in range(runs)]
    return {"bytes": sizes, "boots": boots}


def report(result: dict) -> str:
    sizes, boots = result["bytes"], result["boots"]
    total = sum(sizes.values())
    lines = [f"  {name:24} {size / 1e6:8.2f} MB" for name, size in sizes.items()]
    verdict = "ok" if total <= GOAL_BYTES else "OVER"
    lines.append(f"  {'one netboot over TFTP':24} {total / 1e6:8.2f} MB  (goal <= {GOAL_BYTES / 1e6:g} MB: {verdict})")
    for mark in boots[0]:
        seconds = statistics.median(b[mark] for b in boots)
        lines.append(f"  QEMU start -> {mark:10} {seconds:8.2f} s  (median of {len(boots)})")
    return "\n".join(lines)


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else RUNS
    print(report(bench(runs=runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
