"""One arm64 netboot of examples/qemu-virt: the bytes U-Boot pulls over TFTP (the files its
netboot script loads) and the seconds from QEMU's start to the kernel running /init, against
the netboot as it was (the raw Image and a gzip initramfs) booted in turn in the same run.

    python benchmarks/bench_netboot.py [RUNS]
    python benchmarks/bench_netboot.py RUNS --variants   # every (kernel, initramfs) compression of VARIANTS
    python benchmarks/bench_netboot.py RUNS --rack       # RACK_VARIANTS over dnsmasq on a namespace rack (root)

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
from tiny import pick

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "qemu-virt" / "rackboot.toml"
GOAL_BYTES = 16_000_000
RUNS = pick(3, 1)
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
    return variant_build(example, out, "none", config.InitramfsCompression.GZIP)


def variant_build(
    example: config.Config, out: Path, kernel: str, initramfs: config.InitramfsCompression
) -> config.Config:
    """The example built with the kernel compressed as ``kernel`` says and the initramfs as ``initramfs``."""
    cfg = replace(
        example,
        initramfs=replace(example.initramfs, compression=initramfs),
        output=replace(example.output, directory=out),
    )
    kept = build.ARM64_KERNEL_COMPRESSION
    build.ARM64_KERNEL_COMPRESSION = kernel
    try:
        build.build(cfg, log=lambda line: None)
    finally:
        build.ARM64_KERNEL_COMPRESSION = kept
    return cfg


# The (kernel, initramfs) compressions bench_variants weighs; U-Boot 2023.01's booti
# inflates gzip, lzma, lz4 and bzip2, Debian's arm64 kernel unpacks gzip, xz and zstd.
VARIANTS = [("none", "gzip"), ("lzma", "xz"), ("lzma", "zstd"), ("gzip", "xz"), ("gzip", "zstd"), ("lzma", "gzip")]


def bench_variants(config_path: Path = EXAMPLE, runs: int = RUNS) -> dict[str, dict]:
    """Bytes and seconds to each milestone for every one of VARIANTS, booted in turn."""
    with tempfile.TemporaryDirectory(prefix="rackboot-bench-netboot-") as tmp:
        example = config.load(config_path)
        cmdline = " ".join(word for word in example.kernel.cmdline.split() if word != "quiet")
        example = replace(example, kernel=replace(example.kernel, cmdline=cmdline))
        builds = {
            f"{k}+{i}": variant_build(example, Path(tmp) / f"{k}-{i}", k, config.InitramfsCompression(i))
            for k, i in VARIANTS
        }
        result: dict[str, dict] = {
            name: {"bytes": netboot_bytes(cfg.output.directory), "boots": []} for name, cfg in builds.items()
        }
        for run in range(runs):
            for name, cfg in builds.items():
                result[name]["boots"].append(boot_once(cfg, Path(tmp) / f"{name}-{run}.log"))
    return result


# What the rack bench weighs: the reference, the example as built, and the fastest inflate
RACK_VARIANTS = [("none", "gzip"), ("lzma", "xz"), ("lzma", "gzip")]


def bench_rack(config_path: Path = EXAMPLE, runs: int = RUNS) -> dict[str, dict]:
    """As bench_variants, but each worker netboots on a rack network in a namespace: its card's
    script leases an address from the master's dnsmasq and loads over dnsmasq's TFTP, one
    block per round trip through a tap, as a real rack does (QEMU's user network answers
    TFTP from memory). Needs root."""
    from rackboot import demo
    from rackboot.qemu import harness
    from rackboot.qemu.netns import RackNetwork

    with tempfile.TemporaryDirectory(prefix="rackboot-bench-netboot-") as tmp, RackNetwork(1) as rack:
        example = config.load(config_path)
        cmdline = " ".join(word for word in example.kernel.cmdline.split() if word != "quiet")
        result: dict[str, dict] = {}
        for kernel, initramfs in RACK_VARIANTS:
            name = f"{kernel}+{initramfs}"
            base = Path(tmp) / name
            base.mkdir()
            cfg = demo.rack_config(example, base, rack)
            cfg = replace(cfg, kernel=replace(cfg.kernel, cmdline=cmdline))
            cfg = variant_build(cfg, cfg.output.directory, kernel, config.InitramfsCompression(initramfs))
            cfg.master.directory.mkdir(parents=True, exist_ok=True)
            master = harness.MasterProcess(cfg, rack, base / "master.log")
            result[name] = {"bytes": netboot_bytes(cfg.output.directory), "boots": []}
            try:
                for run in range(runs):
                    card = base / "card.img"
                    harness.blank_card(cfg.output.directory / "sdcard.img", card)
                    worker = harness.new_rack_worker(cfg, rack, 0, card, base / f"boot-{run}.log")
                    result[name]["boots"].append(rack_boot_once(worker, len(result[name]["bytes"])))
            finally:
                master.stop()
    return result


def rack_boot_once(worker: QemuWorker, files: int, timeout: float = 300) -> dict[str, float]:
    marks: dict[str, float] = {}
    start = time.monotonic()
    with worker:
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


def report_variants(result: dict[str, dict]) -> str:
    lines = [
        f"  {'kernel+initramfs':18} {'MB':>6} " + " ".join(f"{m:>9}" for m in result[next(iter(result))]["boots"][0])
    ]
    for name, got in result.items():
        marks = got["boots"][0]
        medians = [statistics.median(b[m] for b in got["boots"]) for m in marks]
        lines.append(f"  {name:18} {sum(got['bytes'].values()) / 1e6:6.2f} " + " ".join(f"{v:9.2f}" for v in medians))
    return "\n".join(lines)


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
    if "--rack" in sys.argv[2:]:
        print(report_variants(bench_rack(runs=runs)))
        return 0
    if "--variants" in sys.argv[2:]:
        print(report_variants(bench_variants(runs=runs)))
        return 0
    print(report(bench(runs=runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
