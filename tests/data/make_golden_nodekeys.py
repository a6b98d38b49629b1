"""Make the node keys' golden samples in tests/data with today's code (the revision that wrote them).

Run from the repository:  .venv/bin/python tests/data/make_golden_nodekeys.py
node-key rev1: the record the updater keeps at 3 MiB + 256 KiB (and again at + 320 KiB) for
node 52-54-00-12-34-56; its key was made once by openssl and is never remade (the record
already here is read back, and written again byte for byte). report rev9: a confirm naming
that key (pubkey), and its .sig: the 64 raw bytes whose base64 is the X-Rackboot-Signature
header (Ed25519 is deterministic: signing again gives the same bytes).
tests/unit/test_golden_nodekeys.py checks today's code against them.
"""

from __future__ import annotations

from pathlib import Path

from rackboot.initramfs.updater import formats, nodekey

HERE = Path(__file__).resolve().parent
NODE = "52-54-00-12-34-56"
RECORD = "node-key.format1.rev1.bin"
REPORT = "report.rev9.signed.json"


def key() -> nodekey.NodeKey:
    """The committed sample's key; made (openssl genpkey) only when there is none yet."""
    path = HERE / RECORD
    if path.exists():
        found = nodekey.decode(path.read_bytes())
        assert found is not None, f"{RECORD} does not read as a node key"
        return found
    return nodekey.generate(NODE)


def report_rev9(public: str) -> formats.Report:
    return formats.Report(
        node=NODE,
        phase=formats.Phase.CONFIRM,
        slot="b",
        version=2,
        time=1_700_000_900.5,
        hostname="worker-01",
        pubkey=public,
    )


def main() -> None:
    made = key()
    (HERE / RECORD).write_bytes(nodekey.encode(made))
    body = formats.dump(report_rev9(made.public_b64))
    (HERE / REPORT).write_bytes(body)
    (HERE / f"{REPORT}.sig").write_bytes(made.sign(body))
    for name in (RECORD, REPORT, f"{REPORT}.sig"):
        print(f"{name}: {(HERE / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
