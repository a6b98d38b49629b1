"""The rack's numbers on a rack network in a namespace (qemu/netns.py): `rackboot serve`
with its dnsmasq (DHCP and TFTP), blank workers on taps, the example image with an
incompressible payload so a stream is long enough to time. Needs root, dnsmasq and tc.

    python benchmarks/bench_rack.py [WORKERS [RATE_MBIT]]

Three rounds in one run, each from blank cards, each against the others:

  1. one worker alone: its image bytes/s (the reference), seconds from power-on to
     confirmed, and one netboot's bytes and seconds over dnsmasq's TFTP;
  2. WORKERS switched on together: aggregate image bytes/s against one worker's, and
     seconds from power-on to all confirmed;
  3. the same storm with the master's HTTP link shaped to RATE_MBIT (tc htb on the
     bridge, the master's source port only, so TFTP is untouched): aggregate bytes/s
     against that link-limited rate (goal >= 0.8).

The master's CPU seconds per GiB (utime + stime of the serve process from /proc, and of
its dnsmasq per GiB of TFTP) are read around each round. Aggregate bytes/s is the image
bytes of a round over the span from the first download's start to the last one's end,
each from the worker's download report (request to last byte written) as the master
received it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_netboot
from rackboot import config, demo
from rackboot.build import Inputs
from rackboot.initramfs.updater.formats import node_id
from rackboot.master import dnsmasq, plans, publish
from rackboot.master.inventory import Inventory
from rackboot.qemu import harness
from rackboot.qemu.netns import RackNetwork
from rackboot.qemu.runner import QemuWorker
from tiny import pick

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "qemu-virt" / "rackboot.toml"
WORKERS = pick(max(4, min(8, 2 * (os.cpu_count() or 1))), 2)
RATE_MBIT = 16  # the shaped link: below what this machine's emulated workers take in together
PAYLOAD_MIB = pick(24, 1)  # incompressible: the stream is this big, whatever gzip does
LINK_GOAL = 0.8
BOOT_TIMEOUT = 900
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Round:
    workers: int
    rate_mbit: int  # 0: the link unshaped
    seconds_to_all_confirmed: float
    image_bytes: int  # the master's count of image bytes sent this round
    download_span: float  # first download's start to last one's end, from the reports
    serve_cpu: float  # seconds of the serve process this round
    dnsmasq_cpu: float
    tftp_bytes: int
    netboot: dict[str, float]  # one worker's milestones (seconds from power-on); round 1 only
    netboot_files: dict[str, int]

    @property
    def bytes_per_second(self) -> float:
        return self.image_bytes / self.download_span


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (fields 14 and 15 of /proc/<pid>/stat, after the command's parentheses)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def serve_dnsmasq(master: Path) -> int:
    """The pid of the dnsmasq serve runs, from the PID file serve keeps in the master tree."""
    pids = dnsmasq.read_pids(master)
    if pids is None:
        raise SystemExit(f"bench_rack: no dnsmasq pid in {master / dnsmasq.PID}: is serve's netboot service up?")
    return pids[0]


def shape(rack: RackNetwork, port: int, rate_mbit: int) -> None:
    """Limit what the master sends from ``port`` onto the bridge to ``rate_mbit``; the rest is unlimited."""
    tc = ["ip", "netns", "exec", rack.name, "tc"]
    for args in (
        f"qdisc replace dev {rack.bridge} root handle 1: htb default 10",
        f"class replace dev {rack.bridge} parent 1: classid 1:10 htb rate 10gbit",
        f"class replace dev {rack.bridge} parent 1: classid 1:20 htb rate {rate_mbit}mbit",
        f"filter replace dev {rack.bridge} parent 1: protocol ip prio 1 u32 match ip sport {port} 0xffff flowid 1:20",
    ):
        subprocess.run([*tc, *args.split()], check=True, capture_output=True)


def publish_with_payload(cfg: config.Config, rootfs: Path, work: Path, version: int) -> None:
    """The example root plus PAYLOAD_MIB of seeded random bytes, published as ``version``."""
    kernel = Inputs(cfg).kernel
    root = harness.example_root(cfg, rootfs, f"v{version}", work / f"rootfs-v{version}")
    payload = random.Random(version).randbytes(PAYLOAD_MIB << 20)
    (root / "payload.bin").write_bytes(payload)
    publish.publish_directory(
        root,
        cfg.master.directory,
        image=harness.IMAGE,
        version=version,
        label=f"v{version}",
        kernel_release=kernel.release,
        modules_from=kernel.root,
        modules=cfg.kernel.root_modules,
        source_date_epoch=config.source_date_epoch(),
        key=cfg.master.key,
    )
    plans.assign(cfg, node="default", image=harness.IMAGE)


def reports(cfg: config.Config, rack: RackNetwork, i: int) -> list[dict]:
    path = cfg.master.directory / "reports" / f"{rack.mac(i).replace(':', '-')}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def one_round(
    cfg: config.Config, rack: RackNetwork, master: harness.MasterProcess, work: Path, workers: int, name: str
) -> Round:
    """Blank cards for ``workers`` workers, all switched on together, until each has confirmed
    v1 and powered off."""
    out = cfg.output.directory
    cards = [work / f"{name}-card{i}.img" for i in range(workers)]
    for card in cards:
        harness.blank_card(out / "sdcard.img", card)
    inventory = Inventory(cfg.master.directory)
    for i in range(workers):  # a blank card is a new card to the master: its node key is pinned anew
        if inventory.node(node_id(rack.mac(i))) is not None:
            inventory.adopt(node_id(rack.mac(i)), replace_key=True)
    files = bench_netboot.netboot_bytes(out)
    seen = [len(reports(cfg, rack, i)) for i in range(workers)]
    dnsmasq_pid = serve_dnsmasq(cfg.master.directory)
    cpu = cpu_seconds(master.proc.pid), cpu_seconds(dnsmasq_pid)
    sent = master.bytes_sent()
    qemus = [
        harness.new_rack_worker(cfg, rack, i, card, work / "logs" / f"{name}-worker{i}.log")
        for i, card in enumerate(cards)
    ]
    start = time.monotonic()
    try:
        for worker in qemus:
            worker.start()
        with ThreadPoolExecutor(workers) as pool:
            marks = list(pool.map(lambda w: milestones(w, len(files), start), qemus))
    finally:
        for worker in qemus:
            worker.kill()
    downloads = [r for i in range(workers) for r in reports(cfg, rack, i)[seen[i] :] if r["phase"] == "download"]
    assert len(downloads) == workers, f"{name}: {len(downloads)} download reports from {workers} workers"
    span = max(r["received"] for r in downloads) - min(r["received"] - r["seconds"] for r in downloads)
    return Round(
        workers=workers,
        rate_mbit=0,
        seconds_to_all_confirmed=max(m["confirmed"] for m in marks),
        image_bytes=master.bytes_sent() - sent,
        download_span=span,
        serve_cpu=cpu_seconds(master.proc.pid) - cpu[0],
        dnsmasq_cpu=cpu_seconds(dnsmasq_pid) - cpu[1],
        tftp_bytes=sum(files.values()) * workers,
        netboot=marks[0],
        netboot_files=files,
    )


def milestones(worker: QemuWorker, files: int, start: float) -> dict[str, float]:
    """Seconds from power-on to: the netboot script, each TFTP file in, the kernel, v1 confirmed."""
    marks: dict[str, float] = {}
    worker.expect(r"rackboot: netboot ", BOOT_TIMEOUT)
    marks["script"] = time.monotonic() - start
    for i in range(files):
        worker.expect(r"Bytes transferred = ", BOOT_TIMEOUT)
        marks[f"file {i + 1}"] = time.monotonic() - start
    worker.expect(r"Starting kernel", BOOT_TIMEOUT)
    marks["kernel"] = time.monotonic() - start
    worker.expect(r"rackboot-mark-good: slot a \(example v1\) confirmed", BOOT_TIMEOUT)
    marks["confirmed"] = time.monotonic() - start
    worker.wait_exit(timeout=120)
    return marks


def bench(workers: int = WORKERS, rate_mbit: int = RATE_MBIT) -> list[Round]:
    example = config.load(EXAMPLE)
    with tempfile.TemporaryDirectory(prefix="rackboot-bench-rack-") as tmp, RackNetwork(workers) as rack:
        base = Path(tmp)
        cfg = demo.rack_config(example, base, rack)
        cfg = replace(cfg, master=replace(cfg.master, key=base / "keys" / "master.key"))
        work = base / "work"
        harness.prepare(cfg, work, log=lambda line: None)
        publish_with_payload(cfg, example.base / "rootfs", work, 1)
        master = harness.MasterProcess(cfg, rack, work / "master.log")
        rounds = [one_round(cfg, rack, master, work, 1, "one")]
        rounds.append(one_round(cfg, rack, master, work, workers, "storm"))
        shape(rack, cfg.master.port, rate_mbit)
        rounds.append(replace(one_round(cfg, rack, master, work, workers, "shaped"), rate_mbit=rate_mbit))
        master.stop()
    return rounds


def report(rounds: list[Round]) -> str:
    one, storm, shaped = rounds
    mb = 1e6
    link = shaped.rate_mbit * 1e6 / 8
    verdict = "ok" if shaped.bytes_per_second >= LINK_GOAL * link else "UNDER"
    lines = [
        f"  one worker alone:    {one.bytes_per_second / mb:6.2f} MB/s of image (the reference); "
        f"power-on -> confirmed {one.seconds_to_all_confirmed:.1f} s",
        f"  {storm.workers} workers together: {storm.bytes_per_second / mb:6.2f} MB/s aggregate, "
        f"x{storm.bytes_per_second / one.bytes_per_second:.2f} of one worker's; power-on -> all confirmed "
        f"{storm.seconds_to_all_confirmed:.1f} s, x{storm.seconds_to_all_confirmed / one.seconds_to_all_confirmed:.2f}",
        f"  {shaped.workers} workers, link {shaped.rate_mbit} Mbit/s: {shaped.bytes_per_second / mb:6.2f} MB/s "
        f"aggregate, {shaped.bytes_per_second / link:.2f} of the link's {link / mb:.2f} MB/s "
        f"(goal >= {LINK_GOAL}: {verdict}); power-on -> all confirmed {shaped.seconds_to_all_confirmed:.1f} s",
    ]
    served = sum(r.image_bytes for r in rounds)
    tftp = sum(r.tftp_bytes for r in rounds)
    lines.append(
        f"  master CPU: serve {sum(r.serve_cpu for r in rounds) / (served / 2**30):.1f} s per GiB of images "
        f"({served / 2**30:.2f} GiB served); its dnsmasq {sum(r.dnsmasq_cpu for r in rounds) / (tftp / 2**30):.1f} "
        f"s per GiB over TFTP ({tftp / 2**30:.2f} GiB)"
    )
    marks, files = one.netboot, one.netboot_files
    tftp_seconds = marks[f"file {len(files)}"] - marks["script"]
    sizes = ", ".join(f"{name} {size / mb:.2f}" for name, size in files.items())
    lines.append(
        f"  one netboot over dnsmasq's TFTP: {sum(files.values()) / mb:.2f} MB ({sizes}) in {tftp_seconds:.2f} s, "
        f"{sum(files.values()) / tftp_seconds / mb:.2f} MB/s; power-on -> script {marks['script']:.2f} s, "
        f"-> kernel {marks['kernel']:.2f} s"
    )
    return "\n".join(lines)


def main() -> int:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else WORKERS
    rate = int(sys.argv[2]) if len(sys.argv) > 2 else RATE_MBIT
    print(report(bench(workers, rate)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
