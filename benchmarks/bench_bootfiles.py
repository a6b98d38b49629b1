"""Boot files kept current, on the host: the updater bringing a file-backed card's boot area
to a new build over loopback HTTP (download, write the inactive area, verify, read back,
switch the MBR), against `curl | gzip -d | dd conv=fsync` writing the same stream over the
live area in place (what rackboot never does: no check, and a cut tears the FAT that boots);
and the check an up-to-date card pays at every boot (the boot record) against hashing the
active area, what a card without the record pays once.

    python benchmarks/bench_bootfiles.py

The boot image is a real 64 MiB FAT32 boot area (the default 128 MiB boot partition) made
by the card builder, holding 14 MiB of incompressible "kernel and initramfs" and a boot
script, as the qemu-virt example's does. Best of three runs each.
"""

from __future__ import annotations

import random
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from rackboot.firmware import sdcard
from rackboot.initramfs.updater import bootfiles, formats, install, mbr
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import Layout, Partition, Plan
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import bootfiles as master_bootfiles
from rackboot.master import serve
from tiny import pick

MIB = 1 << 20
BOOT_MIB = 128
RUNS = pick(3, 1)
KERNEL_MIB, INITRAMFS_MIB = pick((8, 6), (1, 1))  # incompressible stand-ins for Image.lzma and the initramfs
MAC = "52:54:00:12:34:56"
NODE = "52-54-00-12-34-56"


def files(build: int) -> dict[str, bytes]:
    rng = random.Random(build)
    return {
        "Image.lzma": rng.randbytes(KERNEL_MIB * MIB),
        "initramfs.cpio.xz": rng.randbytes(INITRAMFS_MIB * MIB),
        "boot.scr": b"echo\n",
    }


def bench() -> dict:
    with tempfile.TemporaryDirectory(prefix="rackboot-bench-boot-") as tmp:
        d = Path(tmp)
        fats = {}
        for build in (1, 2):
            fats[build] = d / f"boot{build}.vfat"
            sdcard.boot_image(fats[build], files(build), boot_size_mib=BOOT_MIB, volume_id=1, mtime=1)
        master = d / "master"
        boot = master_bootfiles.publish_image(fats[2], master)
        parts = (Partition("boot", 4, BOOT_MIB, "0c"), Partition("a", 132, 64, "83"), Partition("b", 196, 64, "83"))
        plan = Plan(node=NODE, layout=Layout(parts), image=None, boot=boot)
        (master / "plans").mkdir()
        (master / "plans" / f"{NODE}.json").write_bytes(formats.dump(plan))
        server = serve.make_server(master, "127.0.0.1", 0, quiet=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        stream = master / boot.lstrip("/").replace("boot.json", "boot.vfat.gz")
        card = d / "card.img"
        ours, pipe, record, hashing = [], [], [], []
        try:
            for _ in range(RUNS):
                sdcard.card_image(card, fats[1], boot_size_mib=BOOT_MIB, disk_signature=1)
                with open(card, "r+b") as f:
                    f.truncate(260 * MIB)
                ours.append(_update(card, url))
                with Disk(str(card), writable=False) as disk:
                    assert mbr.parse(disk.read(0, 512)).entry(1).start == 68 * 2048, "the card did not switch"
                record.append(_update(card, url))  # up to date: the record says so
                with Disk(str(card), writable=False) as disk:
                    start = time.perf_counter()
                    install.read_back(disk, 68 * MIB, fats[2].stat().st_size)
                    hashing.append(time.perf_counter() - start)
                start = time.perf_counter()
                subprocess.run(
                    f"curl -s {url}/{stream.relative_to(master)} | gzip -d | "
                    f"dd of={card} bs=1M seek=4 conv=notrunc,fsync status=none",
                    shell=True,
                    check=True,
                )
                pipe.append(time.perf_counter() - start)
        finally:
            server.shutdown()
            server.server_close()
        return {
            "image": fats[2].stat().st_size,
            "stream": stream.stat().st_size,
            "ours": min(ours),
            "pipe": min(pipe),
            "record": min(record),
            "hash": min(hashing),
        }


def _update(card: Path, url: str) -> float:
    """Seconds of one boot's boot-files step (the updater's whole run, which has no image to install)."""
    master = MasterClient(url, read_timeout=10.0, retries=1, backoff=0.01)
    start = time.perf_counter()
    try:
        run(str(card), url, Identity(MAC), master=master, log=lambda m: None, verifier=Verifier(None))
    except bootfiles.UpdaterError:
        pass  # "no good slot to boot": the card has no slot, only boot areas
    return time.perf_counter() - start


def report(r: dict) -> str:
    return "\n".join(
        [
            f"boot image {r['image'] / MIB:.0f} MiB, stream {r['stream'] / MIB:.1f} MiB (gzip)",
            f"switch to a new build (download, write, verify, read back, MBR): {r['ours']:.2f} s; "
            f"curl | gzip -d | dd over the live area, unchecked: {r['pipe']:.2f} s "
            f"(ratio {r['ours'] / r['pipe']:.2f})",
            f"an up-to-date boot, by the boot record: {r['record']:.3f} s; hashing the area instead: "
            f"{r['hash']:.3f} s (ratio {r['record'] / r['hash']:.2f})",
        ]
    )


if __name__ == "__main__":
    print(report(bench()))
