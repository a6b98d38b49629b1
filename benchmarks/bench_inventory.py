"""The inventory's cost per report: a rack's reports POSTed at once to `rackboot serve` (which
takes each into SQLite and appends it to reports/<node>.jsonl), against the same reports
appended as serve did before the inventory (one canonical-JSON line per report under a
lock), on the same threads. Every report must be counted either way. Then the same rack
with node keys: every report signed by its node's key (made and signed beforehand, as the
workers do), each signature checked by serve in process (pyca/cryptography), and again with
each checked by an openssl run instead (at most nodekeys.MAX_PROCESSES at once), as serve
did before."""

from __future__ import annotations

import base64
import http.client
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from rackboot.initramfs.updater import formats, nodekey
from rackboot.initramfs.updater.formats import Phase, Report
from rackboot.master import nodekeys, serve
from rackboot.master.inventory import Inventory
from tiny import pick

WORKERS = pick(32, 2)
REPORTS = pick(40, 3)  # per worker: about one update's worth


def reports(worker: int) -> list[bytes]:
    node = f"52-54-00-00-{worker >> 8:02x}-{worker & 0xFF:02x}"
    phases = [Phase.PLAN, Phase.LAYOUT, Phase.DOWNLOAD, Phase.VERIFY, Phase.COMMIT, Phase.BOOT]
    return [
        formats.dump(Report(node=node, phase=phases[n % len(phases)], bytes=n, slot="b", version=2, time=1.7e9 + n))
        for n in range(REPORTS)
    ]


def signed_reports(worker: int) -> list[tuple[bytes, dict[str, str]]]:
    """The worker's reports as today's updater sends them: naming its key, signed by it."""
    plain = reports(worker)
    key = nodekey.generate(formats.parse_report(plain[0]).node)
    out = []
    for body in plain:
        body = formats.dump(replace(formats.parse_report(body), pubkey=key.public_b64))
        out.append((body, {nodekeys.SIGNATURE_HEADER: base64.b64encode(key.sign(body)).decode()}))
    return out


def timed(work: Callable[[int], None]) -> float:
    threads = [threading.Thread(target=work, args=(i,)) for i in range(WORKERS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def bench() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        master = Path(tmp) / "master"
        master.mkdir()
        server = serve.make_server(master, quiet=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        host, port = server.server_address[:2]

        def post(worker: int) -> None:
            conn = http.client.HTTPConnection(str(host), port, timeout=60)
            for body in reports(worker):
                conn.request("POST", "/report", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 204, resp.status
            conn.close()

        served = timed(post)
        counted = Inventory(master).count_reports()
        server.shutdown()
        server.server_close()

        plain = Path(tmp) / "plain"
        plain.mkdir()
        lock = threading.Lock()

        def append(worker: int) -> None:  # the master's old report path, without HTTP
            for body in reports(worker):
                report = formats.parse_report(body)
                line = formats.dump({**report.to_dict(), "received": round(time.time(), 3)})
                with lock, open(plain / f"{report.node}.jsonl", "ab") as out:
                    out.write(line)

        appended = timed(append)
        direct = Path(tmp) / "direct"
        direct.mkdir()
        inv = Inventory(direct)

        def ingest(worker: int) -> None:  # the inventory alone, without HTTP
            for body in reports(worker):
                inv.ingest(formats.parse_report(body))

        ingested = timed(ingest)
        total = WORKERS * REPORTS
        assert counted == total and Inventory(direct).count_reports() == total, (counted, total)

        prepared = [signed_reports(w) for w in range(WORKERS)]
        signed, _ = post_signed(Path(tmp) / "keyed", prepared, nodekeys.Verifier())
        by_openssl, peak = post_signed(Path(tmp) / "keyed-openssl", prepared, nodekeys.Verifier(openssl="openssl"))
    return {
        "reports": total,
        "served": served,
        "appended": appended,
        "ingested": ingested,
        "signed": signed,
        "openssl": by_openssl,
        "peak": peak,
    }


def post_signed(
    master: Path, prepared: list[list[tuple[bytes, dict[str, str]]]], verify: nodekeys.Verifier
) -> tuple[float, int]:
    """Seconds for every worker's signed reports, serve checking them with ``verify``; and
    the most openssl processes that ran at once. Every report must be counted, signed."""
    master.mkdir()
    server = serve.make_server(master, quiet=True)
    server.fleet.inventory.verify = verify
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]

    def post(worker: int) -> None:
        conn = http.client.HTTPConnection(str(host), port, timeout=60)
        for body, headers in prepared[worker]:
            conn.request("POST", "/report", body, {"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 204, resp.status
        conn.close()

    seconds = timed(post)
    server.shutdown()
    server.server_close()
    taken = Inventory(master).db.execute("SELECT COUNT(*) FROM reports WHERE signed = 1").fetchone()[0]
    assert taken == WORKERS * REPORTS, (taken, WORKERS * REPORTS)
    assert verify.runs == taken, (verify.runs, taken)  # each checked once
    return seconds, verify.peak


def report(r: dict[str, float]) -> str:
    n = r["reports"]
    return "\n".join(
        [
            f"{n:.0f} reports from {WORKERS} workers at once, every one counted",
            f"  POST /report to rackboot serve (HTTP + inventory + file): {n / r['served']:8.0f} reports/s",
            f"  inventory alone (SQLite, WAL, one transaction each):      {n / r['ingested']:8.0f} reports/s",
            f"  reference: appending the line to reports/<node>.jsonl:   {n / r['appended']:8.0f} reports/s",
            f"  inventory / append: {r['ingested'] / r['appended']:.1f}x the time per report",
            f"  signed, each checked in process (pyca/cryptography):     {n / r['signed']:8.0f} reports/s",
            f"  reference: each checked by an openssl run (at most {nodekeys.MAX_PROCESSES} at once, peak "
            f"{r['peak']:.0f}): {n / r['openssl']:8.0f} reports/s; "
            f"in process: x{r['openssl'] / r['signed']:.1f} the rate",
        ]
    )


if __name__ == "__main__":
    print(report(bench()))
    sys.exit(0)
