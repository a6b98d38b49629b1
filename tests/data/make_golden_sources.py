"""Make the sources' golden sample in tests/data with today's code (the revision that wrote it).

Run from the repository:  .venv/bin/python tests/data/make_golden_sources.py
report rev10: the boot report of a worker given three sources (the master, a second master,
a cache), with the bytes each sent and why two were passed over (`sources`, written only when
a worker has more than one). tests/unit/test_golden_formats.py checks today's code against it.
"""

from __future__ import annotations

from pathlib import Path

from rackboot.initramfs.updater import formats

HERE = Path(__file__).resolve().parent
NODE = "52-54-00-12-34-56"
REPORT = "report.rev10.sources.json"


def report_rev10() -> formats.Report:
    return formats.Report(
        node=NODE,
        phase=formats.Phase.BOOT,
        bytes=3145728 + 1048576,
        seconds=12.5,
        slot="b",
        version=2,
        time=1_700_001_000.25,
        hostname="worker-01",
        sources=(
            formats.SourceUse(
                "http://10.0.2.2:8080",
                0,
                "master http://10.0.2.2:8080: GET /plans/52-54-00-12-34-56.json: connection refused (after 2 attempts)",
            ),
            formats.SourceUse(
                "http://10.1.0.2:8080",
                1048576,
                "GET /images/example/2/rootfs.ext4.gz: verify example v2: sha256 is "
                + "0" * 64
                + ", the manifest says "
                + "1" * 64,
            ),
            formats.SourceUse("http://cache.rack/rackboot", 3145728, None),
        ),
    )


def main() -> None:
    (HERE / REPORT).write_bytes(formats.dump(report_rev10()))
    print(f"{REPORT}: {(HERE / REPORT).stat().st_size} bytes")


if __name__ == "__main__":
    main()
